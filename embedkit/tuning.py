"""Runtime selection by measurement: which of ONNX Runtime and torch is faster for this artifact here.

``tune(artifact, device)`` runs a real encoder end to end with each runtime over the same items,
checks each runtime against the artifact's own ONNX Runtime CPU output on the padded probe
batches (the export gate:
:data:`~embedkit.probes.LIMITS` for fp32 artifacts, :data:`~embedkit.probes.FP16_LIMITS` for fp16
variants), times it, and records the fastest one that passes in
``<model store>/tuning/<digest>.json`` under a key naming the device (CPU model and cores, or
the GPU's name). Encoders built with ``runtime="auto"`` (the default) use the recorded choice;
on CUDA an artifact with no record is tuned once on first use, since the answer differs by
network (MiniLM: ONNX Runtime faster; ResNet-50: torch faster, per DEVICE.md). On CPU, with no
record, ONNX Runtime is used: it beat torch eager 1.8x on MiniLM and 3.6x on MobileNetV2 here.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from .artifacts import Artifact, ModelStore
from .atomic import write_atomic
from .errors import DeviceUnavailableError, EmbedkitError
from .probes import FP16_LIMITS, LIMITS, onnx_runner, passes, probes_for
from .runtime import Runtime, cpu_count, cuda_unavailable

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torch", "torch-compile")


def candidates_for(device: str) -> tuple[str, ...]:
    """What ``tune`` measures by default: torch.compile only on CUDA (on CPU it needs a C
    compiler and minutes of compiling for what ONNX Runtime already does faster here)."""
    return RUNTIMES if device == "cuda" else RUNTIMES[:2]


def device_key(device: str) -> str:
    """What a measurement is valid for: the CPU model and usable cores, or the GPU's name."""
    if device == "cuda":
        try:
            import torch

            return f"cuda:{torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - no torch: one key for any GPU
            return "cuda"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu:{model}:{cpu_count()} cores"


def _path(artifact: Artifact) -> Path:
    return ModelStore.holding(artifact).root / "tuning" / f"{artifact.digest}.json"


def recorded(artifact: Artifact, device: str) -> dict[str, Any] | None:
    """The measurement recorded for this artifact on this device, if any."""
    try:
        return json.loads(_path(artifact).read_text()).get(device_key(device))
    except (OSError, json.JSONDecodeError):
        return None


def make_runtime(artifact: Artifact, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                 streams: int | None = None) -> Any:
    """A :class:`Runtime` or :class:`~embedkit.torch_runtime.TorchRuntime` for ``artifact``.

    ``runtime``: ``onnxruntime``, ``torch``, ``torch-compile``, or ``auto`` (the recorded measurement; see the module).
    """
    if runtime not in ("auto",) + RUNTIMES:
        raise ValueError(f"runtime must be auto, {', '.join(RUNTIMES)}; got {runtime!r}")
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
    if runtime.startswith("torch"):
        from .torch_runtime import TorchRuntime

        if actual == "auto":
            import torch

            actual = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return TorchRuntime(artifact, device=actual, threads=threads, compile=runtime == "torch-compile")
        except (EmbedkitError, ImportError) as exc:
            if explicit:
                raise
            logger.warning("the recorded choice for %s is %s, but: %s; using ONNX Runtime", artifact.name, runtime, exc)
    return Runtime(artifact.onnx_path, device=device, threads=threads, streams=streams)


def default_items(artifact: Artifact) -> list[Any]:
    """What to time when the user gives nothing: 1,000 shipped Banking77 sentences (real lengths),
    or the synthetic probe images of varied sizes (decoding included)."""
    if artifact.modality == "text":
        from .demo import load_split

        return load_split("train")[0][:1000]
    from .image import probe_images

    return list(probe_images()) * 8


def _rate(encoder: Any, items: list[Any], seconds: float) -> float:
    """Items/s of the encoder end to end (tokenising or decoding included), after a warm-up."""
    encoder.encode(items[: max(1, len(items) // 4)])  # allocator, cudnn autotuning, compilation
    done, started = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        encoder.encode(items)
        done += 1
    return done * len(items) / (time.perf_counter() - started)


def tune(artifact: Artifact | str, device: str = "cpu", items: list[Any] | None = None, seconds: float = 2.0,
         runtimes: tuple[str, ...] | None = None, threads: int | None = None,
         store: ModelStore | str | None = None, progress: Any = None, **options: Any) -> dict[str, Any]:
    """Measure each runtime on this device, check it against the artifact, record the fastest that passes.

    Each runtime drives a real encoder over ``items`` (default: :func:`default_items`; pass a
    sample of your own data for your lengths and sizes) end to end, as extraction will. ``options``
    go to the encoder (e.g. ``batch_size``, ``batch_tokens``). Returns the record: ``choice``,
    ``device`` and per runtime ``items_per_s``, ``parity`` and ``passes`` (or ``error`` when it
    could not run here). ``progress(done, total)`` is called after each runtime.
    """
    from .encoder import encoder_for
    from .exporter import resolve

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    artifact = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    half = artifact.manifest.get("precision", {}).get("dtype") == "fp16"
    limits = FP16_LIMITS if half else LIMITS
    items = list(items) if items is not None else default_items(artifact)
    runtimes = runtimes or candidates_for(device)
    probes = probes_for(artifact)
    reference = onnx_runner(artifact.onnx_path, probes.rank)
    candidates: dict[str, dict[str, Any]] = {}
    for name in runtimes:
        try:
            encoder = encoder_for(artifact, device=device, threads=threads, runtime=name, **options)
            rt = encoder.runtime
            parity = probes.compare(rt.run, reference, "onnxruntime-cpu", limits)
            row = {"items_per_s": _rate(encoder, items, seconds), "parity": parity,
                   "passes": passes(parity, limits), "providers": list(rt.providers)}
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run here is recorded, not fatal
            row = {"error": f"{type(exc).__name__}: {exc}", "passes": False}
        candidates[name] = row
        if progress is not None:
            progress(len(candidates), len(runtimes))
        logger.info("tune %s on %s: %s %s", artifact.name, device, name,
                    f"{row['items_per_s']:.1f} items/s" if "items_per_s" in row else row["error"])
    passing = {k: v for k, v in candidates.items() if v["passes"]}
    if not passing:
        raise EmbedkitError(f"no runtime ran {artifact.name} correctly on {device}: "
                            + "; ".join(f"{k}: {v.get('error') or 'failed the parity gate'}" for k, v in candidates.items()))
    choice = max(passing, key=lambda k: passing[k]["items_per_s"])
    record = {"device": device_key(device), "choice": choice, "items": len(items), "candidates": candidates,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = _path(artifact)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        records = {}
    records[record["device"]] = record
    write_atomic(path, json.dumps(records, indent=2, sort_keys=True).encode())
    return record
