"""Shared fixtures: one model store per test session, real MiniLM weights, real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide EMBEDKIT_HOME, also seen by the subprocesses the tests start."""
    root = tmp_path_factory.mktemp("models")
    os.environ["EMBEDKIT_HOME"] = str(root)
    return root


@pytest.fixture(scope="session")
def minilm(model_store: Path):
    import embedkit

    return embedkit.export("minilm-l6")
