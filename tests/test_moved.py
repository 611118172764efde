"""The flat layout's module paths (``embedkit.store``, ``embedkit.ray``...) still import, with a
DeprecationWarning naming the new path, and give the very objects the new modules define."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from embedkit.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_imports_and_names_only_modules_that_exist(old):
    module = importlib.import_module(f"embedkit.{old}")
    for home in MOVED[old]:
        importlib.import_module(f"embedkit.{home}")  # each home is a real module
    assert set(dir(module)) >= {n for n in dir(importlib.import_module(f"embedkit.{MOVED[old][0]}"))
                                if not n.startswith("_")}


@pytest.mark.parametrize("old, name, new", [
    ("ray", "EmbedBatch", "features.ray"),            # the README showed `from embedkit.ray import EmbedBatch`
    ("store", "FeatureStore", "features.store"),
    ("sources", "image_folder", "inputs.folders"),     # sources was split: every part is searched
    ("sources", "fingerprint", "inputs.fingerprints"),
    ("tuning", "make_runtime", "runtimes.select"),     # tuning was split between encoders/ and runtimes/
    ("tuning", "candidates_for", "runtimes.candidates"),
    ("text", "ItemFailure", "inputs.items"),
    ("exporter", "resolve", "models.resolve"),
])
def test_an_old_import_gives_the_object_its_new_module_defines(old, name, new):
    got = getattr(importlib.import_module(f"embedkit.{old}"), name)
    assert got is getattr(importlib.import_module(f"embedkit.{new}"), name)


def test_an_old_path_warns_once_with_the_new_one_and_a_missing_name_says_where_to_look():
    code = ("import warnings, embedkit\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from embedkit.store import FeatureStore\n"
            "    from embedkit.store import FeatureStore\n"
            "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
            "import embedkit.store\n"
            "try:\n    embedkit.store.no_such_name\n"
            "except AttributeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "['embedkit.store moved: import from embedkit.features.store']"
    assert "embedkit.features.store" in second and "no_such_name" in second


def test_new_modules_and_packages_are_never_shadowed():
    import embedkit.features.store as real
    import embedkit.heads as heads_package

    assert type(real).__name__ == "module" and real.__file__.endswith("features/store.py")
    assert heads_package.__file__.endswith("heads/__init__.py")
    assert not {"finetune", "heads", "serve"} & set(MOVED)  # a public function and two packages now
