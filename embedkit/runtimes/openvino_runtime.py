"""An OpenVINO runtime: the artifact's own ``model.onnx`` on Intel's CPU runtime, in fp32 or bf16.

Same ``run``/``map`` as :class:`~embedkit.runtimes.onnx_runtime.Runtime` (out of memory halves the batch; per-item
error records are the encoder's, so they do not change). Precision is OpenVINO's
``INFERENCE_PRECISION_HINT``, always set explicitly: OpenVINO's *default* on a CPU with bf16 support
(AMX or AVX-512 BF16, listed as ``BF16`` in the device's ``OPTIMIZATION_CAPABILITIES``) is bf16,
so an unset hint would silently compute an fp32 artifact in bf16.

- ``fp32``: hint ``f32``; the strict export gate applies (:data:`embedkit.models.probes.LIMITS`).
- ``bf16``: hint ``bf16`` (matrix products and convolutions in bf16 with fp32 accumulation);
  judged by :data:`embedkit.models.probes.BF16_LIMITS` in :func:`embedkit.tune`.

Compiled models are cached (OpenVINO's ``CACHE_DIR``) under the model store, one folder per
artifact digest, precision and device: ``<store>/openvino/<digest>/<precision>-<device>/``, so a
second start reads the compiled blob instead of compiling the ONNX graph again
(``compile_seconds`` and ``cache_hit`` say which happened).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import DeviceUnavailableError, MissingDependencyError
from ..models.store import Artifact, ModelStore
from .cpu import cpu_count
from .onnx_runtime import map_streams, run_halving

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # embedkit's name -> OpenVINO's inference precision


def import_openvino() -> Any:
    """The ``openvino`` module, or :class:`MissingDependencyError` naming the extra."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO runtime") from exc
    return openvino


def cache_dir(artifact: Artifact, precision: str, device: str = "cpu") -> Path:
    """Where OpenVINO keeps this artifact's compiled model for ``precision`` on ``device``."""
    return ModelStore.holding(artifact).root / "openvino" / artifact.digest / f"{precision}-{device}"


def capabilities() -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``BF16``, ``INT8``, ``FP32``)."""
    ov = import_openvino()
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVINORuntime:
    """Runs batches of preprocessed inputs through OpenVINO on CPU; same ``run``/``map`` as Runtime.

    Args:
        artifact: an fp32 artifact (its ``model.onnx`` is read as is).
        precision: ``fp32`` or ``bf16``.
        device: ``cpu`` (OpenVINO's GPU plugin is for Intel GPUs; CUDA is ONNX Runtime's or torch's).
        threads: CPU threads in all (default: the cores this process may use).
        streams: OpenVINO streams, each with its own infer request fed its own batches (default:
            ``threads``, up to 4, as for ONNX Runtime: on MiniLM here 2 single-threaded streams ran
            79 vs 62 sentences/s (fp32) and 60 vs 42 (bf16) against one 2-thread stream).
        cache: keep compiled models under the model store (see the module docstring).

    Raises:
        MissingDependencyError: openvino is not installed (``pip install 'embedkit[openvino]'``).
        DeviceUnavailableError: a device other than CPU, or bf16 on a CPU without bf16 support.
    """

    def __init__(self, artifact: Artifact, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 streams: int | None = None, cache: bool = True):
        ov = import_openvino()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device != "cpu":
            raise DeviceUnavailableError(f"the OpenVINO runtime runs on CPU here, not {device!r}; use device='cpu'")
        for name, value in (("threads", threads), ("streams", streams)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise DeviceUnavailableError("this CPU has no bf16 support (AMX or AVX-512 BF16); "
                                         "OpenVINO would emulate bf16, slower than fp32: use precision='fp32'")
        self.model = str(artifact.onnx_path)
        self.precision = precision
        self.device = "cpu"
        self.threads = threads or cpu_count()
        self.streams = streams or max(1, min(self.threads, 4))
        self.halvings = 0
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision],
                                  "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": self.streams}
        self.cache_hit = False
        self.cache_dir: Path | None = None
        if cache:
            folder = cache_dir(artifact, precision)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.cache_hit = any(folder.glob("*.blob"))
                config["CACHE_DIR"] = str(folder)
                self.cache_dir = folder
            except OSError as exc:  # a read-only model store still runs, compiling each time
                logger.warning("cannot cache OpenVINO's compiled model in %s (%s); compiling without a cache", folder, exc)
        started = time.perf_counter()
        self.compiled = core.compile_model(self.model, "CPU", config)
        self.compile_seconds = time.perf_counter() - started
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self.input_names = [next(iter(i.get_names())) for i in self.compiled.inputs]
        actual = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.providers = [f"openvino-CPU-{precision}"]
        logger.info("runtime %s: OpenVINO %s on CPU (inference precision %s), %d stream(s), %d thread(s), "
                    "compiled in %.2fs%s", Path(self.model).parent.name, precision, actual, self.streams, self.threads,
                    self.compile_seconds, " from the cache" if self.cache_hit else "")

    def _infer(self, request: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self.input_names})
        return np.asarray(result[self.compiled.outputs[0]], dtype=np.float32).copy()

    def run(self, feeds: dict[str, np.ndarray], stream: int = 0) -> np.ndarray:
        """Run one batch on one infer request; returns the first output as float32 (N, D).

        Out of memory halves the batch and retries each half, as in :class:`~embedkit.runtimes.onnx_runtime.Runtime`.
        """
        request = self.requests[stream % len(self.requests)]
        return run_halving(lambda f: self._infer(request, f), feeds, self)

    def map(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
        """Run batches over all streams; results come back in the order of ``batches``."""
        return map_streams(self.run, len(self.requests), batches)


def build(artifact: Artifact, device: str, threads: int | None, streams: int | None,
          precision: str = "fp32") -> OpenVINORuntime:
    """The ``openvino`` and ``openvino-bf16`` rows of :mod:`embedkit.runtimes.table` (CPU)."""
    return OpenVINORuntime(artifact, precision, device="cpu" if device == "auto" else device, threads=threads,
                           streams=streams)
