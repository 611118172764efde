"""benchmarks/gpu.py runs end to end (on CPU here, the same code as on the GPU machine)."""
from __future__ import annotations

import subprocess
import sys

from support import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_gpu_benchmark_smoke_run_on_cpu_with_a_random_minilm_from_the_skeleton(tmp_path):
    skeleton = tmp_path / "skeleton"
    made = run("--write-skeleton", str(skeleton))
    assert made.returncode == 0, made.stderr[-2000:]
    assert (skeleton / "tokenizer.json").is_file() and not (skeleton / "model.safetensors").exists()
    done = run("--device", "cpu", "--texts", "120", "--images", "16", "--batch", "8", "--cnn", "mobilenet-v2",
               "--seconds", "0.1", "--skeleton", str(skeleton), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "random-initialised MiniLM-L6 architecture" in out
    assert "sentence-transformers encode (fp32)" in out and "torch eager fp32, model only" in out
    assert "end to end" in out and "tune: onnxruntime" in out and "min cosine to ST 1.0000" in out
    assert "embedkit mobilenet-v2 onnxruntime" in out and "best embedkit runtime vs torch eager" in out


def test_gpu_benchmark_says_clearly_when_there_is_no_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run("--texts", "10")
    assert done.returncode == 1 and "no CUDA device here" in done.stderr
