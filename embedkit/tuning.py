"""Runtime and precision selection by measurement: which runtime, in which precision, is fastest here.

``tune(artifact, device)`` runs a real encoder end to end with each candidate over the same items
(:func:`candidates_for`: ONNX Runtime, torch, OpenVINO in fp32; OpenVINO bf16 and torch under bf16
autocast on a CPU with bf16 in hardware; the artifact's int8 variants that exist). Each candidate
is gated against the artifact's own ONNX Runtime CPU output, on the padded probe batches and on
the timed sample (:func:`limits_for`: :data:`~embedkit.probes.LIMITS` for fp32 runtimes,
:data:`~embedkit.probes.BF16_LIMITS` (min cosine 0.9999) for reduced precision,
:data:`~embedkit.probes.FP16_LIMITS` for fp16 variants). The fastest that passes is recorded in
``<model store>/tuning/<digest>.json`` under a key naming the device (CPU model and cores, or
the GPU's name), with its precision and the CPU's matrix-engine flags. Encoders built with
``runtime="auto"`` (the default) use the recorded choice; on CUDA an artifact with no record is
tuned once on first use, since the answer differs by network (MiniLM: ONNX Runtime faster;
ResNet-50: torch faster, per DEVICE.md). On CPU, with no record, ONNX Runtime is used: it beat
torch eager 1.8x on MiniLM and 3.6x on MobileNetV2 here.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import Artifact, ModelStore
from .atomic import write_atomic
from .errors import ArtifactError, DeviceUnavailableError, EmbedkitError
from .probes import BF16_LIMITS, FP16_LIMITS, LIMITS, cosine, onnx_runner, passes, probes_for
from .runtime import Runtime, cpu_count, cuda_unavailable

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torch", "torch-compile", "openvino", "openvino-bf16", "torch-bf16")
# Candidates that compute an fp32 artifact in reduced precision: judged by BF16_LIMITS, not LIMITS.
# An int8 variant that exists in the model store is offered as ``int8-<variant>`` (ONNX Runtime
# running the variant's graph in place of the artifact's) and judged the same way.
REDUCED = ("openvino-bf16", "torch-bf16")
INT8 = "int8-"


def int8_variants(artifact: Artifact) -> dict[str, Artifact]:
    """The int8 variants of ``artifact`` in its model store: ``{"int8-<variant>": variant}`` (newest each)."""
    found: dict[str, Artifact] = {}
    if "precision" in artifact.manifest or "quantization" in artifact.manifest:
        return found
    for other in ModelStore.holding(artifact).artifacts():
        q = other.manifest.get("quantization") or {}
        if q.get("parent") == artifact.digest and q.get("variant"):
            found[INT8 + str(q["variant"])] = other  # artifacts() is oldest first: the newest wins
    return found


def candidates_for(device: str, artifact: Artifact | None = None) -> tuple[str, ...]:
    """What ``tune`` measures by default.

    CUDA: ONNX Runtime, torch, torch.compile. CPU: ONNX Runtime, torch and OpenVINO in fp32; for
    an fp32 artifact on a CPU with bf16 in hardware (AMX or AVX-512 BF16, :func:`embedkit.cpu.has_bf16`)
    also OpenVINO bf16 and torch under bf16 autocast; and the artifact's int8 variants that exist.
    torch.compile is CUDA only (on CPU it needs a C compiler and minutes of compiling for what the
    other runtimes already do faster here). A variant (fp16, int8) is measured as itself only.
    """
    from .cpu import has_bf16

    if device == "cuda":
        return RUNTIMES[:3]
    plain = artifact is None or not ("precision" in artifact.manifest or "quantization" in artifact.manifest)
    if not plain:
        return RUNTIMES[:2]
    names = ["onnxruntime", "torch", "openvino"]
    if has_bf16():
        names += list(REDUCED)
    if artifact is not None:
        names += sorted(int8_variants(artifact))
    return tuple(names)


def limits_for(artifact: Artifact, runtime: str) -> dict[str, float]:
    """The gate a runtime is judged by: fp16 variants FP16_LIMITS, reduced-precision candidates
    BF16_LIMITS (min cosine 0.9999; see :mod:`embedkit.probes`), everything else the export's LIMITS."""
    if artifact.manifest.get("precision", {}).get("dtype") == "fp16":
        return FP16_LIMITS
    if runtime in REDUCED or runtime.startswith(INT8):
        return BF16_LIMITS
    return LIMITS


def device_key(device: str) -> str:
    """What a measurement is valid for: the CPU model and usable cores, or the GPU's name."""
    if device == "cuda":
        try:
            import torch

            return f"cuda:{torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - no torch: one key for any GPU
            return "cuda"
    from .cpu import cpu_model

    return f"cpu:{cpu_model()}:{cpu_count()} cores"


def _path(artifact: Artifact) -> Path:
    return ModelStore.holding(artifact).root / "tuning" / f"{artifact.digest}.json"


def recorded(artifact: Artifact, device: str) -> dict[str, Any] | None:
    """The measurement recorded for this artifact on this device, if any."""
    try:
        return json.loads(_path(artifact).read_text()).get(device_key(device))
    except (OSError, json.JSONDecodeError):
        return None


def _precision_of(artifact: Artifact) -> str:
    if "quantization" in artifact.manifest:
        return INT8 + str(artifact.manifest["quantization"].get("variant", "?"))
    return str(artifact.manifest.get("precision", {}).get("dtype", "fp32"))


def _build(artifact: Artifact, runtime: str, device: str, actual: str, threads: int | None,
           streams: int | None) -> Any:
    """The runtime object for one explicit ``runtime`` name (errors propagate)."""
    if runtime.startswith("torch"):
        from .torch_runtime import TorchRuntime

        if actual == "auto":
            import torch

            actual = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchRuntime(artifact, device=actual, threads=threads, compile=runtime == "torch-compile",
                            autocast_bf16=runtime == "torch-bf16")
    if runtime.startswith("openvino"):
        from .openvino_runtime import OpenVINORuntime

        return OpenVINORuntime(artifact, "bf16" if runtime == "openvino-bf16" else "fp32",
                               device="cpu" if actual == "auto" else actual, threads=threads, streams=streams)
    if runtime.startswith(INT8):
        variant = int8_variants(artifact).get(runtime)
        if variant is None:
            raise ArtifactError(f"{artifact.name} has no {runtime} variant in its model store; "
                                f"make it with embedkit.quantize(..., {runtime[len(INT8):]!r})")
        rt = Runtime(variant.onnx_path, device=device, threads=threads, streams=streams)
        rt.precision = runtime
        return rt
    rt = Runtime(artifact.onnx_path, device=device, threads=threads, streams=streams)
    rt.precision = _precision_of(artifact)
    return rt


def make_runtime(artifact: Artifact, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                 streams: int | None = None) -> Any:
    """The runtime for ``artifact``: :class:`Runtime`, :class:`~embedkit.torch_runtime.TorchRuntime`
    or :class:`~embedkit.openvino_runtime.OpenVINORuntime`. Each has ``run``, ``map``, ``device``,
    ``providers`` and ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``int8-<variant>``).

    ``runtime``: one of :data:`RUNTIMES`, ``int8-<variant>`` (a variant in the model store), or
    ``auto`` (the recorded measurement; see the module). A recorded choice that cannot run any
    more (e.g. openvino uninstalled) falls back to ONNX Runtime with a warning; an explicit one raises.
    """
    if runtime not in ("auto",) + RUNTIMES and not (isinstance(runtime, str) and runtime.startswith(INT8)):
        raise ValueError(f"runtime must be auto, {', '.join(RUNTIMES)} or int8-<variant>; got {runtime!r}")
    explicit = runtime != "auto"
    if device == "cuda" and runtime in ("auto", "onnxruntime"):
        # Refused before any tuning: one clear error, not a "could not tune" warning and then the error.
        reason = cuda_unavailable(device)
        if reason is not None:
            raise DeviceUnavailableError(reason)
    actual = device  # the device a record or the torch runtime is for; Runtime keeps "auto"'s fallback
    if not explicit:
        import onnxruntime as ort

        if device == "auto":
            actual = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        record = recorded(artifact, actual)
        if record is None and actual == "cuda":
            try:
                record = tune(artifact, "cuda")
            except Exception as exc:  # noqa: BLE001 - measuring is an optimisation; ONNX Runtime still works
                logger.warning("could not tune %s on CUDA (%s); using ONNX Runtime", artifact.name, exc)
        runtime = record["choice"] if record is not None else "onnxruntime"
    if runtime != "onnxruntime":
        try:
            return _build(artifact, runtime, device, actual, threads, streams)
        except (EmbedkitError, ImportError) as exc:
            if explicit:
                raise
            logger.warning("the recorded choice for %s is %s, but: %s; using ONNX Runtime", artifact.name, runtime, exc)
    return _build(artifact, "onnxruntime", device, actual, threads, streams)


def default_items(artifact: Artifact) -> list[Any]:
    """What to time when the user gives nothing: 1,000 shipped Banking77 sentences (real lengths),
    or the synthetic probe images of varied sizes (decoding included)."""
    if artifact.modality == "text":
        from .demo import load_split

        return load_split("train")[0][:1000]
    from .image import probe_images

    return list(probe_images()) * 8


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
    from .cpu import describe

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

    Each candidate (default: :func:`candidates_for`) drives a real encoder over ``items``
    (default: :func:`default_items`; pass a sample of your own data for your lengths and sizes)
    end to end, as extraction will. ``options`` go to the encoder (e.g. ``batch_size``,
    ``batch_tokens``). The gate (:func:`limits_for`) applies twice: on the padded probe batches
    against the artifact's ONNX Runtime CPU output, and on the sample against ONNX Runtime's
    features of the same items (min cosine). Returns the record, also written to the model
    store: ``choice``, its ``precision``, ``device``, ``machine`` (CPU model, matrix-engine flags,
    OpenVINO's capabilities) and per candidate ``items_per_s``, ``precision``, ``parity``,
    ``sample``, ``limits`` and ``passes`` (or ``error`` when it could not run here).
    ``progress(done, total)`` is called after each candidate.

    Raises:
        EmbedkitError: no candidate ran correctly (each one's reason in the message).
    """
    from .encoder import encoder_for
    from .exporter import resolve

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    artifact = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    items = list(items) if items is not None else default_items(artifact)
    runtimes = tuple(runtimes or candidates_for(device, artifact))
    probes = probes_for(artifact)
    reference = onnx_runner(artifact.onnx_path, probes.rank)
    # The sample's reference features: the artifact itself on ONNX Runtime's CPU provider.
    expected = encoder_for(artifact, device="cpu", threads=threads, runtime="onnxruntime", **options).encode(items)
    candidates: dict[str, dict[str, Any]] = {}
    for name in runtimes:
        limits = limits_for(artifact, name)
        try:
            encoder = encoder_for(artifact, device=device, threads=threads, runtime=name, **options)
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
    path = _path(artifact)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        records = {}
    records[record["device"]] = json.loads(json.dumps(record, default=str))
    write_atomic(path, json.dumps(records, indent=2, sort_keys=True).encode())
    return records[record["device"]]


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
