"""Runtime: devices never fall back silently, threads and streams, batch-size invariance."""
import logging

import numpy as np
import pytest
from support import read_banking

import embedkit


def test_cuda_request_without_cuda_is_a_typed_error(minilm):
    with pytest.raises(embedkit.DeviceUnavailableError, match="CUDA"):
        embedkit.Runtime(minilm.onnx_path, device="cuda")
    with pytest.raises(embedkit.DeviceUnavailableError):
        embedkit.Embedder(device="cuda").fit().transform(["hello"])


def test_auto_falls_back_with_a_logged_warning(minilm, caplog):
    from embedkit.runtimes import onnx_runtime as runtime_module

    runtime_module._warned.clear()  # device="auto" warns once per process: an earlier test may have had it
    with caplog.at_level(logging.WARNING, logger="embedkit.runtimes.onnx_runtime"):
        runtime = embedkit.Runtime(minilm.onnx_path, device="auto")
    assert runtime.device == "cpu" and runtime.providers == ["CPUExecutionProvider"]
    assert any("CUDA" in r.getMessage() for r in caplog.records)


def test_bad_settings_are_rejected(minilm):
    with pytest.raises(ValueError, match="device"):
        embedkit.Runtime(minilm.onnx_path, device="gpu")
    with pytest.raises(ValueError, match="threads"):
        embedkit.Runtime(minilm.onnx_path, threads=0)


def test_threads_and_streams(minilm):
    one = embedkit.Runtime(minilm.onnx_path, threads=1)
    assert (one.threads, one.streams) == (1, 1)
    two = embedkit.Runtime(minilm.onnx_path, threads=2, streams=1)
    assert len(two.sessions) == 1


def test_batch_size_and_neighbour_invariance(minilm):
    texts, _ = read_banking("test", 300)
    texts = texts + ["a much longer text " * 30]
    base = embedkit.TextEncoder(minilm, threads=1, batch_tokens=1).encode(texts).vectors  # one text per batch
    for kwargs in ({"batch_tokens": 64}, {"batch_tokens": 4096}, {"threads": 2}, {"threads": 2, "streams": 2}):
        other = embedkit.TextEncoder(minilm, **kwargs).encode(texts).vectors
        assert np.abs(other - base).max() <= 1e-5, kwargs
    rng = np.random.default_rng(1)
    order = rng.permutation(len(texts))
    shuffled = embedkit.TextEncoder(minilm).encode([texts[i] for i in order]).vectors
    assert np.abs(shuffled[np.argsort(order)] - base).max() <= 1e-5


def test_io_binding_path_gives_the_same_rows(minilm):
    """The IO-binding path CUDA uses (bind inputs, allocate the output in the session, copy it
    out once) runs on CPU too: same rows as the plain path, through both runtimes' map()."""
    texts, _ = read_banking("test", 200)
    plain = embedkit.TextEncoder(minilm).encode(texts).vectors
    bound = embedkit.TextEncoder(minilm, runtime="onnxruntime")
    bound.runtime = embedkit.Runtime(minilm.onnx_path, io_binding=True)
    assert bound.runtime.io_binding and not embedkit.Runtime(minilm.onnx_path).io_binding
    assert np.abs(bound.encode(texts).vectors - plain).max() <= 1e-6


def test_results_come_back_in_input_order(minilm):
    texts = ["short", "a somewhat longer sentence here", "mid length text", "x"]
    enc = embedkit.TextEncoder(minilm, batch_tokens=8)
    together = enc.encode(texts).vectors
    for i, t in enumerate(texts):
        np.testing.assert_allclose(enc.encode([t]).vectors[0], together[i], atol=1e-5)


OOM_SCRIPT = """
import resource, sys, numpy as np
from embedkit.runtimes.onnx_runtime import Runtime
rt = Runtime(sys.argv[1], threads=1, streams=1, io_binding=sys.argv[2] == "bound")
x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
one = rt.run({"pixel_values": x})
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
# A real allocation limit: 200 MB above what the process holds now. A batch of 256 needs
# over a GB of activations; 16 images need far less.
resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
out = rt.run({"pixel_values": np.repeat(x, 256, axis=0)})
print("halvings", rt.halvings, out.shape, float(np.abs(out - one).max()))
"""


@pytest.mark.parametrize("mode", ["plain", "bound"])
def test_out_of_memory_halves_the_batch_and_skips_nothing(tmp_path, mode):
    import subprocess
    import sys

    import embedkit

    artifact = embedkit.export("mobilenet-v2")
    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(artifact.onnx_path), mode], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    _, halvings, rows, cols, diff = run.stdout.replace("(", "").replace(")", "").replace(",", "").split()
    assert int(halvings) >= 1 and (int(rows), int(cols)) == (256, 1280)
    assert float(diff) <= 1e-5  # every row equals the image embedded alone
    assert "out of memory on a batch of 256" in run.stderr
