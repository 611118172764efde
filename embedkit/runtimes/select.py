"""The runtime an encoder gets: the one named, or the one recorded for this device.

Selection reads records only: measuring is :func:`embedkit.tune`'s job, an explicit step (the
route in :mod:`embedkit.encoder` takes it once on CUDA when no record exists, and logs it).
"""
from __future__ import annotations

import logging

from ..errors import ArtifactError, DeviceUnavailableError, EmbedkitError
from ..models.store import Artifact
from .candidates import int8_variants
from .onnx_runtime import Runtime, cuda_unavailable
from .protocol import RuntimeProtocol
from .records import recorded
from .table import INT8, RUNTIMES, TABLE, is_runtime

logger = logging.getLogger(__name__)


def build(artifact: Artifact, runtime: str, device: str, threads: int | None = None,
          streams: int | None = None) -> RuntimeProtocol:
    """The runtime object for one explicit ``runtime`` name (errors propagate).

    Raises:
        ValueError: ``runtime`` is not in the table nor ``int8-<variant>``.
        ArtifactError: ``int8-<variant>`` names no variant of ``artifact`` in its model store.
        MissingDependencyError, DeviceUnavailableError: the runtime cannot run here.
    """
    if runtime.startswith(INT8):
        variant = int8_variants(artifact).get(runtime)
        if variant is None:
            raise ArtifactError(f"{artifact.name} has no {runtime} variant in its model store; "
                                f"make it with embedkit.quantize(..., {runtime[len(INT8):]!r})")
        rt = Runtime(variant.onnx_path, device=device, threads=threads, streams=streams)
        rt.precision = runtime
        return rt
    if runtime not in TABLE:
        raise ValueError(f"runtime must be auto, {', '.join(RUNTIMES)} or int8-<variant>; got {runtime!r}")
    spec = TABLE[runtime]
    return spec.builder()(artifact, device, threads, streams, **spec.params)


def actual_device(device: str) -> str:
    """The device a record is kept for: ``cpu`` or ``cuda`` (``auto`` is CUDA when ONNX Runtime
    offers it). ``cuda`` that ONNX Runtime cannot use raises :class:`DeviceUnavailableError`."""
    if device == "cuda":
        reason = cuda_unavailable(device)
        if reason is not None:
            raise DeviceUnavailableError(reason)
        return "cuda"
    if device == "auto":
        return "cpu" if cuda_unavailable(device) else "cuda"
    return device


def make_runtime(artifact: Artifact, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                 streams: int | None = None) -> RuntimeProtocol:
    """The runtime for ``artifact`` (see :mod:`embedkit.runtimes.table` for the names).

    ``runtime``: a name of the table, ``int8-<variant>`` (a variant in the model store), or
    ``auto``: the choice recorded by :func:`embedkit.tune` for this device, else ONNX Runtime.
    A recorded choice that cannot run any more (e.g. openvino uninstalled) falls back to ONNX
    Runtime with a warning; an explicit one raises.

    Raises:
        ValueError: an unknown runtime name.
        DeviceUnavailableError: ``device="cuda"`` with ``auto`` or ``onnxruntime`` and no CUDA
            provider (before anything else is tried).
    """
    if runtime != "auto" and not is_runtime(runtime):
        raise ValueError(f"runtime must be auto, {', '.join(RUNTIMES)} or int8-<variant>; got {runtime!r}")
    explicit = runtime != "auto"
    if device == "cuda" and runtime in ("auto", "onnxruntime"):
        actual_device(device)  # refused here, with one clear error
    if not explicit:
        record = recorded(artifact, actual_device(device))
        runtime = record["choice"] if record is not None else "onnxruntime"
    if runtime != "onnxruntime":
        try:
            return build(artifact, runtime, device, threads, streams)
        except (EmbedkitError, ImportError) as exc:
            if explicit:
                raise
            logger.warning("the recorded choice for %s is %s, but: %s; using ONNX Runtime", artifact.name, runtime, exc)
    return build(artifact, "onnxruntime", device, threads, streams)
