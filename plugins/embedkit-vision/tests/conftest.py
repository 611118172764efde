"""Fixtures for the vision plugin's tests: one model store per session, the hymenoptera set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HYMENOPTERA = Path(__file__).resolve().parents[4] / "shared" / "data" / "images" / "hymenoptera"


@pytest.fixture(scope="session", autouse=True)
def vision_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vision-models")
    os.environ.setdefault("EMBEDKIT_HOME", str(root))
    return Path(os.environ["EMBEDKIT_HOME"])


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} is not present")
    return HYMENOPTERA
