"""Long texts as windows of the backbone's length, and the windows pooled back (``long="chunk"``).

The long-text policy (``long=``, beside the older ``truncate=``) of :class:`~embedkit.inputs.text.TextTokenizer`:

==============  =========================================================================
``long``        a text of more than ``max_length`` tokens (special tokens included)
==============  =========================================================================
``"truncate"``  its first ``max_length`` tokens are embedded; counted in ``stats.truncated``
                (the default; ``truncate=True``)
``"error"``     error ``too_long`` for that item (``truncate=False``)
``"chunk"``     split into windows, each embedded, the vectors pooled into the text's one
==============  =========================================================================

Windows (``long="chunk"``). The text is tokenised once, with its special tokens; its content
tokens (those between the tokenizer's leading and trailing special tokens, ``[CLS]`` and
``[SEP]`` for BERT) are cut into runs of ``C = max_length - specials`` consecutive tokens, each
starting ``C - chunk_overlap`` tokens after the one before (neighbours share ``chunk_overlap``
tokens), the last run ending at the text's last token (so it may be shorter); each window is
the leading specials + its run + the trailing specials: a valid model input of at most
``max_length`` ids, exactly what the tokenizer gives for that run alone. Window 0 of a long text
equals the truncated text's ids; a text of at most ``max_length`` tokens is one window with the
very ids (and, unpooled, the very vector, bit for bit) of ``long="truncate"``.

Pooling: the text's vector is the mean of its windows' vectors weighted by each window's token
count (its ids, special tokens included: the tokens the model attended to, so for a mean-pooled
backbone it is the mean over every token the windows saw), computed in float64, then
L2-normalised when the artifact declares ``normalize=True`` (:class:`~embedkit.backbones.backbone.TextPreprocess`),
as the backbone normalises one window. This is vLLM's ``enable_chunked_processing`` aggregation
("weighted averaging based on chunk token counts", vllm-project/vllm
examples/pooling/embed/openai_embedding_long_text/README.md), with overlapping windows;
sentence-transformers has none (its issue 2268 asks for it).

Bounded work: at most ``max_chunks`` windows per text (default :data:`DEFAULT_MAX_CHUNKS`), that
is ``C + (max_chunks - 1) * (C - chunk_overlap)`` content tokens; a longer text is embedded from
that many windows of its start and counted in ``stats.truncated``. As for truncation, a text is
cut before tokenising at ``CHARS_PER_TOKEN`` characters per kept token where the kept tokens
provably end (the vector is the full text's), the cut doubling until that holds; it never tokenises
more than ``max(MAX_CHARS_PER_TOKEN * max_length, 2 * CHARS_PER_TOKEN * kept tokens)``
characters (MiniLM, 64 windows, overlap 32: 456,320 characters, ~64 MB of tokenizer memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LONG_POLICIES = ("truncate", "chunk", "error")
DEFAULT_OVERLAP = 32
DEFAULT_MAX_CHUNKS = 64


def long_policy(long: Any, truncate: Any) -> str:
    """The long-text policy from ``long`` and the older ``truncate`` (None: not given).

    ``truncate=False`` is ``long="error"`` (with ``long`` at its default ``"truncate"``);
    ``truncate=True`` agrees with ``"truncate"`` and ``"chunk"`` (which truncates past
    ``max_chunks``). Raises ValueError for an unknown policy or a contradiction
    (``truncate=False, long="chunk"``; ``truncate=True, long="error"``).
    """
    if long not in LONG_POLICIES:
        raise ValueError(f"long must be one of {', '.join(LONG_POLICIES)}, got {long!r}")
    if truncate is None:
        return str(long)
    if not isinstance(truncate, bool):
        raise ValueError(f"truncate must be True, False or None, got {truncate!r}")
    if truncate is False:
        if long == "chunk":
            raise ValueError("truncate=False contradicts long='chunk'; use long='error' to refuse long texts, "
                             "or long='chunk' alone")
        return "error"
    if long == "error":
        raise ValueError("truncate=True contradicts long='error'; pass one of them")
    return str(long)


@dataclass
class Windows:
    """The windows of a :class:`~embedkit.inputs.text.Tokenized` under ``long="chunk"``, one entry per row.

    ``chunk[k]`` is row k's window number within its text (0-based; an item's rows are
    consecutive, in order); ``token_spans[k]`` is ``(start, end)``, the window's content tokens
    as a half-open range of the text's content tokens (special tokens not counted);
    ``char_spans[k]`` is ``(start, end)``, the characters those tokens came from in the text (a
    ``str`` index range, of a ``bytes`` item's UTF-8 decoding; ``(0, 0)`` for an empty text).
    """

    chunk: list[int] = field(default_factory=list)
    token_spans: list[tuple[int, int]] = field(default_factory=list)
    char_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Chunks:
    """Per-window rows of an encoding with ``long="chunk"`` (``TextEncoder.encode(..., chunk_rows=True)``).

    One row per window of every embedded item (``ok``), ordered by item then window; a text
    within the window has one row whose vector is the item's. M is the number of rows, D the
    backbone's dimension.

    Attributes:
        vectors: (M, D) float32, each window's vector as the model returned it (not pooled).
        item: (M,) int64, the index of the window's item in the input.
        chunk: (M,) int64, the window's number within its item, from 0.
        token_span: (M, 2) int64, ``[start, end)`` of the window's content tokens among the
            item's content tokens (special tokens not counted).
        char_span: (M, 2) int64, ``[start, end)`` of the characters of those tokens in the item's
            text (``text[start:end]`` is the passage; for ``bytes`` items, in their UTF-8 decoding).
    """

    vectors: np.ndarray
    item: np.ndarray
    chunk: np.ndarray
    token_span: np.ndarray
    char_span: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "Chunks":
        return cls(np.empty((0, dim), np.float32), np.empty(0, np.int64), np.empty(0, np.int64),
                   np.empty((0, 2), np.int64), np.empty((0, 2), np.int64))

    def __len__(self) -> int:
        return len(self.item)


class Splitter:
    """Cuts one tokenised text into windows (see the module).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, used only to find its special tokens.
        max_length: ids per window at most, special tokens included.
        overlap: content tokens shared by neighbouring windows; ``0 <= overlap < C / 2``
            (C: content tokens per window).
        max_chunks: windows per text at most (>= 1).

    Raises:
        ValueError: a bad ``overlap`` or ``max_chunks``, or a tokenizer that adds special tokens
            anywhere but at the ends of a text (its windows could not be cut from one encoding).
    """

    def __init__(self, tokenizer: Any, max_length: int, overlap: int, max_chunks: int):
        probe, bare = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
        starts = [k for k in range(len(probe) - len(bare) + 1) if probe[k : k + len(bare)] == bare]
        if not bare or not starts:
            raise ValueError("long='chunk' needs a tokenizer that adds special tokens only before and after a text")
        self.prefix, self.suffix = probe[: starts[0]], probe[starts[0] + len(bare):]
        self.content = max_length - len(self.prefix) - len(self.suffix)  # C
        if self.content < 2:
            raise ValueError(f"max_length={max_length} leaves {self.content} content tokens per window; "
                             "long='chunk' needs at least 2")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= 2 * overlap < self.content:
            raise ValueError(f"chunk_overlap must be an int with 0 <= chunk_overlap < {self.content / 2:g} (half of "
                             f"the {self.content} content tokens of a {max_length}-token window), got {overlap!r}")
        if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1:
            raise ValueError(f"max_chunks must be a positive int, got {max_chunks!r}")
        self.overlap, self.max_chunks = overlap, max_chunks
        self.step = self.content - overlap
        # ids per text kept at most, special tokens included: the tokenizer truncates there
        self.kept = len(self.prefix) + self.content + (max_chunks - 1) * self.step + len(self.suffix)

    def split(self, ids: list[int], offsets: list[tuple[int, int]]) -> list[tuple[list[int], tuple[int, int], tuple[int, int]]]:
        """(window ids, token span, char span) of each window of one encoding (ids with specials)."""
        head, tail = len(self.prefix), len(ids) - len(self.suffix)
        n = tail - head
        if ids[:head] != self.prefix or ids[tail:] != self.suffix or n < 0:
            raise ValueError("the tokenizer's special tokens are not where its probe put them")
        if n <= self.content:
            return [(ids, (0, n), _chars(offsets, head, tail))]
        windows = []
        start = 0
        while True:
            end = min(start + self.content, n)
            windows.append((self.prefix + ids[head + start : head + end] + self.suffix, (start, end),
                            _chars(offsets, head + start, head + end)))
            if end == n:
                return windows
            start += self.step


def _chars(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    return (offsets[start][0], offsets[end - 1][1]) if end > start else (0, 0)


def pool(rows: np.ndarray, parents: np.ndarray, weights: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pool window vectors into one vector per parent item.

    Args:
        rows: (R, D) float32 window vectors; an item's rows are consecutive.
        parents: (R,) the item of each row.
        weights: (R,) each window's token count.
        normalize: L2-normalise the pooled vectors (of items of more than one window).

    Returns:
        ``(vectors (K, D) float32, items (K,) int64)``: one row per distinct item, in order. An
        item of one window gets that row itself (bit for bit); a non-finite window makes its
        item's vector non-finite.
    """
    parents = np.asarray(parents, dtype=np.int64)
    if len(parents) == 0:
        return np.empty((0, rows.shape[1]), np.float32), parents
    starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
    counts = np.diff(np.r_[starts, len(parents)])
    out = rows[starts].copy()
    multi = counts > 1
    if multi.any():
        w = np.asarray(weights, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            sums = np.add.reduceat(rows.astype(np.float64) * w[:, None], starts)[multi]
            mean = sums / np.add.reduceat(w, starts)[multi][:, None]
            if normalize:
                norm = np.linalg.norm(mean, axis=1, keepdims=True)
                mean = np.where(norm > 0, mean / np.where(norm > 0, norm, 1.0), mean)
        out[multi] = mean.astype(np.float32)
    return out, parents[starts]


def to_items(rows: np.ndarray, parents: Any, weights: Any, normalize: bool, n: int,
             offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (one per window, or per item) -> the (n, D) vectors of items ``offset .. offset + n - 1``.

    Returns ``(vectors (n, D) float32, NaN where not embedded; ok (n,) bool; bad)``, ``bad`` the
    (K,) int64 indices (``offset``-based, as ``parents``) of items whose vector is not finite.
    Items without rows stay NaN, not ok and not bad (their error is recorded elsewhere).
    """
    out, items = pool(rows, np.asarray(parents, dtype=np.int64), np.asarray(weights), normalize)
    finite = np.isfinite(out).all(axis=1)
    vectors = np.full((n, rows.shape[1]), np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    vectors[items[finite] - offset] = out[finite]
    ok[items[finite] - offset] = True
    return vectors, ok, items[~finite]
