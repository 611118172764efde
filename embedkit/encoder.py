"""The route from a backbone to an encoder: :func:`encoder_for` and :func:`embed`.

spec -> :func:`~embedkit.resolve` (an artifact, exported on first use) -> the runtime choice
(explicit, or the measurement recorded by :func:`~embedkit.tune`; on CUDA with no record the
measurement is made here, once, and logged) -> :class:`~embedkit.TextEncoder` or
:class:`~embedkit.ImageEncoder` by the artifact's modality. Every caller that encodes items
(``embed``, ``Embedder``, extraction, the service, saved heads) comes through here.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from .encoders.embeddings import Embeddings
from .encoders.image import IMAGE_OPTIONS, ImageEncoder
from .encoders.text import TEXT_OPTIONS, TextEncoder
from .encoders.tuning import tune
from .models.resolve import resolve
from .models.store import Artifact
from .runtimes.records import recorded
from .runtimes.select import actual_device

logger = logging.getLogger(__name__)

__all__ = ["Embeddings", "ImageEncoder", "TextEncoder", "embed", "encoder_for"]


def _measure_first_use(artifact: Artifact, device: str) -> None:
    """On CUDA the faster runtime differs by network (MiniLM: ONNX Runtime; ResNet-50: torch, per
    DEVICE.md), so an artifact with no record there is measured once, here, in the open: logged
    before and after. A failed measurement is logged and ONNX Runtime is used."""
    if device != "cuda" or recorded(artifact, device) is not None:
        return
    logger.info("no runtime measurement of %s on %s yet: measuring the candidates once (embedkit.tune)",
                artifact.name, device)
    started = time.perf_counter()
    try:
        record = tune(artifact, device)
    except Exception as exc:  # noqa: BLE001 - measuring is an optimisation; ONNX Runtime still works
        logger.warning("could not tune %s on %s (%s); using ONNX Runtime", artifact.name, device, exc)
        return
    logger.info("measured %s on %s in %.1fs: %s", artifact.name, device, time.perf_counter() - started,
                record["choice"])


def encoder_for(artifact: Artifact, **options: Any) -> "TextEncoder | ImageEncoder":
    """The encoder for the artifact's modality; options of the other modality are refused."""
    cls, allowed = (ImageEncoder, IMAGE_OPTIONS) if artifact.modality == "image" else (TextEncoder, TEXT_OPTIONS)
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise TypeError(
            f"{', '.join(unknown)} do not apply to {artifact.modality} backbones; options: {', '.join(allowed)}"
        )
    if options.get("runtime", "auto") in ("auto", None):
        _measure_first_use(artifact, actual_device(options.get("device") or "cpu"))
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
    return encoder_for(resolve(backbone, store), **options).encode(items, progress=progress)
