"""Texts -> embeddings with one artifact, without torch.

Policy + tokens (:mod:`embedkit.inputs.text`) -> length-sorted token-budget batches -> a runtime
(:mod:`embedkit.runtimes`); tokenising the next chunk overlaps running this one. With
``long="chunk"`` the rows are windows (:mod:`embedkit.inputs.windows`), batched with every other
row, and pooled into one vector per text after the runtime.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ArtifactError
from ..inputs.items import ItemError
from ..inputs.text import TextTokenizer, iter_chunks, pad, token_batches
from ..inputs.windows import DEFAULT_MAX_CHUNKS, DEFAULT_OVERLAP, Chunks, to_items
from ..models.store import Artifact
from ..runtimes.select import make_runtime
from .embeddings import Embeddings

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 384
CHUNK = 4096
# long="chunk": a list of items also ends at this many characters (~1M tokens of English, ~4,000
# windows), so its token ids (~36 bytes a token as Python lists) and window rows stay ~50 MB.
CHUNK_CHARS = 4 * 2**20
TEXT_OPTIONS = ("device", "threads", "streams", "batch_tokens", "truncate", "empty", "runtime", "long",
                "chunk_overlap", "max_chunks")


class TextEncoder:
    """Turns texts into embeddings with one artifact, without torch.

    Args:
        artifact: a text artifact.
        device, threads, streams, runtime: where and how the graph runs (:func:`embedkit.runtimes.select.make_runtime`).
        batch_tokens: padded tokens per batch (default 384 on CPU, 16384 on CUDA).
        truncate: the older spelling of ``long`` (None: follow ``long``; False: ``long="error"``).
        empty: ``"embed"`` | ``"error"`` for texts with no visible character.
        long: ``"truncate"`` (default) | ``"chunk"`` | ``"error"`` for texts over the backbone's
            ``max_length`` tokens (:mod:`embedkit.inputs.windows`).
        chunk_overlap: ``long="chunk"``: tokens shared by neighbouring windows (default 32).
        max_chunks: ``long="chunk"``: windows per text at most (default 64).

    Raises:
        ArtifactError: not a text artifact.
        ValueError: a bad policy value or combination (:class:`~embedkit.inputs.text.TextTokenizer`).
    """

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        threads: int | None = None,
        streams: int | None = None,
        batch_tokens: int | None = None,
        truncate: bool | None = None,
        empty: str = "embed",
        runtime: str = "auto",
        long: str = "truncate",
        chunk_overlap: int = DEFAULT_OVERLAP,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
    ):
        if artifact.modality != "text":
            raise ArtifactError(f"{artifact.name} is a {artifact.modality} artifact; TextEncoder needs a text one")
        self.artifact = artifact
        self.tokenizer = TextTokenizer(artifact.preprocess, truncate=truncate, empty=empty, long=long,
                                       chunk_overlap=chunk_overlap, max_chunks=max_chunks)
        self.runtime = make_runtime(artifact, runtime, device=device, threads=threads, streams=streams)
        if batch_tokens is not None and (not isinstance(batch_tokens, int) or batch_tokens < 1):
            raise ValueError(f"batch_tokens must be a positive int or None, got {batch_tokens!r}")  # 0 is not "default"
        self.batch_tokens = batch_tokens or (DEFAULT_BATCH_TOKENS if self.runtime.device == "cpu" else 16384)
        self.dim = artifact.dim

    @property
    def long(self) -> str:
        """The long-text policy in force: ``"truncate"``, ``"chunk"`` or ``"error"``."""
        return self.tokenizer.long

    def identity(self) -> dict[str, Any]:
        """What of the text policy changes vectors, beside the artifact: ``{}`` (truncate, error), or
        ``{"long": "chunk", "chunk_overlap": int, "max_chunks": int}``; a feature store keys on it."""
        return self.tokenizer.identity()

    def encode(self, items: Iterable[Any], progress: Callable[[int], None] | None = None,
               chunk_rows: bool = False) -> Embeddings:
        """Embed ``items`` (see :mod:`embedkit.inputs.text` for the input policy).

        Returns :class:`Embeddings`: ``vectors`` (N, D) float32, one row per item in input order.
        With ``chunk_rows=True`` (only with ``long="chunk"``; else ValueError) its ``chunks`` also
        holds every window's vector with its item, window number, token and character spans
        (:class:`~embedkit.inputs.windows.Chunks`); otherwise ``chunks`` is None.
        """
        if chunk_rows and self.tokenizer.splitter is None:
            raise ValueError(f"chunk_rows=True needs long='chunk'; this encoder's policy is long={self.long!r}")
        start = time.perf_counter()
        rows: list[np.ndarray] = []
        oks: list[np.ndarray] = []
        result = Embeddings(np.empty((0, self.dim), np.float32), np.empty(0, bool))
        parts: list[Chunks] | None = [] if chunk_rows else None
        offset = 0
        # Tokenising chunk k+1 (in a thread: tokenizers releases the GIL) overlaps running chunk k.
        with ThreadPoolExecutor(1, thread_name_prefix="embedkit-tokenize") as pool:
            ahead: tuple[list[Any], int, Future] | None = None
            for chunk in iter_chunks(items, CHUNK, CHUNK_CHARS if self.tokenizer.splitter is not None else None):
                job = (chunk, offset, pool.submit(self.tokenizer.encode, chunk, offset))
                offset += len(chunk)
                if ahead is not None:
                    self._finish_chunk(ahead, result, rows, oks, progress, parts)
                ahead = job
            if ahead is not None:
                self._finish_chunk(ahead, result, rows, oks, progress, parts)
        if rows:
            result.vectors = np.concatenate(rows)
            result.ok = np.concatenate(oks)
        if parts is not None:
            result.chunks = Chunks(*(np.concatenate([getattr(p, f) for p in parts] or [getattr(Chunks.empty(self.dim), f)])
                                     for f in ("vectors", "item", "chunk", "token_span", "char_span")))
        result.seconds = time.perf_counter() - start
        s = result.stats
        chunked = f", {s.chunked} chunked ({s.chunks} windows)" if self.tokenizer.splitter is not None else ""
        logger.info(
            "encoded %d items with %s (%s): %d ok, %d failed, %d truncated%s in %.2fs",
            s.total, self.artifact.name, self.artifact.digest[:12], s.ok, s.failed, s.truncated, chunked, result.seconds,
        )
        return result

    def _finish_chunk(self, job: tuple[list[Any], int, Future], result: Embeddings, rows: list[np.ndarray],
                      oks: list[np.ndarray], progress: Callable[[int], None] | None, parts: list[Chunks] | None) -> None:
        chunk, offset, tokens = job
        vectors, ok = self._encode_chunk(chunk, offset, tokens.result(), result, parts)
        rows.append(vectors)
        oks.append(ok)
        if progress is not None:
            progress(len(chunk))

    def _run_rows(self, ids: list[list[int]]) -> np.ndarray:
        """(R, D) float32, one row per token id list, in length-sorted token-budget batches."""
        out_rows = np.empty((len(ids), self.dim), dtype=np.float32)
        batches = token_batches([len(x) for x in ids], self.batch_tokens)
        feeds = (pad([ids[j] for j in batch]) for batch in batches)
        for batch, out in zip(batches, self.runtime.map(feeds)):
            self._check(out, len(batch))
            out_rows[batch] = out
        return out_rows

    def _encode_chunk(self, chunk: Sequence[Any], offset: int, tokens: Any, result: Embeddings,
                      parts: list[Chunks] | None = None) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.full((len(chunk), self.dim), np.nan, dtype=np.float32)
        ok = np.zeros(len(chunk), dtype=bool)
        errors = list(tokens.errors)
        if tokens.ids:
            out = self._run_rows(tokens.ids)
            parents = np.asarray(tokens.indices, dtype=np.int64)
            # Windows -> one vector per text (an item of one row keeps that row, bit for bit).
            vectors, ok, bad = to_items(out, parents, [len(x) for x in tokens.ids],
                                        self.artifact.preprocess.normalize, len(chunk), offset)
            for i in bad:
                errors.append(ItemError(int(i), "non_finite", "model", "the model output NaN or inf"))
            if parts is not None and tokens.windows is not None:
                keep = ok[parents - offset]
                w = tokens.windows
                parts.append(Chunks(out[keep], parents[keep], np.asarray(w.chunk, np.int64)[keep],
                                    np.asarray(w.token_spans, np.int64).reshape(-1, 2)[keep],
                                    np.asarray(w.char_spans, np.int64).reshape(-1, 2)[keep]))
        errors.sort(key=lambda e: e.index)
        result.errors.extend(errors)
        stats = tokens.stats
        stats.failed = len(errors)
        stats.ok = int(ok.sum())
        result.stats.add(stats)
        return vectors, ok

    def _check(self, out: np.ndarray, n: int) -> None:
        if out.shape != (n, self.dim):
            raise ArtifactError(
                f"artifact {self.artifact.digest[:12]} returned shape {out.shape}, expected {(n, self.dim)}"
            )
