"""A tiny real text model for feature-store tests, and a way to make a folder read-only or full."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import embedkit


@pytest.fixture(scope="session", name="tiny")
def tiny_fixture(model_store: Path) -> embedkit.Artifact:
    """A tiny honest text encoder (real tokenizer, 8-d mean of token embeddings), exported once."""
    from tiny import Pooled, text_backbone

    return embedkit.export(text_backbone("tiny-pooled", Pooled))


def confined(command: list[str], mounts: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in a private mount namespace after the shell ``mounts`` (e.g. a read-only
    bind mount or a small tmpfs); the test is skipped where namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not allowed here: {probe.stderr.decode().strip()}")
    script = f"set -e; {mounts}; exec {shlex.join(command)}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]
