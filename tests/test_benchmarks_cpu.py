"""The CPU benchmarks end: their worker timeouts fire instead of a wait for ever."""
from __future__ import annotations

import importlib.util
import sys
import time

import pytest
from support import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SILENT = "import sys\nprint('ready', flush=True)\nfor line in sys.stdin:\n    pass\n"  # never answers a round
NOISY = "import sys\nsys.stderr.write('w' * 2_000_000)\nprint('ready', flush=True)\n"  # fills any stderr pipe


def test_a_worker_that_never_answers_is_killed_at_its_timeout(tmp_path):
    bench = load("text_cpu")
    worker = bench.Worker([sys.executable, "-c", SILENT], tmp_path / "err")
    assert worker.ask(None, 60) == "ready"
    started = time.perf_counter()
    assert worker.ask("go", 1.0) is None
    assert time.perf_counter() - started < 10 and "no answer within 1s" in worker.why
    assert worker.proc.poll() is not None  # killed, not left behind


def test_a_worker_writing_much_to_stderr_does_not_block(tmp_path):
    bench = load("text_cpu")
    worker = bench.Worker([sys.executable, "-c", NOISY], tmp_path / "err")
    assert worker.ask(None, 60) == "ready"
    assert worker.ask("go", 5) is None and "exited (0)" in worker.why  # it ended: said so, not waited on


def test_a_dataloader_worker_that_stalls_raises_at_its_timeout(monkeypatch):
    torch = pytest.importorskip("torch")
    bench = load("images_cpu")
    monkeypatch.setattr(bench, "torch_preprocess", lambda path, preprocess: time.sleep(60))
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="timed out"):
        bench.torch_loader(torch.nn.Identity(), ["a.jpg", "b.jpg"], None, 2, torch, workers=1, timeout=1.0)
    assert time.perf_counter() - started < 30
