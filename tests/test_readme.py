"""The README's examples run as written: the usage block, and the plugin installed for real."""
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_usage_example_prints_what_it_says(minilm):
    code = _python_blocks("Using it")[0]
    expected = [line.split("# ", 1)[1].strip() for line in code.splitlines()
                if line.startswith("print(") and "# " in line]
    expected += [line[2:].strip() for line in code.splitlines() if line.startswith("# ")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().splitlines() == expected


def test_images_example_prints_what_it_says():
    code = _python_blocks("Images")[0]
    expected = [line[2:].strip() for line in code.splitlines() if line.startswith("# ")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().splitlines() == expected


def _write_plugin_files(root: Path) -> Path:
    files = re.findall(r"<!-- readme-plugin: (\S+) -->\n```\w+\n(.*?)```", README, re.S)
    assert len(files) == 2
    for rel, content in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return root / files[0][0].split("/")[0]


def _pip_install(source: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)], check=True, timeout=600,
    )


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plugins")
    target = root / "site"
    _pip_install(_write_plugin_files(root / "src"), target)
    broken = root / "src" / "broken-embedkit-plugin"
    broken.mkdir(parents=True)
    (broken / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "broken-embedkit-plugin"\nversion = "0.3.0"\n'
        '[project.entry-points.embedkit]\nbroken = "broken_embedkit_plugin"\n'
    )
    (broken / "broken_embedkit_plugin.py").write_text("import a_module_that_does_not_exist\n")
    _pip_install(broken, target)
    return {"PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_readme_plugin_installs_lists_and_passes_check(installed_plugins):
    listed = run_cli("backbones", env=installed_plugins)
    assert listed.returncode == 0, listed.stderr
    assert "minilm-l3-max" in listed.stdout and "minilm-l6" in listed.stdout
    checked = run_cli("check", "minilm-l3-max", env=installed_plugins)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "all rules pass" in checked.stdout


def test_broken_plugin_is_listed_and_the_rest_keep_working(installed_plugins):
    report = run_cli("plugins", env=installed_plugins)
    assert report.returncode == 0, report.stderr
    line = next(l for l in report.stdout.splitlines() if l.startswith("broken"))
    assert "broken-embedkit-plugin 0.3.0" in line and "broken" in line.split("0.3.0")[1]
    assert "a_module_that_does_not_exist" in report.stdout
    assert re.search(r"^my_plugin\s+my-embedkit-plugin 1\.0\.0\s+ok", report.stdout, re.M)
    embedded = run_cli("export", "minilm-l6", env=installed_plugins)
    assert embedded.returncode == 0 and "minilm-l6" in embedded.stdout


def test_gpu_section_example_prints_what_it_says(minilm, model_store):
    code = _python_blocks("GPU, fp16 and runtime selection")[0]
    expected = [line.split("# ", 1)[1].strip() for line in code.splitlines()
                if line.startswith("print(") and "# " in line]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        for path in (model_store / "tuning").glob("*.json"):
            path.unlink()  # other tests expect no recorded choice
    assert out.getvalue().splitlines() == expected


def test_readme_shows_the_onnx_only_plugin_as_it_ships():
    blocks = re.findall(r"<!-- readme-onnx-plugin: (\S+) -->\n```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1
    rel, code = blocks[0]
    assert (ROOT / rel).read_text() == code


def test_fine_tuning_in_batch_example_builds_the_estimator_it_names():
    """The in-batch contrastive example constructs (fitting it is benchmarks/fewshot.py's job) with
    exactly the settings the README names, and they pass scikit-learn's clone."""
    from sklearn.base import clone

    import embedkit

    (code,) = [b for b in _python_blocks("Fine-tuning") if "FinetunedClassifier" in b]
    scope = {"embedkit": embedkit}
    exec(compile(code, "README.md", "exec"), scope)
    params = clone(scope["clf"]).get_params()
    assert params["objective"] == "contrastive" and params["loss"] == "in-batch"
    assert (params["iterations"], params["batch_size"], params["lr"]) == (10, 77, 5e-5)
