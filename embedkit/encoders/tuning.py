"""Runtime and precision selection by measurement: which runtime, in which precision, is fastest here.

``tune(artifact, device)`` runs a real encoder end to end with each candidate over the same items
(:func:`~embedkit.runtimes.table.candidates_for`: ONNX Runtime, torch, OpenVINO in fp32; OpenVINO bf16 and torch under bf16
autocast on a CPU with bf16 in hardware; the artifact's int8 variants that exist). Each candidate
is gated against the artifact's own ONNX Runtime CPU output, on the padded probe batches and on
the timed sample (:func:`~embedkit.runtimes.table.limits_for`: :data:`~embedkit.models.probes.LIMITS` for fp32 runtimes,
:data:`~embedkit.models.probes.BF16_LIMITS` (min cosine 0.9999) for reduced precision,
:data:`~embedkit.models.probes.FP16_LIMITS` for fp16 variants). The fastest that passes is recorded in
``<model store>/tuning/<digest>.json`` under a key naming the device (CPU model and cores, or
the GPU's name), with its precision and the CPU's matrix-engine flags. Encoders built with
``runtime="auto"`` (the default) use the recorded choice (:mod:`embedkit.runtimes.select`); on
CUDA the route (:func:`embedkit.encoder_for`) measures an artifact with no record once, as an
explicit logged step, since the answer differs by network (MiniLM: ONNX Runtime faster;
ResNet-50: torch faster, per DEVICE.md). On CPU, with no record, ONNX Runtime is used: it beat
torch eager 1.8x on MiniLM and 3.6x on MobileNetV2 here.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..errors import EmbedkitError
from ..inputs.image import probe_images
from ..inputs.samples import load_split
from ..models.probes import cosine, onnx_runner, passes, probes_for
from ..models.resolve import resolve
from ..models.store import Artifact, ModelStore
from ..runtimes import records
from ..runtimes.candidates import candidates_for, limits_for
from ..runtimes.cpu import describe
from ..runtimes.records import device_key
from .image import ImageEncoder
from .text import TextEncoder

logger = logging.getLogger(__name__)


def default_items(artifact: Artifact) -> list[Any]:
    """What to time when the user gives nothing: 1,000 shipped Banking77 sentences (real lengths),
    or the synthetic probe images of varied sizes (decoding included)."""
    if artifact.modality == "text":
        return load_split("train")[0][:1000]
    return list(probe_images()) * 8


def _encoder(artifact: Artifact, **options: Any) -> TextEncoder | ImageEncoder:
    """A real encoder with one explicit runtime (``options`` as :func:`embedkit.encoder_for` takes them)."""
    cls = ImageEncoder if artifact.modality == "image" else TextEncoder
    return cls(artifact, **{k: v for k, v in options.items() if v is not None})


def _rate(encoder: Any, items: list[Any], seconds: float) -> tuple[float, Any]:
    """Items/s of the encoder end to end (tokenising or decoding included), after a warm-up,
    and the last pass's :class:`~embedkit.encoder.Embeddings` (for the gate on the sample)."""
    encoder.encode(items[: max(1, len(items) // 4)])  # allocator, cudnn autotuning, compilation
    done, started = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        last = encoder.encode(items)
        done += 1
    return done * len(items) / (time.perf_counter() - started), last


def _sample_gate(got: Any, reference: Any) -> dict[str, Any]:
    """Cosine of a candidate's features to the reference's on the sample (items both embedded)."""
    both = np.asarray(got.ok, bool) & np.asarray(reference.ok, bool)
    if not both.any():
        return {"compared": 0, "min_cosine": float("nan"), "mean_cosine": float("nan")}
    cos = cosine(got.vectors[both], reference.vectors[both])
    return {"compared": int(both.sum()), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "failed_differently": int((np.asarray(got.ok, bool) != np.asarray(reference.ok, bool)).sum())}


def machine(device: str) -> dict[str, Any]:
    """What the record says about the hardware: the CPU's model and matrix-engine flags, and
    OpenVINO's view of it (``OPTIMIZATION_CAPABILITIES``, its default inference precision) when installed."""
    info: dict[str, Any] = {"cpu": describe()}
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino"] = {"version": ov.__version__,
                            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                            "default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))}
    except Exception:  # noqa: BLE001 - openvino absent: the record simply lacks it
        pass
    return info


def tune(artifact: Artifact | str, device: str = "cpu", items: list[Any] | None = None, seconds: float = 2.0,
         runtimes: tuple[str, ...] | None = None, threads: int | None = None,
         store: ModelStore | str | None = None, progress: Any = None, **options: Any) -> dict[str, Any]:
    """Measure each runtime on this device, gate it against fp32, record the fastest that passes.

    Each candidate (default: :func:`~embedkit.runtimes.table.candidates_for`) drives a real encoder over ``items``
    (default: :func:`default_items`; pass a sample of your own data for your lengths and sizes)
    end to end, as extraction will. ``options`` go to the encoder (e.g. ``batch_size``,
    ``batch_tokens``). The gate (:func:`~embedkit.runtimes.table.limits_for`) applies twice: on the padded probe batches
    against the artifact's ONNX Runtime CPU output, and on the sample against ONNX Runtime's
    features of the same items (min cosine). Returns the record, also written to the model
    store: ``choice``, its ``precision``, ``device``, ``machine`` (CPU model, matrix-engine flags,
    OpenVINO's capabilities) and per candidate ``items_per_s``, ``precision``, ``parity``,
    ``sample``, ``limits`` and ``passes`` (or ``error`` when it could not run here).
    ``progress(done, total)`` is called after each candidate.

    Raises:
        EmbedkitError: no candidate ran correctly (each one's reason in the message).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    artifact = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    items = list(items) if items is not None else default_items(artifact)
    runtimes = tuple(runtimes or candidates_for(device, artifact))
    probes = probes_for(artifact)
    reference = onnx_runner(artifact.onnx_path, probes.rank)
    # The sample's reference features: the artifact itself on ONNX Runtime's CPU provider.
    expected = _encoder(artifact, device="cpu", threads=threads, runtime="onnxruntime", **options).encode(items)
    candidates: dict[str, dict[str, Any]] = {}
    for name in runtimes:
        limits = limits_for(artifact, name)
        try:
            encoder = _encoder(artifact, device=device, threads=threads, runtime=name, **options)
            rt = encoder.runtime
            parity = probes.compare(rt.run, reference, "onnxruntime-cpu", limits)
            rate, last = _rate(encoder, items, seconds)
            sample = _sample_gate(last, expected)
            ok = passes(parity, limits) and sample["min_cosine"] >= limits["min_cosine"]
            row = {"items_per_s": rate, "precision": rt.precision, "parity": parity, "sample": sample,
                   "limits": limits, "passes": bool(ok), "providers": list(rt.providers)}
            if hasattr(rt, "compile_seconds"):
                row["compile_seconds"] = round(rt.compile_seconds, 3)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run here is recorded, not fatal
            row = {"error": f"{type(exc).__name__}: {exc}", "passes": False, "limits": limits}
        candidates[name] = row
        if progress is not None:
            progress(len(candidates), len(runtimes))
        logger.info("tune %s on %s: %s %s", artifact.name, device, name,
                    f"{row['items_per_s']:.1f} items/s, sample min cos {row['sample']['min_cosine']:.6f}"
                    if "items_per_s" in row else row["error"])
    passing = {k: v for k, v in candidates.items() if v["passes"]}
    if not passing:
        raise EmbedkitError(f"no runtime ran {artifact.name} correctly on {device}: "
                            + "; ".join(f"{k}: {v.get('error') or 'failed the parity gate'}" for k, v in candidates.items()))
    choice = max(passing, key=lambda k: passing[k]["items_per_s"])
    record = {"device": device_key(device), "choice": choice, "precision": passing[choice]["precision"],
              "items": len(items), "candidates": candidates, "machine": machine(device),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return records.save(artifact, record)


def tune_table(record: dict[str, Any]) -> list[str]:
    """The lines of a :func:`tune` record's table, for the CLI and the benchmarks: the CPU's
    matrix-engine flags (present and absent), then one line per candidate (precision, items/s end
    to end, min cosine to fp32 on the probes and on the sample, and the gate's verdict)."""
    lines = []
    cpu = record.get("machine", {}).get("cpu")
    if cpu:
        ov = record["machine"].get("openvino")
        lines.append(f"  matrix engines: {', '.join(cpu['matrix_flags']) or 'none'}; absent: {', '.join(cpu['absent']) or 'none'}"
                     + (f"; OpenVINO {ov['version'].split('-')[0]} capabilities {', '.join(ov['capabilities'])}" if ov else ""))
    lines.append(f"  {'candidate':<15} {'precision':<14} {'items/s':>9}  {'probe min cos':>13}  {'sample min cos':>14}  gate")
    for name, row in record["candidates"].items():
        if "error" in row:
            lines.append(f"  {name:<15} cannot run here: {row['error']}")
            continue
        gate = "passes" if row["passes"] else "FAILS"
        lines.append(f"  {name:<15} {row['precision']:<14} {row['items_per_s']:9.1f}  {row['parity']['min_cosine']:13.6f}  "
                     f"{row['sample']['min_cosine']:14.6f}  {gate} (>= {row['limits']['min_cosine']})")
    return lines
