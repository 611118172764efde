"""The README's and docs/'s examples run as written, and what they name exists.

Every ```python block of README.md and docs/*.md runs here: it prints what its comments say
(a ``print(...)  # out`` line, or a line ``# out`` at the start of a line). A block that cannot
run as it stands says so on the line above it (``<!-- docs-test: skip: why -->``, naming the
test that covers it); the plugin files are written out and installed for real, and the
ONNX-only plugin is compared with the file it shows. Every relative link and every path into
the checkout (``embedkit/...py``, ``tests/...``, ``benchmarks/...``, ``plugins/...``) must
exist, and every dotted ``embedkit.pkg.module[.name]`` they name must import.
"""
import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
README = TEXT[ROOT / "README.md"]
ALL = "\n".join(TEXT.values())
# A python block, with the marker line just above it, if any.
BLOCK = re.compile(r"(?:<!-- ([\w-]+): ?(.*?) -->\n)?```python\n(.*?)```", re.S)
SKIP = "docs-test"


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks() -> list[tuple[str, int, str | None, str, str]]:
    """(page, line, marker, marker argument, code) for every python block of every page."""
    found = []
    for page, text in TEXT.items():
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(3)) + 1
            found.append((_name(page), line, m.group(1), m.group(2) or "", m.group(3)))
    return found


def _expected(code: str) -> list[str]:
    out = []
    for line in code.splitlines():
        if line.startswith("print(") and "# " in line:
            out.append(line.split("# ", 1)[1].strip())
        elif line.startswith("# "):
            out.append(line[2:].strip())
    return out


RUN = [b for b in _blocks() if b[2] is None]


@pytest.mark.parametrize("page,line,code", [(p, n, c) for p, n, _, _, c in RUN],
                         ids=[f"{p}:{n}" for p, n, *_ in RUN])
def test_example_prints_what_it_says(page, line, code, minilm, no_tuning_records_left):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n" * (line - 1) + code, page, "exec"), {})
    assert out.getvalue().splitlines() == _expected(code)


def test_every_python_block_runs_or_says_which_test_covers_it():
    blocks = _blocks()
    markers = {marker for _, _, marker, _, _ in blocks if marker}
    assert markers <= {SKIP, "readme-plugin", "readme-onnx-plugin"}, markers
    for page, line, marker, argument, _ in blocks:
        if marker == SKIP:
            assert argument.startswith("skip: ") and len(argument) > 12, (page, line, argument)
    for section in ("Using it", "Images"):  # the tour's examples run here
        body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert any(m.group(1) is None for m in BLOCK.finditer(body)), section


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./<-])((?:embedkit|tests|benchmarks|plugins)/[\w./-]*[\w/])")
DOTTED = re.compile(r"`(embedkit(?:\.[A-Za-z_]\w*){2,})")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_and_path_points_at_something_that_exists():
    broken = []
    for page, text in TEXT.items():
        prose = re.sub(r"<!-- readme-[\w-]+: \S+ -->\n```\w+\n.*?```", "", text, flags=re.S)  # plugin sources
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{_name(page)}: link {target}")
            elif anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{_name(page)}: link {target} (no such heading)")
        for path in REPO_PATH.findall(prose):
            if not (ROOT / path).exists():
                broken.append(f"{_name(page)}: path {path}")
    assert broken == [], "\n".join(broken)


def test_every_dotted_embedkit_name_imports():
    """``embedkit.features.ray``, ``embedkit.models.probes.BF16_LIMITS``: module paths moved with the
    restructure; each name the docs give must still be there."""
    broken = []
    for page, text in TEXT.items():
        for dotted in sorted(set(DOTTED.findall(text))):
            parts = dotted.split(".")
            value, cut = importlib.import_module("embedkit"), 1
            while cut < len(parts) and hasattr(value, "__path__"):  # a package: import what it holds
                if importlib.util.find_spec(".".join(parts[: cut + 1])) is None:
                    break
                value, cut = importlib.import_module(".".join(parts[: cut + 1])), cut + 1
            try:
                for attr in parts[cut:]:
                    value = getattr(value, attr)
            except AttributeError:
                broken.append(f"{_name(page)}: {dotted}")
    assert broken == [], "\n".join(broken)


def test_architecture_lists_the_layers_of_test_layers_in_order():
    from test_layers import LAYERS

    text = TEXT[ROOT / "docs" / "architecture.md"].split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    listed = [tuple(re.sub(r"(/|\.py)$", "", n) for n in re.findall(r"`([^`]+)`", line.split(":", 1)[0]))
              for line in re.findall(r"^\d+\. (.*)$", text, re.M)]
    assert listed == [tuple(layer) for layer in LAYERS]


def _write_plugin_files(root: Path) -> Path:
    files = re.findall(r"<!-- readme-plugin: (\S+) -->\n```\w+\n(.*?)```", ALL, re.S)
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


def test_readme_shows_the_onnx_only_plugin_as_it_ships():
    blocks = re.findall(r"<!-- readme-onnx-plugin: (\S+) -->\n```python\n(.*?)```", ALL, re.S)
    assert len(blocks) == 1
    rel, code = blocks[0]
    assert (ROOT / rel).read_text() == code


def test_fine_tuning_in_batch_example_builds_the_estimator_it_names():
    """The in-batch contrastive example constructs (fitting it is benchmarks/fewshot.py's job) with
    exactly the settings docs/finetuning.md names, and they pass scikit-learn's clone."""
    from sklearn.base import clone

    import embedkit

    (code,) = [code for *_, code in _blocks() if "embedkit.FinetunedClassifier(" in code]
    scope = {"embedkit": embedkit}
    exec(compile(code, "docs/finetuning.md", "exec"), scope)
    params = clone(scope["clf"]).get_params()
    assert params["objective"] == "contrastive" and params["loss"] == "in-batch"
    assert (params["iterations"], params["batch_size"], params["lr"]) == (10, 77, 5e-5)
