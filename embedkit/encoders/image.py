"""Images -> embeddings with one artifact, without torch.

Decode + preprocess in worker threads (PIL releases the GIL; :mod:`embedkit.inputs.image`) ->
fixed-size batches -> a runtime, overlapped through a bounded window so memory stays flat on
any input length.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ArtifactError
from ..inputs.image import DEFAULT_MAX_PIXELS, ImageProcessor, ImageStats, stack
from ..inputs.items import ItemError, ItemFailure
from ..models.store import Artifact
from ..runtimes.cpu import cpu_count
from ..runtimes.select import make_runtime
from .embeddings import Embeddings

logger = logging.getLogger(__name__)

IMAGE_OPTIONS = ("device", "threads", "streams", "batch_size", "workers", "max_pixels", "reject_blank", "runtime")


class ImageEncoder:
    """Turns images (paths, bytes, PIL images, numpy arrays) into embeddings, without torch.

    Args:
        artifact: an image artifact.
        device, threads, streams: see :class:`~embedkit.runtimes.onnx_runtime.Runtime`.
        runtime: ``auto`` (default: the faster one measured by :func:`embedkit.tune` on this
            device), ``onnxruntime`` or ``torch`` (see :mod:`embedkit.encoders.tuning`).
        batch_size: images per batch (default 16 on CPU, 128 on CUDA).
        workers: decoding threads (default: the cores this process may use).
        max_pixels, reject_blank: the decoding policy (see :mod:`embedkit.inputs.image`).
    """

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        threads: int | None = None,
        streams: int | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reject_blank: bool = True,
        runtime: str = "auto",
    ):
        if artifact.modality != "image":
            raise ArtifactError(f"{artifact.name} is a {artifact.modality} artifact; ImageEncoder needs an image one")
        for name, value in (("batch_size", batch_size), ("workers", workers)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.artifact = artifact
        self.processor = ImageProcessor(artifact.preprocess, max_pixels=max_pixels, reject_blank=reject_blank)
        self.runtime = make_runtime(artifact, runtime, device=device, threads=threads, streams=streams)
        self.batch_size = batch_size or (16 if self.runtime.device == "cpu" else 128)
        self.workers = workers or cpu_count()
        self.dim = artifact.dim

    def _decode(self, item: Any) -> tuple[np.ndarray, int]:
        return self.processor(item)

    def encode(self, items: Iterable[Any], progress: Callable[[int], None] | None = None) -> Embeddings:
        """Embed ``items``; failed items get NaN rows and an error record each."""
        start = time.perf_counter()
        stats = ImageStats()
        errors: list[ItemError] = []
        batches: list[list[int]] = []  # item indices of each batch, in submission order
        consumed: list[int] = []  # items resolved (ok or failed) when each batch was formed
        outputs: list[np.ndarray] = []
        window = 2 * self.batch_size + 2 * self.workers

        def decoded(pool: ThreadPoolExecutor) -> Iterator[tuple[int, Future]]:
            pending: deque[tuple[int, Future]] = deque()
            for index, item in enumerate(items):
                pending.append((index, pool.submit(self._decode, item)))
                if len(pending) >= window:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()

        def feeds(pool: ThreadPoolExecutor) -> Iterator[dict[str, np.ndarray]]:
            rows: list[np.ndarray] = []
            indices: list[int] = []
            for index, future in decoded(pool):
                stats.total += 1
                try:
                    pixels, area = future.result()
                except ItemFailure as failure:
                    errors.append(failure.record(index))
                    continue
                except Exception as exc:  # an unforeseen decoder error costs its item only
                    errors.append(ItemError(index, "decode_failed", "decode", f"{type(exc).__name__}: {exc}"))
                    continue
                stats.pixels += area
                rows.append(pixels)
                indices.append(index)
                if len(rows) == self.batch_size:
                    batches.append(indices)
                    consumed.append(stats.total)
                    yield stack(rows)
                    rows, indices = [], []
            if rows:
                batches.append(indices)
                consumed.append(stats.total)
                yield stack(rows)

        reported = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="embedkit-decode") as pool:
            for k, out in enumerate(self.runtime.map(feeds(pool))):
                if out.shape != (len(batches[k]), self.dim):
                    raise ArtifactError(
                        f"artifact {self.artifact.digest[:12]} returned shape {out.shape}, "
                        f"expected {(len(batches[k]), self.dim)}"
                    )
                outputs.append(out)
                if progress is not None:
                    progress(consumed[k] - reported)
                    reported = consumed[k]
        if progress is not None and stats.total > reported:
            progress(stats.total - reported)
        vectors = np.full((stats.total, self.dim), np.nan, dtype=np.float32)
        ok = np.zeros(stats.total, dtype=bool)
        for indices, out in zip(batches, outputs):
            rows = np.asarray(indices, dtype=np.int64)
            finite = np.isfinite(out).all(axis=1)
            vectors[rows[finite]] = out[finite]
            ok[rows[finite]] = True
            for r in rows[~finite]:
                errors.append(ItemError(int(r), "non_finite", "model", "the model output NaN or inf"))
        errors.sort(key=lambda e: e.index)
        stats.ok = int(ok.sum())
        stats.failed = len(errors)
        result = Embeddings(vectors, ok, errors, stats, time.perf_counter() - start)
        logger.info(
            "encoded %d images with %s (%s): %d ok, %d failed in %.2fs",
            stats.total, self.artifact.name, self.artifact.digest[:12], stats.ok, stats.failed, result.seconds,
        )
        return result
