"""The import contract: embedkit's layers import only downwards, without cycles.

Read from the code's own imports (``ast``), module-level and function-level alike, so a
deferred import cannot hide an upward one. A layer is a subpackage or a top-level module;
:data:`LAYERS` lists them from the top down, and modules on one line may not import each other.
``docs/architecture.md`` draws the same map.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "embedkit"

# From the top down. Each entry is one layer: subpackages and top-level modules of embedkit.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("demo",),
    ("serve",),
    ("evaluation",),
    ("finetuning",),
    ("heads",),
    ("testing",),
    ("embedder",),
    ("features",),
    ("encoder",),
    ("encoders",),
    ("runtimes",),
    ("models",),
    ("inputs",),
    ("backbones",),
    ("fs",),
    ("errors", "hookspecs", "version", "moved"),
]
# Third-party packages heavy enough (or optional enough) to import inside the function that
# needs them: everything else, and every embedkit module, is imported at the top of the module.
HEAVY = {"torch", "onnx", "onnxruntime", "faiss", "ray", "fastapi", "starlette", "uvicorn", "openvino",
         "sklearn", "safetensors", "transformers", "sentence_transformers", "pandas", "pyarrow", "matplotlib",
         "skops", "joblib", "platformdirs", "tqdm", "PIL", "tokenizers", "prometheus_client", "onnxscript",
         "onnxruntime.quantization", "psutil", "httpx", "multipart", "python_multipart", "scipy", "numpy"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(target module, names, line, at module level) for every embedkit import in a module."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    for node in tree.body:  # imports under a module-level if/try are module level too
        if isinstance(node, (ast.If, ast.Try)):
            top.update(map(id, ast.walk(node)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "embedkit" or target.startswith("embedkit."):
                found.append((target, [a.name for a in node.names], node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("embedkit."):
                    found.append((alias.name, [], node.lineno, id(node) in top))
    return found


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # embedkit itself: the lazy public API, above everything
    for rank, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return rank
    return None


def _edges() -> list[tuple[str, str, list[str], int, bool]]:
    modules = _modules()
    edges = []
    for name, path in modules.items():
        for target, names, line, top in _imports(name, path):
            # `from embedkit.pkg import module` names a module: the edge goes to that module
            subs = [n for n in names if f"{target}.{n}" in modules]
            for sub in subs:
                edges.append((name, f"{target}.{sub}", [], line, top))
            if len(subs) < len(names) or not names:
                edges.append((name, target, [n for n in names if n not in subs], line, top))
    return edges


def upward_imports() -> list[str]:
    bad = []
    for source, target, _, line, _ in _edges():
        low, high = _layer_of(target), _layer_of(source)
        if target == "embedkit" and source != "embedkit":
            bad.append(f"{source}:{line} imports the package embedkit itself (import the defining module)")
            continue
        if low is None or high is None:
            continue
        if low < high or (low == high and source.split(".")[1] != target.split(".")[1]):
            bad.append(f"{source}:{line} imports {target}, which is in a layer above or beside it "
                       f"({LAYERS[low]} vs {LAYERS[high]})")
    return bad


def cycles() -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for source, target, _, _, _ in _edges():
        if target in _modules() and target != source:
            graph.setdefault(source, set()).add(target)
    found, index, low, stack, on, counter = [], {}, {}, [], set(), [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports() -> list[str]:
    """Names with a leading underscore, or modules named so, imported from another subpackage."""
    bad = []
    for source, target, names, line, _ in _edges():
        if _layer_of(target) is None:
            continue
        same = source.split(".")[:2] == target.split(".")[:2]
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
            private.append(target)
        if private and not same:
            bad.append(f"{source}:{line} imports {', '.join(private)} from {target}")
    return bad


def deferred_imports() -> list[str]:
    """embedkit imports made inside a function (only heavy third-party packages belong there);
    the CLI's command modules are the exception: each command imports what it runs, so that
    ``embedkit --help`` and every other command stay fast."""
    return [f"{source}:{line} imports {target} inside a function" for source, target, _, line, top in _edges()
            if not top and not source.startswith("embedkit.cli")]


def test_no_import_goes_up_or_sideways() -> None:
    assert upward_imports() == []


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_no_private_name_crosses_a_subpackage() -> None:
    assert private_imports() == []


def test_embedkit_modules_are_imported_at_module_level() -> None:
    assert deferred_imports() == []


def test_every_module_is_in_a_layer() -> None:
    missing = sorted(name for name in _modules() if name != "embedkit" and _layer_of(name) is None)
    assert missing == []


def test_the_contract_fails_on_a_deliberate_upward_import(tmp_path: Path) -> None:
    """The check is not vacuous: an upward import planted in a copy of the package is reported."""
    import shutil

    copy = tmp_path / "embedkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    victim = copy / "fs" / "paths.py"
    victim.write_text(victim.read_text() + "\nfrom ..heads.training import train_head  # planted\n")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_layers as t; "
            f"from pathlib import Path; t.ROOT = Path({str(tmp_path)!r}); t.PACKAGE = t.ROOT / 'embedkit'; "
            "print('\\n'.join(t.upward_imports()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "embedkit.fs.paths" in out.stdout and "embedkit.heads.training" in out.stdout


@pytest.mark.parametrize("command", [["-c", "import embedkit, sys; embedkit.Embedder; embedkit.embed; "
                                            "assert 'torch' not in sys.modules, 'torch imported'"],
                                     ["-m", "embedkit.cli", "--help"]])
def test_import_and_help_stay_torch_free(command: list[str]) -> None:
    code = ("import runpy, sys; sys.argv = ['embedkit', '--help']\n"
            "try:\n    runpy.run_module('embedkit.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'") if command[0] == "-m" else command[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_module_is_on_the_architecture_map() -> None:
    """docs/architecture.md draws the module map from the real tree: a new module must be on it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for name, path in _modules().items():
        if path.name == "__init__.py":
            continue
        leaf = name.rpartition(".")[2]
        named = name in text or str(path.relative_to(ROOT)) in text
        if not named and leaf.startswith("_"):
            named = f"`{leaf}`" in text
        if not named:
            missing.append(name)
    assert missing == []
