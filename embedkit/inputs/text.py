"""Text preprocessing: the input policy and tokenisation, with ``tokenizers`` and numpy only.

Policy (one record per bad item, never a silent drop):

==========================  =================================================================
input                       what happens
==========================  =================================================================
``str``                     tokenised as is
``bytes``                   decoded as strict UTF-8; invalid bytes -> error ``invalid_utf8``
empty, or only invisible     ``empty="embed"`` (default): embedded like any text (as
characters (whitespace,     sentence-transformers does) and counted in ``stats.empty``;
zero-width space, word      ``empty="error"``: error ``empty_text``. Invisible means Unicode
joiner, soft hyphen, BOM,   categories Cc, Cf, Zs, Zl, Zp, other whitespace, and the Hangul
NUL...)                     fillers (:data:`INVISIBLE`)
anything else (None, NaN,   error ``not_text``
numbers, lists...)
an unreadable row           the reader's error (``invalid_json``, ``not_a_file``...), passed on
(:class:`ItemFailure`)      as that item's record
longer than ``max_length``  ``long="truncate"`` (default; ``truncate=True``): truncated and
tokens                      counted in ``stats.truncated``; ``long="error"``
                            (``truncate=False``): error ``too_long``; ``long="chunk"``: split
                            into windows, each embedded, pooled (:mod:`embedkit.inputs.windows`)
==========================  =================================================================

Bounded work per item: a text longer than ``CHARS_PER_TOKEN * max_length`` characters is cut
before tokenising (tokenizers needs ~140 bytes per character of input), at a point past which
the kept ``max_length`` tokens provably do not depend on the rest (they end before a whitespace
that precedes the cut); the cut doubles until that holds, up to ``MAX_CHARS_PER_TOKEN *
max_length`` characters. Such a text counts as truncated, and its vector equals the full
text's. A line a reader clipped (:class:`Clipped`, over ``MAX_TEXT_BYTES``) counts as truncated
too. ``long="chunk"`` bounds its work the same way (:mod:`embedkit.inputs.windows`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..backbones.backbone import TextPreprocess
from .items import Clipped, ItemError, ItemFailure
from .windows import DEFAULT_MAX_CHUNKS, DEFAULT_OVERLAP, Splitter, Windows, long_policy

EMPTY_POLICIES = ("embed", "error")
CHARS_PER_TOKEN = 16  # the first cut, in characters per kept token (English averages ~4.5)
MAX_CHARS_PER_TOKEN = 1024  # the last cut: a text is never tokenised past this many per token

# Characters that render as nothing: Unicode Cc, Cf, Zs, Zl, Zp, other whitespace, and the Hangul
# fillers (generated from unicodedata 14.0; tests/test_text.py checks it against the running Python).
INVISIBLE = (
    "\x00-\x20\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f-\u1160\u1680"
    "\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\u3164\ufeff\uffa0\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f"
)
_INVISIBLE = re.compile(f"[{INVISIBLE}]*")
_WHITESPACE = re.compile("[\t\n\r \xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")  # what tokenizers split on


def is_blank(text: str) -> bool:
    """True when ``text`` holds no visible character (empty, whitespace, zero-width, NUL...)."""
    return _INVISIBLE.fullmatch(text) is not None


@dataclass
class TextStats:
    """Counts of what the policy did.

    ``tokens`` counts the ids the model ran on (every window's, with ``long="chunk"``);
    ``chunked`` the texts split into more than one window and ``chunks`` the windows embedded
    (one per text within the window), both 0 unless ``long="chunk"``.
    """

    total: int = 0
    ok: int = 0
    failed: int = 0
    empty: int = 0
    truncated: int = 0
    tokens: int = 0
    chunked: int = 0
    chunks: int = 0

    def add(self, other: "TextStats") -> None:
        for name in ("total", "ok", "failed", "empty", "truncated", "tokens", "chunked", "chunks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Tokenized:
    """Token ids of the items that passed the policy: one row per item, ``ids[k]`` of item ``indices[k]``.

    With ``long="chunk"``, one row per window: ``indices`` repeats an item's index for each of
    its windows (consecutive, in order) and ``windows`` describes them; otherwise ``windows``
    is None.
    """

    indices: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    stats: TextStats = field(default_factory=TextStats)
    windows: Windows | None = None


def _describe(item: Any) -> str:
    # Never put raw content into messages or logs: type and size only.
    return type(item).__name__


class TextTokenizer:
    """Tokenises text exactly as the artifact's preprocessing declares.

    ``tokenizer.json`` files often carry fixed padding and a short truncation (all-MiniLM's
    pads to 128); both are replaced by no padding and truncation at ``max_length`` so the
    tokens equal what the reference sentence-transformers model sees.

    Args:
        preprocess: the artifact's text preprocessing (tokenizer file, ``max_length``).
        truncate: the older spelling of ``long``: None (default) follows ``long``; False is
            ``long="error"``; True agrees with ``"truncate"`` and ``"chunk"``.
        empty: ``"embed"`` or ``"error"`` for texts with no visible character.
        long: ``"truncate"`` | ``"chunk"`` | ``"error"``, for texts over ``max_length`` tokens
            (see :mod:`embedkit.inputs.windows`).
        chunk_overlap: ``long="chunk"``: content tokens shared by neighbouring windows
            (default 32; ``0 <= chunk_overlap < C / 2``, C = ``max_length`` less the special tokens).
        max_chunks: ``long="chunk"``: windows per text at most (default 64); a longer text is
            embedded from its first ``max_chunks`` windows and counted as truncated.

    Raises:
        ValueError: an unknown ``empty`` or ``long``, a contradiction between ``truncate`` and
            ``long``, or (``long="chunk"``) a bad ``chunk_overlap`` / ``max_chunks``.
    """

    def __init__(self, preprocess: TextPreprocess, truncate: bool | None = None, empty: str = "embed",
                 long: str = "truncate", chunk_overlap: int = DEFAULT_OVERLAP, max_chunks: int = DEFAULT_MAX_CHUNKS):
        from tokenizers import Tokenizer

        if empty not in EMPTY_POLICIES:
            raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
        self.preprocess = preprocess
        self.long = long_policy(long, truncate)
        self.truncate = self.long != "error"
        self.empty = empty
        self.tokenizer = Tokenizer.from_file(preprocess.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(preprocess.max_length)
        self.splitter: Splitter | None = None
        if self.long == "chunk":
            # A tokenizer of its own, truncating at max_chunks windows' worth: encode runs in a thread.
            self.whole = Tokenizer.from_file(preprocess.tokenizer)
            self.whole.no_padding()
            self.whole.no_truncation()
            self.splitter = Splitter(self.whole, preprocess.max_length, chunk_overlap, max_chunks)
            self.whole.enable_truncation(self.splitter.kept)

    def identity(self) -> dict[str, Any]:
        """What of this policy changes vectors: ``{}`` (truncate, error), else
        ``{"long": "chunk", "chunk_overlap": int, "max_chunks": int}`` (for a feature store's namespace)."""
        if self.splitter is None:
            return {}
        return {"long": "chunk", "chunk_overlap": self.splitter.overlap, "max_chunks": self.splitter.max_chunks}

    def validate(self, items: Sequence[Any], offset: int = 0) -> tuple[list[int], list[str], list[ItemError], int]:
        """Apply the input policy; returns (indices, texts, errors, empty count)."""
        indices: list[int] = []
        texts: list[str] = []
        errors: list[ItemError] = []
        empty = 0
        for i, item in enumerate(items, start=offset):
            if isinstance(item, ItemFailure):
                errors.append(item.record(i))
                continue
            if isinstance(item, (bytes, bytearray, memoryview)):
                try:
                    item = bytes(item).decode("utf-8")
                except UnicodeDecodeError as exc:
                    errors.append(ItemError(i, "invalid_utf8", "decode", f"bytes are not UTF-8 at offset {exc.start}"))
                    continue
            if not isinstance(item, str):
                errors.append(ItemError(i, "not_text", "decode", f"expected str or UTF-8 bytes, got {_describe(item)}"))
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates, e.g. from errors="surrogateescape"
                errors.append(ItemError(i, "invalid_utf8", "decode", f"text holds an unpaired surrogate at {exc.start}"))
                continue
            if is_blank(item):
                if self.empty == "error":
                    errors.append(ItemError(i, "empty_text", "decode",
                                            "empty text, or only whitespace / invisible characters"))
                    continue
                empty += 1
            indices.append(i)
            texts.append(item)
        return indices, texts, errors, empty

    def bounded(self, text: str) -> str:
        """``text``, or the prefix of it whose first ``max_length`` tokens are the text's own.

        Returns ``text`` itself when it is short enough to tokenise whole (see the module).
        """
        length = self.preprocess.max_length
        return _cut(text, self.tokenizer, CHARS_PER_TOKEN * length, MAX_CHARS_PER_TOKEN * length)

    def bounded_chunks(self, text: str) -> str:
        """``text``, or the prefix of it whose first ``max_chunks`` windows are the text's own."""
        assert self.splitter is not None
        first = CHARS_PER_TOKEN * self.splitter.kept
        return _cut(text, self.whole, first, max(MAX_CHARS_PER_TOKEN * self.preprocess.max_length, 2 * first))

    def encode(self, items: Sequence[Any], offset: int = 0) -> Tokenized:
        """Validate and tokenise a chunk of items; indices are ``offset``-based."""
        indices, texts, errors, empty = self.validate(items, offset)
        out = Tokenized(errors=errors)
        out.stats.total = len(items)
        out.stats.empty = empty
        cut = set()
        bounded = self.bounded if self.splitter is None else self.bounded_chunks
        for k, (i, text) in enumerate(zip(indices, texts)):
            head = bounded(text)
            if head is not text or isinstance(items[i - offset], Clipped):
                texts[k] = head
                cut.add(i)
        if self.splitter is not None:
            self._windows(indices, texts, cut, out)
            return out
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        for i, enc in zip(indices, encodings):
            truncated = bool(enc.overflowing) or i in cut
            if truncated and not self.truncate:
                out.errors.append(
                    ItemError(i, "too_long", "tokenize", f"longer than max_length={self.preprocess.max_length} tokens")
                )
                continue
            out.stats.truncated += truncated
            out.indices.append(i)
            out.ids.append(enc.ids)
            out.stats.tokens += len(enc.ids)
        out.stats.failed = len(out.errors)
        out.stats.ok = len(out.indices)
        return out

    def _windows(self, indices: list[int], texts: list[str], cut: set[int], out: Tokenized) -> None:
        """``long="chunk"``: every window of each text as a row of ``out``."""
        assert self.splitter is not None
        windows = out.windows = Windows()
        encodings = self.whole.encode_batch(texts) if texts else []
        for i, enc in zip(indices, encodings):
            parts = self.splitter.split(enc.ids, enc.offsets)
            out.stats.truncated += bool(enc.overflowing) or i in cut
            out.stats.chunked += len(parts) > 1
            out.stats.chunks += len(parts)
            for k, (ids, tokens, chars) in enumerate(parts):
                out.indices.append(i)
                out.ids.append(ids)
                out.stats.tokens += len(ids)
                windows.chunk.append(k)
                windows.token_spans.append(tokens)
                windows.char_spans.append(chars)
        out.stats.failed = len(out.errors)
        out.stats.ok = len(indices)


def _cut(text: str, tokenizer: Any, first: int, last: int) -> str:
    """``text``, or a prefix of at least ``first`` characters past which ``tokenizer``'s kept tokens
    provably do not depend on the rest; at most ``last`` characters (see the module)."""
    limit = first
    if len(text) <= limit:
        return text
    while limit < last:
        head = text[:limit]
        enc = tokenizer.encode(head)
        if enc.overflowing:
            end = max((e for _, e in enc.offsets), default=0)
            if _WHITESPACE.search(head, end) is not None:
                return head  # the kept tokens end before a word boundary that precedes the cut
        limit *= 2
    return text[:last]


def pad(ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` int64 arrays."""
    length = max((len(x) for x in ids), default=0)
    input_ids = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def token_batches(lengths: Sequence[int], budget: int, max_batch: int = 256) -> list[np.ndarray]:
    """Group items longest first so that each batch holds about ``budget`` padded tokens.

    Sorting by length keeps padding (wasted FLOPs) near zero; a token budget keeps the
    activation size, and so cache behaviour, steady from short to long texts.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch, budget // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


_PROBE_WORDS = (
    "the quick brown fox jumps over the lazy dog while a careful reader checks every "
    "number twice before trusting it and transfer learning reuses frozen features from "
    "a pretrained network to train a small head on few labels with little compute"
).split()


def probe_texts(max_length: int) -> list[str]:
    """Nine texts of varied lengths, the last longer than ``max_length`` tokens."""
    lengths = [1, 2, 4, 7, 12, 20, 33, 50]
    texts = [" ".join((_PROBE_WORDS * 4)[k : k + n]) for k, n in enumerate(lengths)]
    texts.append(" ".join(_PROBE_WORDS * (max_length // len(_PROBE_WORDS) + 2)))
    return texts


def iter_chunks(items: Iterable[Any], size: int, max_chars: int | None = None) -> Iterable[list[Any]]:
    """Yield lists of up to ``size`` items; with ``max_chars``, a list ends once its texts (``str`` or
    ``bytes``) hold that many characters (bytes) in all, so that the token ids of a list stay bounded
    when texts are long (``long="chunk"``)."""
    chunk: list[Any] = []
    chars = 0
    for item in items:
        chunk.append(item)
        if max_chars is not None and isinstance(item, (str, bytes, bytearray)):
            chars += len(item)
        if len(chunk) >= size or (max_chars is not None and chars >= max_chars):
            yield chunk
            chunk = []
            chars = 0
    if chunk:
        yield chunk
