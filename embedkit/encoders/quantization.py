"""What int8 variants cost on the user's own data: fp32 vs each variant, cosine, speed and head
accuracy (:func:`quantization_report`), and the variant worth using (:func:`recommend`)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..models.probes import cosine
from ..models.quantization import VARIANTS, quantize
from ..models.resolve import resolve
from ..models.store import Artifact, ModelStore
from .image import ImageEncoder
from .text import TextEncoder


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
        encoder = (ImageEncoder if art.modality == "image" else TextEncoder)(art, threads=threads)
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
