"""A torch runtime: the backbone's own torch module behind :class:`~embedkit.runtimes.onnx_runtime.Runtime`'s interface.

ONNX Runtime is the default everywhere, but not always the fastest: on an H200 it reached only
0.71x torch fp16 eager on ResNet-50 (DEVICE.md). :func:`embedkit.tune` measures both on the
machine at hand and records which is faster; encoders built with ``runtime="auto"`` then use it.

The module must be the network the artifact was exported from: the backbone is looked up by
the artifact's name (the parent's, for an fp16 variant) and its export key, which hashes the
spec, the weight files and the preprocessing, must match the artifact's. Precision follows the
artifact: an fp32 artifact runs the module in fp32 (TF32 off, so it passes the same strict gate),
an fp16 variant runs it in half precision (CUDA only).
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np

from ..backbones.backbone import Backbone
from ..backbones.registry import get_backbone
from ..errors import ArtifactError, DeviceUnavailableError, MissingDependencyError, UnknownBackboneError
from ..models.exporter import EXPORTERS, export_key
from ..models.store import Artifact, ModelStore
from .cpu import cpu_count
from .onnx_runtime import run_halving

logger = logging.getLogger(__name__)


def backbone_of(artifact: Artifact, store: ModelStore | str | None = None, backbone: Backbone | None = None) -> Backbone:
    """The backbone whose torch module ``artifact`` was exported from (checked by export key)."""

    base = artifact
    parent = artifact.manifest.get("precision", {}).get("parent")
    if "quantization" in artifact.manifest:
        raise ArtifactError(f"{artifact.name} is an int8 variant; the torch runtime runs fp32 or fp16 artifacts")
    if parent:
        store = store if isinstance(store, ModelStore) else (ModelStore(store) if store else ModelStore.holding(artifact))
        base = store.get(parent)
    if base.manifest.get("exporter") == "onnx-import":
        raise ArtifactError(f"{base.name} is an ONNX-only backbone: there is no torch module to run; use runtime='onnxruntime'")
    if backbone is None:
        try:
            backbone = get_backbone(base.name)
        except UnknownBackboneError:
            if "source" not in base.manifest:
                raise
            backbone = get_backbone(base.manifest["source"])  # exported from a path or a zoo spec
    key = base.manifest.get("export_key")
    opset = base.manifest.get("opset", 17)
    if key not in {export_key(backbone, e, opset) for e in ("auto",) + EXPORTERS}:
        raise ArtifactError(
            f"backbone {backbone.name!r} is not the network artifact {base.digest[:12]} was exported from "
            "(weights, preprocessing or torch/onnx versions differ); export it again to use the torch runtime"
        )
    return backbone


class TorchRuntime:
    """Runs batches of preprocessed inputs through the torch module; same ``run``/``map`` as Runtime.

    Args:
        artifact: an fp32 artifact or its fp16 variant.
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads on CPU (default: the cores this process may use).
        compile: wrap the module in ``torch.compile`` (CUDA: 1.8x torch eager on ResNet-50 in DEVICE.md).
        autocast_bf16: run under ``torch.autocast(device, dtype=torch.bfloat16)`` (matrix products
            in bf16, reductions and normalisations in fp32); judged by
            :data:`embedkit.models.probes.BF16_LIMITS` in :func:`embedkit.tune`, not the fp32 gate.
    """

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None, compile: bool = False,
                 store: ModelStore | str | None = None, backbone: Backbone | None = None, autocast_bf16: bool = False):
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("torch", "export", "the torch runtime") from exc
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError("device='cuda' asked for the torch runtime but torch sees no CUDA device")
        self.half = artifact.manifest.get("precision", {}).get("dtype") == "fp16"
        if self.half and device != "cuda":
            raise DeviceUnavailableError("fp16 variants run in torch on CUDA only (CPU half precision is slow and inexact)")
        self.backbone = backbone_of(artifact, store, backbone)
        self.torch = torch
        self.device = device
        self.threads = threads or cpu_count()
        self.streams = 1
        self.halvings = 0
        if autocast_bf16 and self.half:
            raise ArtifactError(f"{artifact.name} is an fp16 variant; bf16 autocast runs the fp32 artifact's network")
        self.autocast = autocast_bf16
        self.precision = "fp16" if self.half else "bf16" if autocast_bf16 else "fp32"
        self.providers = [f"torch-{device}{'-fp16' if self.half else ''}{'-bf16-autocast' if autocast_bf16 else ''}"
                          f"{'-compiled' if compile else ''}"]
        if device == "cpu":
            torch.set_num_threads(self.threads)
        else:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32: the strict gate applies
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        module = self.backbone.build().eval()
        module.requires_grad_(False)
        if self.half:
            module = module.half()
        module = module.to(device)
        if artifact.modality == "image" and device == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if compile else module
        self.modality = artifact.modality
        self.input_names = list(artifact.manifest.get("inputs", []))

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        tensors = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            if self.device == "cuda":
                t = t.pin_memory().to("cuda", non_blocking=True)  # pinned host buffer: async copy
                if t.is_floating_point():
                    t = t.half() if self.half else t
                    if t.dim() == 4:
                        t = t.contiguous(memory_format=torch.channels_last)
            tensors.append(t)
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.module(*tensors)
        return out.float().cpu().numpy()

    def run(self, feeds: dict[str, np.ndarray], stream: int = 0) -> np.ndarray:
        """One batch; out of memory halves it and retries, as in :class:`Runtime`."""
        return run_halving(self._forward, feeds, self)

    def map(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
        for feeds in batches:
            yield self.run(feeds)


def build(artifact: Artifact, device: str, threads: int | None, streams: int | None, compile: bool = False,
          autocast_bf16: bool = False) -> TorchRuntime:
    """The ``torch``, ``torch-compile`` and ``torch-bf16`` rows of :mod:`embedkit.runtimes.table`
    (``streams`` does not apply; ``device="auto"`` is CUDA when torch sees a GPU)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchRuntime(artifact, device=device, threads=threads, compile=compile, autocast_bf16=autocast_bf16)
