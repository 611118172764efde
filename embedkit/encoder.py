"""Encoding items with an artifact, without torch.

Text: policy + tokens -> length-sorted token-budget batches -> ONNX Runtime.
Images: decode + preprocess in worker threads (PIL releases the GIL) -> fixed-size batches ->
ONNX Runtime, overlapped through a bounded window so memory stays flat on any input length.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .artifacts import Artifact
from .errors import ArtifactError
from .image import DEFAULT_MAX_PIXELS, ImageProcessor, ImageStats, ItemFailure, stack
from .runtime import cpu_count
from .text import ItemError, TextStats, TextTokenizer, iter_chunks, pad, token_batches
from .tuning import make_runtime

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
    stats: Any = field(default_factory=TextStats)  # TextStats or ImageStats
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
        """Embed ``items`` (see :mod:`embedkit.text` for the input policy)."""
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


class ImageEncoder:
    """Turns images (paths, bytes, PIL images, numpy arrays) into embeddings, without torch.

    Args:
        artifact: an image artifact.
        device, threads, streams: see :class:`~embedkit.runtime.Runtime`.
        runtime: ``auto`` (default: the faster one measured by :func:`embedkit.tune` on this
            device), ``onnxruntime`` or ``torch`` (see :mod:`embedkit.tuning`).
        batch_size: images per batch (default 16 on CPU, 128 on CUDA).
        workers: decoding threads (default: the cores this process may use).
        max_pixels, reject_blank: the decoding policy (see :mod:`embedkit.image`).
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


TEXT_OPTIONS = ("device", "threads", "streams", "batch_tokens", "truncate", "empty", "runtime")
IMAGE_OPTIONS = ("device", "threads", "streams", "batch_size", "workers", "max_pixels", "reject_blank", "runtime")


def encoder_for(artifact: Artifact, **options: Any) -> "TextEncoder | ImageEncoder":
    """The encoder for the artifact's modality; options of the other modality are refused."""
    cls, allowed = (ImageEncoder, IMAGE_OPTIONS) if artifact.modality == "image" else (TextEncoder, TEXT_OPTIONS)
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise TypeError(
            f"{', '.join(unknown)} do not apply to {artifact.modality} backbones; options: {', '.join(allowed)}"
        )
    return cls(artifact, **{k: v for k, v in options.items() if k in allowed and v is not None})


def embed(
    items: Iterable[Any],
    backbone: str = "minilm-l6",
    store: str | None = None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> Embeddings:
    """Embed items with a backbone; bad items become error records, never a crash.

    ``options`` go to :class:`TextEncoder` (device, threads, streams, batch_tokens,
    truncate, empty, runtime) or :class:`ImageEncoder` (device, threads, streams, runtime, batch_size,
    workers, max_pixels, reject_blank), by the backbone's modality.
    """
    from .exporter import resolve

    return encoder_for(resolve(backbone, store), **options).encode(items, progress=progress)
