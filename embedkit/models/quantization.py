"""int8 variants of an artifact for CPU (what they cost on the user's own data: :mod:`embedkit.encoders.quantization`).

Variants (ONNX Runtime quantization):

- ``dynamic``: int8 weights per output channel, activations quantised on the fly (best
  accuracy of the three for transformers).
- ``dynamic-per-tensor``: one scale per weight tensor (faster kernels, lower accuracy).
- ``static``: QDQ int8 weights and activations, activation ranges calibrated on a sample of
  the user's items.

A variant is an artifact of its own (``<name>-int8-<variant>``) with its own digest, so its
features get their own namespace in a feature store and heads trained on fp32 features are
never silently reused with int8 ones.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import MissingDependencyError
from ..inputs.image import ImageProcessor, stack
from ..inputs.items import ItemFailure
from ..inputs.text import TextTokenizer, pad
from .resolve import resolve
from .store import MODEL, Artifact, ModelStore

logger = logging.getLogger(__name__)

VARIANTS = ("dynamic", "dynamic-per-tensor", "static")


def _calibration_batches(artifact: Artifact, items: Sequence[Any], batch: int = 16) -> list[dict[str, np.ndarray]]:
    if artifact.modality == "image":
        processor = ImageProcessor(artifact.preprocess)
        rows = []
        for item in items:
            try:
                rows.append(processor(item)[0])
            except ItemFailure:
                continue
        return [stack(rows[i:i + batch]) for i in range(0, len(rows), batch)]

    ids = TextTokenizer(artifact.preprocess).encode(list(items)).ids
    return [pad(ids[i:i + batch]) for i in range(0, len(ids), batch)]


def quantize(
    artifact: Artifact | str,
    variant: str = "dynamic",
    calibration: Sequence[Any] | None = None,
    store: ModelStore | str | None = None,
) -> Artifact:
    """An int8 variant of an artifact, written to the model store (reused when present)."""

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    base = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    name = f"{base.name}-int8-{variant}"
    key = f"{base.digest}:{variant}"
    if variant == "static":
        if not calibration:
            raise ValueError("static int8 needs calibration items (a sample of your data)")
        key += ":" + sha256_of_items(calibration)
    found = store.variants(name, "quantization", key)
    if found is not None:
        return found
    try:
        from onnxruntime import quantization as q
    except ImportError as exc:  # pragma: no cover - onnxruntime always ships it
        raise MissingDependencyError("onnxruntime.quantization", "", "int8 quantization") from exc
    started = time.perf_counter()
    staging = store.staging(name)
    try:
        target = staging / MODEL
        if variant == "static":
            batches = _calibration_batches(base, calibration)  # type: ignore[arg-type]
            inputs = set(base.manifest.get("inputs", []))

            class Reader(q.CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter([{k: v for k, v in b.items() if k in inputs} for b in batches])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.it, None)

            with _quiet():
                # Only the matrix products: int8 LayerNorm / Softmax / GELU ruin transformer outputs.
                q.quantize_static(
                    str(base.onnx_path), str(target), Reader(), quant_format=q.QuantFormat.QDQ,
                    per_channel=True, weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                )
        else:
            with _quiet():
                q.quantize_dynamic(
                    str(base.onnx_path), str(target), per_channel=(variant == "dynamic"),
                    weight_type=q.QuantType.QInt8,
                )
        result = store.commit_variant(base, staging, name, "quantization", {
            "variant": variant, "key": key, "seconds": round(time.perf_counter() - started, 2)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("quantized %s -> %s (%s)", base.name, result.digest[:12], variant)
    return result


class _ToDebug(logging.Filter):
    """ONNX Runtime's quantizer warns on the root logger about things that are fine here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname:
            logger.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _ToDebug()
    root.addFilter(quiet)  # logging.warning() calls are filtered at the root logger itself
    try:
        yield
    finally:
        root.removeFilter(quiet)


def sha256_of_items(items: Sequence[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode("utf-8", "surrogatepass")[:4096])
    return h.hexdigest()[:16]
