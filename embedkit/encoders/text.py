"""Texts -> embeddings with one artifact, without torch.

Policy + tokens (:mod:`embedkit.inputs.text`) -> length-sorted token-budget batches -> a runtime
(:mod:`embedkit.runtimes`); tokenising the next chunk overlaps running this one.
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
from ..models.store import Artifact
from ..runtimes.select import make_runtime
from .embeddings import Embeddings

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 384
CHUNK = 4096
TEXT_OPTIONS = ("device", "threads", "streams", "batch_tokens", "truncate", "empty", "runtime")


class TextEncoder:
    """Turns texts into embeddings with one artifact, without torch."""

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        threads: int | None = None,
        streams: int | None = None,
        batch_tokens: int | None = None,
        truncate: bool = True,
        empty: str = "embed",
        runtime: str = "auto",
    ):
        if artifact.modality != "text":
            raise ArtifactError(f"{artifact.name} is a {artifact.modality} artifact; TextEncoder needs a text one")
        self.artifact = artifact
        self.tokenizer = TextTokenizer(artifact.preprocess, truncate=truncate, empty=empty)
        self.runtime = make_runtime(artifact, runtime, device=device, threads=threads, streams=streams)
        if batch_tokens is not None and (not isinstance(batch_tokens, int) or batch_tokens < 1):
            raise ValueError(f"batch_tokens must be a positive int or None, got {batch_tokens!r}")  # 0 is not "default"
        self.batch_tokens = batch_tokens or (DEFAULT_BATCH_TOKENS if self.runtime.device == "cpu" else 16384)
        self.dim = artifact.dim

    def encode(self, items: Iterable[Any], progress: Callable[[int], None] | None = None) -> Embeddings:
        """Embed ``items`` (see :mod:`embedkit.inputs.text` for the input policy)."""
        start = time.perf_counter()
        rows: list[np.ndarray] = []
        oks: list[np.ndarray] = []
        result = Embeddings(np.empty((0, self.dim), np.float32), np.empty(0, bool))
        offset = 0
        # Tokenising chunk k+1 (in a thread: tokenizers releases the GIL) overlaps running chunk k.
        with ThreadPoolExecutor(1, thread_name_prefix="embedkit-tokenize") as pool:
            ahead: tuple[list[Any], int, Future] | None = None
            for chunk in iter_chunks(items, CHUNK):
                job = (chunk, offset, pool.submit(self.tokenizer.encode, chunk, offset))
                offset += len(chunk)
                if ahead is not None:
                    self._finish_chunk(ahead, result, rows, oks, progress)
                ahead = job
            if ahead is not None:
                self._finish_chunk(ahead, result, rows, oks, progress)
        if rows:
            result.vectors = np.concatenate(rows)
            result.ok = np.concatenate(oks)
        result.seconds = time.perf_counter() - start
        logger.info(
            "encoded %d items with %s (%s): %d ok, %d failed, %d truncated in %.2fs",
            result.stats.total, self.artifact.name, self.artifact.digest[:12], result.stats.ok,
            result.stats.failed, result.stats.truncated, result.seconds,
        )
        return result

    def _finish_chunk(self, job: tuple[list[Any], int, Future], result: Embeddings, rows: list[np.ndarray],
                      oks: list[np.ndarray], progress: Callable[[int], None] | None) -> None:
        chunk, offset, tokens = job
        vectors, ok = self._encode_chunk(chunk, offset, tokens.result(), result)
        rows.append(vectors)
        oks.append(ok)
        if progress is not None:
            progress(len(chunk))

    def _encode_chunk(self, chunk: Sequence[Any], offset: int, tokens: Any, result: Embeddings) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.full((len(chunk), self.dim), np.nan, dtype=np.float32)
        ok = np.zeros(len(chunk), dtype=bool)
        errors = list(tokens.errors)
        if tokens.ids:
            lengths = [len(x) for x in tokens.ids]
            batches = token_batches(lengths, self.batch_tokens)
            feeds = (pad([tokens.ids[j] for j in batch]) for batch in batches)
            for batch, out in zip(batches, self.runtime.map(feeds)):
                rows = np.asarray(tokens.indices)[batch] - offset
                self._check(out, len(batch))
                finite = np.isfinite(out).all(axis=1)
                vectors[rows[finite]] = out[finite]
                ok[rows[finite]] = True
                for r in rows[~finite]:
                    errors.append(ItemError(int(r) + offset, "non_finite", "model", "the model output NaN or inf"))
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
