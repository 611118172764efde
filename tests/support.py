"""Helpers shared by the tests (kept out of conftest.py: the plugin's tests have their own)."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BANKING = SHARED / "text" / "banking77"


def read_banking(split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    if not BANKING.is_dir():
        pytest.skip(f"{BANKING} is not present")
    with open(BANKING / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:limit]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=900,
    )


def kill_when(proc, ready, timeout: float) -> bool:
    """Poll ``ready()`` (every 2 ms) until it holds, ``proc`` ends or ``timeout`` s pass; then
    ``kill -9`` the process group of ``proc`` (started with ``start_new_session=True``) if it still
    runs and wait for it. True when it was killed."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return killed
