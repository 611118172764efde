"""The runtime table: every runtime embedkit can run an artifact on, by name, with what it needs
and where :func:`embedkit.tune` offers it. The CLI's choices, ``tune``'s candidates and the docs
read this table; adding a runtime is one :class:`RuntimeSpec` here and its module.

Names: ``onnxruntime`` (default), ``torch`` (the backbone's own module, eager),
``torch-compile`` (``torch.compile``; CUDA only as a candidate), ``openvino`` (fp32),
``openvino-bf16`` and ``torch-bf16`` (an fp32 artifact computed in bf16: offered on a CPU with
bf16 in hardware, judged by :data:`~embedkit.models.probes.BF16_LIMITS`), and ``int8-<variant>``
(ONNX Runtime running an int8 variant of the artifact made by :func:`embedkit.quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

INT8 = "int8-"


@dataclass(frozen=True)
class RuntimeSpec:
    """One row of the runtime table.

    Attributes:
        name: what users pass as ``runtime=`` / ``--runtime``.
        summary: one line for ``--help`` and the docs.
        factory: ``"module:function"`` building it as ``function(artifact, device, threads,
            streams, **params)``; imported only when the runtime is built, so reading the table
            (the CLI's choices, ``--help``) costs nothing.
        params: keyword arguments for ``factory``.
        devices: where it is a default candidate of ``tune`` (``cpu``, ``cuda``).
        reduced: computes an fp32 artifact in reduced precision (judged by ``BF16_LIMITS``).
        extra: the ``pip install embedkit[extra]`` that provides it, or None.
    """

    name: str
    summary: str
    factory: str
    devices: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    reduced: bool = False
    extra: str | None = None

    def builder(self) -> Callable[..., Any]:
        """The factory function (imports its module)."""
        module, _, function = self.factory.partition(":")
        return getattr(import_module(module), function)


TABLE: dict[str, RuntimeSpec] = {spec.name: spec for spec in (
    RuntimeSpec("onnxruntime", "ONNX Runtime (CPU or CUDA provider): the default",
                "embedkit.runtimes.onnx_runtime:build", ("cpu", "cuda")),
    RuntimeSpec("torch", "the backbone's torch module, eager", "embedkit.runtimes.torch_runtime:build",
                ("cpu", "cuda"), extra="export"),
    RuntimeSpec("torch-compile", "the torch module under torch.compile", "embedkit.runtimes.torch_runtime:build",
                ("cuda",), params={"compile": True}, extra="export"),
    RuntimeSpec("openvino", "OpenVINO, fp32", "embedkit.runtimes.openvino_runtime:build", ("cpu",),
                params={"precision": "fp32"}, extra="openvino"),
    RuntimeSpec("openvino-bf16", "OpenVINO computing an fp32 artifact in bf16",
                "embedkit.runtimes.openvino_runtime:build", ("cpu",), params={"precision": "bf16"}, reduced=True,
                extra="openvino"),
    RuntimeSpec("torch-bf16", "the torch module under bf16 autocast", "embedkit.runtimes.torch_runtime:build",
                ("cpu",), params={"autocast_bf16": True}, reduced=True, extra="export"),
)}
RUNTIMES = tuple(TABLE)
REDUCED = tuple(name for name, spec in TABLE.items() if spec.reduced)


def is_runtime(name: Any) -> bool:
    """Whether ``name`` is a runtime of the table or ``int8-<variant>``."""
    return isinstance(name, str) and (name in TABLE or name.startswith(INT8))


def help_text() -> str:
    """One line per runtime, for ``--help``."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in TABLE.items())
