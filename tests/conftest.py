"""Shared fixtures: one model store per test session, real MiniLM weights, real data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The test run's model store: inside the checkout's ignored models/ folder (never the user's
# real cache), kept between runs so the real MiniLM export is paid once per checkout. It is laid
# out as a user cache folder (<XDG_CACHE_HOME>/embedkit) so tests can also reach it the way a
# process without EMBEDKIT_HOME does.
TEST_CACHE = Path(__file__).resolve().parents[1] / "models" / ".test-cache"

# No first-use runtime measurement (embedkit.encoders.tuning.first_use) in the test run: it would
# cost seconds per artifact and make results depend on this machine's speeds. Set at import, so
# that it holds for every test collected in this session and the subprocesses they start; the
# tests of the feature itself turn it back on (the ``first_use_tuning`` fixture).
os.environ["EMBEDKIT_TUNE"] = "0"


@pytest.fixture(scope="session", autouse=True)
def model_store() -> Path:
    """A session-wide EMBEDKIT_HOME, also seen by the subprocesses the tests start."""
    root = TEST_CACHE / "embedkit"
    root.mkdir(parents=True, exist_ok=True)
    # Exports are kept between runs (deterministic, keyed by their inputs); runtime choices that an
    # interrupted run may have recorded are not: every session starts with none.
    shutil.rmtree(root / "tuning", ignore_errors=True)
    os.environ["EMBEDKIT_HOME"] = str(root)
    return root


@pytest.fixture()
def no_tuning_records_left(model_store):
    """Other tests expect no recorded runtime choice (ONNX Runtime on CPU): drop what a test that
    runs ``tune`` measured. Use with ``pytestmark = pytest.mark.usefixtures("no_tuning_records_left")``."""
    yield
    for path in (model_store / "tuning").glob("*.json"):
        path.unlink()


@pytest.fixture()
def first_use_tuning(monkeypatch, no_tuning_records_left):
    """First-use tuning on (``EMBEDKIT_TUNE=1``) for one test, and its records dropped after it."""
    monkeypatch.setenv("EMBEDKIT_TUNE", "1")
    yield


@pytest.fixture(scope="session")
def minilm(model_store: Path):
    import embedkit

    return embedkit.export("minilm-l6")
