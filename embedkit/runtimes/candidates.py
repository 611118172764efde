"""What :func:`embedkit.tune` measures on a device, and the gate each candidate must pass."""
from __future__ import annotations

from ..models.probes import BF16_LIMITS, FP16_LIMITS, LIMITS
from ..models.store import Artifact, ModelStore
from .cpu import has_bf16
from .table import INT8, REDUCED, TABLE


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
    """What ``tune`` measures by default: the table's runtimes for ``device``.

    CUDA: ONNX Runtime, torch, torch.compile. CPU: ONNX Runtime, torch and OpenVINO in fp32; for
    an fp32 artifact on a CPU with bf16 in hardware (AMX or AVX-512 BF16,
    :func:`embedkit.runtimes.cpu.has_bf16`) also the reduced-precision runtimes; and the
    artifact's int8 variants that exist. torch.compile is CUDA only (on CPU it needs a C compiler
    and minutes of compiling for what the other runtimes already do faster here). A variant
    (fp16, int8) is measured as itself only, on ONNX Runtime and torch.
    """
    if device == "cuda":
        return tuple(name for name, spec in TABLE.items() if "cuda" in spec.devices)
    plain = artifact is None or not ("precision" in artifact.manifest or "quantization" in artifact.manifest)
    if not plain:
        return ("onnxruntime", "torch")
    bf16 = has_bf16()
    names = [name for name, spec in TABLE.items() if "cpu" in spec.devices and (bf16 or not spec.reduced)]
    if artifact is not None:
        names += sorted(int8_variants(artifact))
    return tuple(names)


def limits_for(artifact: Artifact, runtime: str) -> dict[str, float]:
    """The gate a runtime is judged by: fp16 variants FP16_LIMITS, reduced-precision candidates
    BF16_LIMITS (min cosine 0.9999; see :mod:`embedkit.models.probes`), everything else the export's LIMITS."""
    if artifact.manifest.get("precision", {}).get("dtype") == "fp16":
        return FP16_LIMITS
    if runtime in REDUCED or runtime.startswith(INT8):
        return BF16_LIMITS
    return LIMITS
