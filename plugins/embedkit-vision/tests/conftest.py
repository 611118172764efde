"""Fixtures for the vision plugin's tests: one model store per session, the hymenoptera set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HYMENOPTERA = Path(__file__).resolve().parents[4] / "shared" / "data" / "images" / "hymenoptera"


@pytest.fixture(scope="session", autouse=True)
def vision_store() -> Path:
    """The test run's model store (the checkout's ignored models/.test-cache), never the user's cache."""
    root = Path(__file__).resolve().parents[3] / "models" / ".test-cache" / "embedkit"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["EMBEDKIT_HOME"] = str(root)  # even when the user has set one: tests never write there
    return Path(os.environ["EMBEDKIT_HOME"])


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} is not present")
    return HYMENOPTERA
