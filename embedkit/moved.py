"""Module paths of embedkit before its layered layout, still importable (with a DeprecationWarning).

Until 0.1 the package was flat (``embedkit.store``, ``embedkit.ray``, ``embedkit.tuning``...), and
scripts, notebooks and plugins' tests import from those paths (the README itself showed
``from embedkit.ray import EmbedBatch``). Each old path is now an alias module: reading a name
from it looks the name up in the modules that hold that code today (:data:`MOVED`), in order,
and warns once per old path with the new one. The alias is a view: setting an attribute on it
(e.g. monkeypatching) does not reach the module that defines the name; patch that one.

Installed by ``import embedkit`` as the last finder on ``sys.meta_path``, so it is only asked
for names no real module has. ``embedkit.finetune``, ``embedkit.heads`` and ``embedkit.serve``
are not here: the first is the public function, the other two are packages now (their old
contents: ``embedkit.heads.knn``, ``embedkit.serve.app``).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

# old module -> the modules that hold its names now, searched in this order
MOVED: dict[str, tuple[str, ...]] = {
    "atomic": ("fs.atomic",),
    "locks": ("fs.locks",),
    "paths": ("fs.paths",),
    "outputs": ("fs.outputs",),
    "backbone": ("backbones.backbone",),
    "plugins": ("backbones.registry",),
    "blocks": ("backbones.blocks",),
    "known_blocks": ("backbones._known_blocks",),
    "text": ("inputs.text", "inputs.items"),
    "image": ("inputs.image", "inputs.items"),
    "files": ("inputs.files",),
    "sources": ("inputs.sources", "inputs.tables", "inputs.folders", "inputs.fingerprints", "inputs.files"),
    "artifacts": ("models.store", "fs.home"),
    "exporter": ("models.exporter", "models.resolve", "models._commit"),
    "importer": ("models.importer",),
    "probes": ("models.probes",),
    "precision": ("models.precision",),
    "quantization": ("models.quantization", "encoders.quantization"),
    "tuned": ("models.finetuned",),
    "runtime": ("runtimes.onnx_runtime", "runtimes.cpu"),
    "torch_runtime": ("runtimes.torch_runtime",),
    "openvino_runtime": ("runtimes.openvino_runtime",),
    "cpu": ("runtimes.cpu",),
    "tuning": ("encoders.tuning", "runtimes.select", "runtimes.candidates", "runtimes.records", "runtimes.table"),
    "store": ("features.store",),
    "namespace": ("features.namespace", "features.verification"),
    "cache": ("features.cache",),
    "shards": ("features.shards",),
    "extraction": ("features.extraction", "features.run"),
    "ray": ("features.ray",),
    "raycluster": ("features.ray_cluster",),
    "training": ("heads.training", "heads.catalog", "heads.labels", "heads.splits", "heads.curves"),
    "persistence": ("heads.persistence",),
    "plots": ("heads.plots",),
    "curves": ("finetuning.curves",),
    "trainer": ("finetuning.loop", "finetuning.objectives"),
    "contrastive": ("finetuning.contrastive", "finetuning.sampling"),
    "checkpoint": ("finetuning.checkpoints",),
    "augment": ("finetuning.augment",),
    "trainset": ("finetuning.dataset",),
    "classifier": ("finetuning.classifier",),
    "service": ("serve.service", "serve.settings", "serve.api_error"),
    "batching": ("serve.batching",),
    "metrics": ("serve.metrics",),
}


class MovedModule(ModuleType):
    """An old module path: names are read from the modules that hold them now."""

    def __init__(self, name: str, homes: Sequence[str]):
        super().__init__(name, f"moved: {name} is now {', '.join('embedkit.' + h for h in homes)}")
        self.__homes = tuple(f"embedkit.{h}" for h in homes)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__homes)}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for home in self.__homes:
            names.update(n for n in dir(importlib.import_module(home)) if not n.startswith("_"))
        return sorted(names)


class _Loader(importlib.abc.Loader):
    def __init__(self, homes: Sequence[str]):
        self.homes = homes

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = ", ".join("embedkit." + h for h in self.homes)
        warnings.warn(f"{spec.name} moved: import from {new}", DeprecationWarning, stacklevel=3)
        return MovedModule(spec.name, self.homes)

    def exec_module(self, module: ModuleType) -> None:
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds ``embedkit.<old>`` for the old paths of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, leaf = fullname.partition(".")
        if package != "embedkit" or leaf not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(MOVED[leaf]))


def install() -> None:
    """Put :class:`MovedFinder` last on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
