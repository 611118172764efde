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
longer than ``max_length``  ``truncate=True`` (default): truncated and counted in
tokens                      ``stats.truncated``; ``truncate=False``: error ``too_long``
==========================  =================================================================

Bounded work per item: a text longer than ``CHARS_PER_TOKEN * max_length`` characters is cut
before tokenising (tokenizers needs ~140 bytes per character of input), at a point past which
the kept ``max_length`` tokens provably do not depend on the rest (they end before a whitespace
that precedes the cut); the cut doubles until that holds, up to ``MAX_CHARS_PER_TOKEN *
max_length`` characters. Such a text counts as truncated, and its vector equals the full
text's. A line a reader clipped (:class:`Clipped`, over ``MAX_TEXT_BYTES``) counts as truncated
too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..backbones.backbone import TextPreprocess
from .items import Clipped, ItemError, ItemFailure

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
    """Counts of what the policy did."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    empty: int = 0
    truncated: int = 0
    tokens: int = 0

    def add(self, other: "TextStats") -> None:
        for name in ("total", "ok", "failed", "empty", "truncated", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Tokenized:
    """Token ids of the items that passed the policy."""

    indices: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    stats: TextStats = field(default_factory=TextStats)


def _describe(item: Any) -> str:
    # Never put raw content into messages or logs: type and size only.
    return type(item).__name__


class TextTokenizer:
    """Tokenises text exactly as the artifact's preprocessing declares.

    ``tokenizer.json`` files often carry fixed padding and a short truncation (all-MiniLM's
    pads to 128); both are replaced by no padding and truncation at ``max_length`` so the
    tokens equal what the reference sentence-transformers model sees.
    """

    def __init__(self, preprocess: TextPreprocess, truncate: bool = True, empty: str = "embed"):
        from tokenizers import Tokenizer

        if empty not in EMPTY_POLICIES:
            raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
        self.preprocess = preprocess
        self.truncate = truncate
        self.empty = empty
        self.tokenizer = Tokenizer.from_file(preprocess.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(preprocess.max_length)

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
        limit = CHARS_PER_TOKEN * length
        if len(text) <= limit:
            return text
        while limit < MAX_CHARS_PER_TOKEN * length:
            head = text[:limit]
            enc = self.tokenizer.encode(head)
            if enc.overflowing:
                end = max((e for _, e in enc.offsets), default=0)
                if _WHITESPACE.search(head, end) is not None:
                    return head  # the kept tokens end before a word boundary that precedes the cut
            limit *= 2
        return text[: MAX_CHARS_PER_TOKEN * length]

    def encode(self, items: Sequence[Any], offset: int = 0) -> Tokenized:
        """Validate and tokenise a chunk of items; indices are ``offset``-based."""
        indices, texts, errors, empty = self.validate(items, offset)
        out = Tokenized(errors=errors)
        out.stats.total = len(items)
        out.stats.empty = empty
        cut = set()
        for k, (i, text) in enumerate(zip(indices, texts)):
            head = self.bounded(text)
            if head is not text or isinstance(items[i - offset], Clipped):
                texts[k] = head
                cut.add(i)
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


def iter_chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Yield lists of up to ``size`` items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
