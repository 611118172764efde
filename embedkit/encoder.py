"""Encoding: items -> policy + tokens -> length-sorted token-budget batches -> ONNX Runtime."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .artifacts import Artifact
from .errors import ArtifactError
from .runtime import Runtime
from .text import ItemError, TextStats, TextTokenizer, iter_chunks, pad, token_batches

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 384
CHUNK = 4096


@dataclass
class Embeddings:
    """The result of encoding a sequence of items.

    ``vectors`` has one row per input item in input order; rows of failed items are NaN and
    ``ok`` is False there, with the reason in ``errors`` (ok + failed == total, always).
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: list[ItemError] = field(default_factory=list)
    stats: TextStats = field(default_factory=TextStats)
    seconds: float = 0.0


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
    ):
        self.artifact = artifact
        self.tokenizer = TextTokenizer(artifact.preprocess, truncate=truncate, empty=empty)
        self.runtime = Runtime(artifact.onnx_path, device=device, threads=threads, streams=streams)
        self.batch_tokens = batch_tokens or (DEFAULT_BATCH_TOKENS if self.runtime.device == "cpu" else 16384)
        self.dim = artifact.dim

    def encode(self, items: Iterable[Any], progress: Callable[[int], None] | None = None) -> Embeddings:
        """Embed ``items`` (see :mod:`embedkit.text` for the input policy)."""
        start = time.perf_counter()
        rows: list[np.ndarray] = []
        oks: list[np.ndarray] = []
        result = Embeddings(np.empty((0, self.dim), np.float32), np.empty(0, bool))
        offset = 0
        for chunk in iter_chunks(items, CHUNK):
            vectors, ok = self._encode_chunk(chunk, offset, result)
            rows.append(vectors)
            oks.append(ok)
            offset += len(chunk)
            if progress is not None:
                progress(len(chunk))
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

    def _encode_chunk(self, chunk: Sequence[Any], offset: int, result: Embeddings) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer.encode(chunk, offset)
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


def embed(
    items: Iterable[Any],
    backbone: str = "minilm-l6",
    store: str | None = None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> Embeddings:
    """Embed items with a backbone; bad items become error records, never a crash.

    ``options`` go to :class:`TextEncoder` (device, threads, streams, batch_tokens,
    truncate, empty).
    """
    from .exporter import resolve

    return TextEncoder(resolve(backbone, store), **options).encode(items, progress=progress)
