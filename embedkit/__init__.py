"""embedkit: frozen pretrained backbones -> ONNX -> fast embeddings -> light heads.

Heavy modules load on first use, so ``import embedkit`` stays fast and never imports torch.
"""
from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "backbone",
    "TextPreprocess": "backbone",
    "ImagePreprocess": "backbone",
    "OnnxModel": "backbone",
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "get_backbone": "plugins",
    "list_backbones": "plugins",
    "plugin_report": "plugins",
    "register_plugin": "plugins",
    "Artifact": "artifacts",
    "ModelStore": "artifacts",
    "export": "exporter",
    "resolve": "exporter",
    "Runtime": "runtime",
    "TextEncoder": "encoder",
    "ImageEncoder": "encoder",
    "ImageProcessor": "image",
    "Embeddings": "encoder",
    "embed": "encoder",
    "encoder_for": "encoder",
    "ItemError": "text",
    "image_folder": "sources",
    "ImageFolder": "sources",
    "file_list": "sources",
    "FeatureStore": "store",
    "save": "persistence",
    "train_head": "training",
    "finetune": "finetune",
    "FinetuneResult": "finetune",
    "FinetunedClassifier": "classifier",
    "CheckpointError": "errors",
    "HeadBackboneMismatchError": "errors",
    "search": "persistence",
    "save_index": "persistence",
    "load": "persistence",
    "UnsafeModelError": "errors",
    "FaissKNNClassifier": "heads",
    "FaissNearestNeighbors": "heads",
    "quantize": "quantization",
    "half": "precision",
    "tune": "tuning",
    "TorchRuntime": "torch_runtime",
    "OpenVINORuntime": "openvino_runtime",
    "quantization_report": "quantization",
    "extract": "extraction",
    "ExtractReport": "extraction",
    "StoreError": "errors",
    "StoreWriteError": "errors",
    "Embedder": "embedder",
    "check_backbone": "testing",
    "EmbedkitError": "errors",
    "UnknownBackboneError": "errors",
    "InvalidBackboneError": "errors",
    "PluginError": "errors",
    "DuplicateBackboneError": "errors",
    "MissingDependencyError": "errors",
    "ArtifactMismatchError": "errors",
    "BackboneNotAvailableError": "errors",
    "ExportError": "errors",
    "ExportParityError": "errors",
    "ArtifactError": "errors",
    "DeviceUnavailableError": "errors",
    "InvalidInputError": "errors",
    "BackboneCheckError": "errors",
    "UnsupportedInputError": "errors",
    "OutputError": "errors",
    "OutputExistsError": "errors",
    "OutputFolderMissingError": "errors",
    "OutputIsInputError": "errors",
    "UnsavableHeadError": "errors",
    "DatasetError": "errors",
    "UsageError": "errors",
    "RayClusterError": "errors",
    "IncompleteExtractionError": "errors",
    "InvalidUnfreezeError": "errors",
    "NoBlocksError": "errors",
    "InvalidAugmentError": "errors",
    "TrainingDivergedError": "errors",
    "NonFiniteOutputError": "errors",
    "ImageAugment": "augment",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embedkit' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(ModuleType):
    """``embedkit`` itself. A public function named like the submodule that defines it
    (``embedkit.finetune``, from ``embedkit/finetune.py``) stays the function when the import
    system binds that submodule on the package: importing it first (``from embedkit.finetune
    import ...``, as ``FinetunedClassifier.fit`` and ``report --finetune`` do) used to turn
    ``embedkit.finetune(...)`` into "'module' object is not callable"."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
