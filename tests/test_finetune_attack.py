"""Faults found by attacking the fine-tuning feature from its README (issue 12), one test each."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedkit.atomic import debris_of

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkpoint_killed_mid_write_leaves_only_files_embedkit_names(tmp_path):
    """safetensors' save_file wrote its own '.tmpXXXXXX' beside the target: a kill -9 during a
    checkpoint left it in checkpoints/, and `finetune --resume` then refused the run folder as
    holding a file embedkit did not write (so the run could not be resumed at all)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    script = ("import sys, torch\n"
              "from pathlib import Path\n"
              "from embedkit.checkpoint import save_best\n"
              "module, head = torch.nn.Linear(5000, 5000), torch.nn.Linear(8, 2)\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              "    save_best(Path(sys.argv[1]), module, head)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    seen: set[str] = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            seen.update(os.listdir(folder))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    seen.update(os.listdir(folder))
    assert "best.safetensors" in seen  # it did write, several times
    unknown = sorted(n for n in seen if n != "best.safetensors" and debris_of(n, "best.safetensors") is None)
    assert unknown == []
