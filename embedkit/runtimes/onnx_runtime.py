"""ONNX Runtime sessions: device selection, threads, and parallel streams of batches."""
from __future__ import annotations

import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import DeviceUnavailableError
from .cpu import cpu_count

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")


OOM_MARKERS = ("out of memory", "failed to allocate", "bad_alloc", "bad allocation", "cudaerrormemoryallocation",
               "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


_warned: set[str] = set()  # messages already logged once in this process


def warn_once(message: str) -> None:
    """Log a warning the first time this process meets it (e.g. each ``device="auto"`` encoder
    falling back to CPU would otherwise repeat the same line)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def cuda_unavailable(device: str) -> str | None:
    """Why ``device`` (``cuda`` or ``auto``) cannot run on CUDA with this onnxruntime, or None."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    return (f"device={device!r} asked for CUDA but this onnxruntime offers only {available}; "
            "install onnxruntime-gpu with matching CUDA libraries, or use device='cpu'")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an ONNX Runtime error reports an allocation failure (CPU or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)


# The CUDA provider's options: exhaustive cuDNN algorithm search and NHWC convolutions were the
# fastest ORT settings for CNNs on an H200 (DEVICE.md); TF32 off so an fp32 artifact computes in
# fp32 and passes the same strict parity gate as on CPU (fp16 variants are fp16 regardless).
CUDA_OPTIONS = {
    "device_id": "0",
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "prefer_nhwc": "1",
    "use_tf32": "0",
    "do_copy_in_default_stream": "1",
}


def run_halving(run: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray],
                counter: Any = None) -> np.ndarray:
    """``run(feeds)``; out of memory halves the batch and retries each half (recursively, down
    to one item): items are never skipped, and the rows come back in order. Each split adds
    one to ``counter.halvings``."""
    try:
        return run(feeds)
    except Exception as exc:
        n = len(next(iter(feeds.values())))
        if n < 2 or not is_out_of_memory(exc):
            raise
        if counter is not None:
            counter.halvings += 1
        logger.warning("out of memory on a batch of %d; retrying as two batches of %d and %d", n, n // 2, n - n // 2)
        half = n // 2
        first = run_halving(run, {k: v[:half] for k, v in feeds.items()}, counter)
        second = run_halving(run, {k: v[half:] for k, v in feeds.items()}, counter)
        return np.concatenate([first, second])


class Runtime:
    """One or more ONNX Runtime sessions over the same model.

    On CPU, small transformer batches waste much of each core in intra-op synchronisation;
    ``streams`` independent single-threaded sessions, each fed its own batches, used this
    2-core machine better (measured in ``benchmarks/text_cpu.py``). ONNX Runtime releases
    the GIL while running, so plain threads drive the streams.

    Args:
        model: path to the ``.onnx`` file.
        device: ``cpu``, ``cuda`` (a typed error unless the session really runs on CUDA),
            or ``auto`` (CUDA when it works, else CPU with a logged warning).
        threads: CPU threads in all (default: the cores this process may use).
        streams: concurrent sessions (default: ``threads`` on CPU, up to 4; 1 on CUDA).
        io_binding: run through ONNX Runtime's IO binding (default: on CUDA only; see
            :meth:`_run_bound`). On CPU it gives the same results and exists for testing.
    """

    def __init__(self, model: str | Path, device: str = "cpu", threads: int | None = None, streams: int | None = None,
                 io_binding: bool | None = None):
        import onnxruntime as ort

        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if streams is not None and (not isinstance(streams, int) or streams < 1):
            raise ValueError(f"streams must be a positive int or None, got {streams!r}")
        self.model = str(model)
        self.requested_device = device
        threads = threads or cpu_count()
        want_cuda = device in ("cuda", "auto")
        message = cuda_unavailable(device) if want_cuda else None
        if message is not None:
            if device == "cuda":
                raise DeviceUnavailableError(message)
            warn_once(f"{message}; running on CPU")
            want_cuda = False
        if want_cuda:
            streams = streams or 1
            providers: list = [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
        else:
            streams = streams or max(1, min(threads, 4))
            providers = ["CPUExecutionProvider"]
        per_stream = max(1, threads // streams)
        self.sessions = []
        for _ in range(streams):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = per_stream
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self.sessions.append(ort.InferenceSession(self.model, options, providers=providers))
        self.providers = self.sessions[0].get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if want_cuda and self.device != "cuda":
            message = f"the session fell back to {self.providers} although CUDA was requested"
            if device == "cuda":
                raise DeviceUnavailableError(message)
            warn_once(message)
        self.threads = threads
        self.streams = streams
        self.halvings = 0  # batches split after running out of memory
        self.precision = "fp32"  # what the graph computes in; make_runtime names a variant's (fp16, int8-...)
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self._torch: Any = None  # torch, once looked up for pinned buffers on CUDA (False: not usable)
        self.input_names = [i.name for i in self.sessions[0].get_inputs()]
        self.output_name = self.sessions[0].get_outputs()[0].name
        logger.info(
            "runtime %s: providers %s, %d stream(s) x %d thread(s)", Path(self.model).parent.name,
            self.providers, streams, per_stream,
        )

    def run(self, feeds: dict[str, np.ndarray], stream: int = 0) -> np.ndarray:
        """Run one batch on one session; returns the first output.

        Out of memory halves the batch and retries each half (recursively, down to one
        item): items are never skipped, and the rows come back in order.
        """
        if len(feeds) != len(self.input_names):  # e.g. a graph that does not use attention_mask
            feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        session = self.sessions[stream % len(self.sessions)]
        if self.io_binding:
            return run_halving(lambda f: self._run_bound(session, f), feeds, self)
        return run_halving(lambda f: session.run([self.output_name], f)[0], feeds, self)

    def _run_bound(self, session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """CUDA: IO binding. Inputs go up from pinned host buffers when torch can allocate them
        (else ONNX Runtime copies from the numpy arrays), the output is allocated on the device
        and copied down once: no per-run allocation of host staging copies by the session."""
        binding = session.io_binding()
        keep_alive = []
        for name, value in feeds.items():
            pinned = self._pinned(value) if self.device == "cuda" else None
            if pinned is None:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                keep_alive.append(pinned)
                binding.bind_input(name, "cuda", 0, value.dtype, list(value.shape), pinned.data_ptr())
        binding.bind_output(self.output_name, self.device, 0)
        if keep_alive:
            self._torch.cuda.current_stream().synchronize()  # the async uploads are done before ORT reads
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _pinned(self, value: np.ndarray) -> Any:
        """``value`` on the GPU via a pinned host buffer (torch), or None without torch + CUDA."""
        if self._torch is None:
            try:
                import torch

                self._torch = torch if torch.cuda.is_available() else False
            except ImportError:
                self._torch = False
        if not self._torch:
            return None
        host = self._torch.from_numpy(np.ascontiguousarray(value)).pin_memory()
        return host.to("cuda", non_blocking=True)

    def map(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
        """Run batches over all streams; results come back in the order of ``batches``."""
        return map_streams(self.run, len(self.sessions), batches)


def map_streams(run: Callable[[dict[str, np.ndarray], int], np.ndarray], streams: int,
                batches: Iterable[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
    """``run(feeds, stream)`` over ``streams`` concurrent streams (threads: the runtimes release
    the GIL); results come back in the order of ``batches``, with a bounded window in flight."""
    if streams == 1:
        for feeds in batches:
            yield run(feeds, 0)
        return
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for k in range(streams):
        free.put(k)

    def job(feeds: dict[str, np.ndarray]) -> np.ndarray:
        # Each stream serves one batch at a time, so a stream never oversubscribes cores.
        k = free.get()
        try:
            return run(feeds, k)
        finally:
            free.put(k)

    with ThreadPoolExecutor(streams) as pool:
        pending = []
        for feeds in batches:
            pending.append(pool.submit(job, feeds))
            # Keep a bounded window of work in flight: memory stays flat on long inputs.
            if len(pending) >= 2 * streams:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def precision_of(artifact: Any) -> str:
    """What an artifact computes in: ``fp32``, ``fp16`` (a variant) or ``int8-<variant>``."""
    if "quantization" in artifact.manifest:
        return "int8-" + str(artifact.manifest["quantization"].get("variant", "?"))
    return str(artifact.manifest.get("precision", {}).get("dtype", "fp32"))


def build(artifact: Any, device: str, threads: int | None, streams: int | None) -> Runtime:
    """The ``onnxruntime`` row of :mod:`embedkit.runtimes.table`: the artifact's graph on ONNX Runtime."""
    rt = Runtime(artifact.onnx_path, device=device, threads=threads, streams=streams)
    rt.precision = precision_of(artifact)
    return rt
