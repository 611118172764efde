"""int8 variants of an artifact for CPU, and a report of what they cost on the user's own data.

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

from .artifacts import MODEL, Artifact, ModelStore
from .errors import MissingDependencyError

logger = logging.getLogger(__name__)

VARIANTS = ("dynamic", "dynamic-per-tensor", "static")


def _calibration_batches(artifact: Artifact, items: Sequence[Any], batch: int = 16) -> list[dict[str, np.ndarray]]:
    if artifact.modality == "image":
        from .image import ImageProcessor, ItemFailure, stack

        processor = ImageProcessor(artifact.preprocess)
        rows = []
        for item in items:
            try:
                rows.append(processor(item)[0])
            except ItemFailure:
                continue
        return [stack(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    from .text import TextTokenizer, pad

    ids = TextTokenizer(artifact.preprocess).encode(list(items)).ids
    return [pad(ids[i:i + batch]) for i in range(0, len(ids), batch)]


def quantize(
    artifact: Artifact | str,
    variant: str = "dynamic",
    calibration: Sequence[Any] | None = None,
    store: ModelStore | str | None = None,
) -> Artifact:
    """An int8 variant of an artifact, written to the model store (reused when present)."""
    from .exporter import resolve

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


def quantization_report(
    artifact: Artifact | str,
    items: Sequence[Any],
    labels: Sequence[Any] | None = None,
    variants: Sequence[str] = VARIANTS,
    store: ModelStore | str | None = None,
    holdout: float = 0.3,
    seed: int = 0,
    threads: int | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """fp32 vs each int8 variant on the user's items: cosine to fp32, speed and head accuracy.

    Items are split into a part for calibration / head training and a held-out part (``holdout``)
    on which cosine and accuracy are measured; with labels, a LogisticRegression head trained on
    each variant's own features is scored on the held-out items. ``progress(done, total)`` is
    called after each variant. Read the rows with :func:`recommend`.
    """
    from .encoder import encoder_for
    from .exporter import resolve

    base = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    cut = int(round(len(items) * (1 - holdout)))
    train_idx, test_idx = order[:cut], order[cut:]
    train_items = [items[i] for i in train_idx]
    test_items = [items[i] for i in test_idx]
    rows: list[dict[str, Any]] = []
    reference = None
    for variant in ("fp32",) + tuple(variants):
        art = base if variant == "fp32" else quantize(base, variant, calibration=train_items[:256], store=store)
        encoder = encoder_for(art, threads=threads)
        encoder.encode(test_items[:32])  # warm-up
        started = time.perf_counter()
        test = encoder.encode(test_items)
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "variant": variant, "name": art.name, "digest": art.digest,
            "items_per_s": len(test_items) / seconds if seconds > 0 else float("nan"),
            "size_mb": art.onnx_path.stat().st_size / 1e6,
        }
        if reference is None:
            reference = test.vectors
        from .probes import cosine

        both = test.ok & np.isfinite(reference).all(axis=1)
        cos = cosine(test.vectors[both], reference[both])
        row["mean_cosine"] = float(cos.mean()) if len(cos) else float("nan")
        row["min_cosine"] = float(cos.min()) if len(cos) else float("nan")
        if labels is not None:
            from sklearn.linear_model import LogisticRegression

            y = np.asarray(labels, dtype=object)
            train = encoder.encode(train_items)
            head = LogisticRegression(max_iter=2000).fit(train.vectors[train.ok], y[train_idx][train.ok])
            keep = test.ok
            row["accuracy"] = float((head.predict(test.vectors[keep]) == y[test_idx][keep]).mean())
        rows.append(row)
        if progress is not None:
            progress(len(rows), 1 + len(variants))
    base_rate = rows[0]["items_per_s"]
    for row in rows:
        row["speedup"] = row["items_per_s"] / base_rate
    return rows


# When an int8 variant is worth using instead of fp32 (quantization_report rows).
MIN_MEAN_COSINE = 0.99
MAX_ACCURACY_DROP = 0.01  # one accuracy point
MIN_SPEEDUP = 1.05  # a variant not measurably faster than fp32 only costs accuracy


def verdict(row: dict[str, Any], fp32: dict[str, Any]) -> tuple[bool, str]:
    """Whether one variant is worth using instead of fp32, and why (or why not)."""
    if row["variant"] == "fp32":
        return False, "the reference"
    reasons = []
    if not row["mean_cosine"] >= MIN_MEAN_COSINE:
        reasons.append(f"mean cosine {row['mean_cosine']:.4f} < {MIN_MEAN_COSINE}")
    if "accuracy" in row and not row["accuracy"] >= fp32["accuracy"] - MAX_ACCURACY_DROP:
        reasons.append(f"accuracy {100 * (row['accuracy'] - fp32['accuracy']):+.1f} points vs fp32")
    if not row["speedup"] >= MIN_SPEEDUP:
        reasons.append(f"not faster than fp32 ({row['speedup']:.2f}x)")
    if reasons:
        return False, "; ".join(reasons)
    accuracy = (f", accuracy {100 * (row['accuracy'] - fp32['accuracy']):+.1f} points" if "accuracy" in row else "")
    return True, f"{row['speedup']:.2f}x faster, mean cosine {row['mean_cosine']:.4f}{accuracy}"


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant to use: the fastest whose mean cosine to fp32 is >= 0.99, whose head accuracy
    (when measured) is within one point of fp32's, and which is at least 5 % faster; else fp32.

    Returns ``{"variant": name or "fp32", "reason": str, "verdicts": {variant: (ok, why)}}``.
    """
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    verdicts = {r["variant"]: verdict(r, fp32) for r in rows if r["variant"] != "fp32"}
    good = [r for r in rows if r["variant"] in verdicts and verdicts[r["variant"]][0]]
    if not good:
        return {"variant": "fp32", "reason": "none qualifies: keep fp32", "verdicts": verdicts}
    best = max(good, key=lambda r: r["items_per_s"])
    return {"variant": best["variant"], "name": best["name"],
            "reason": f"the fastest that qualifies: {verdicts[best['variant']][1]}", "verdicts": verdicts}
