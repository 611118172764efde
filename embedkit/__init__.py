"""embedkit: frozen pretrained backbones -> ONNX -> fast embeddings -> light heads.

Heavy modules load on first use, so ``import embedkit`` stays fast and never imports torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from . import moved
from .version import __version__

moved.install()  # the flat layout's module paths still import (see embedkit.moved)

_EXPORTS = {
    "Backbone": "backbones.backbone",
    "TextPreprocess": "backbones.backbone",
    "ImagePreprocess": "backbones.backbone",
    "OnnxModel": "backbones.backbone",
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "get_backbone": "backbones.registry",
    "list_backbones": "backbones.registry",
    "plugin_report": "backbones.registry",
    "register_plugin": "backbones.registry",
    "Artifact": "models.store",
    "ModelStore": "models.store",
    "export": "models.exporter",
    "resolve": "models.resolve",
    "Runtime": "runtimes.onnx_runtime",
    "TextEncoder": "encoders.text",
    "ImageEncoder": "encoders.image",
    "ImageProcessor": "inputs.image",
    "Embeddings": "encoders.embeddings",
    "embed": "encoder",
    "encoder_for": "encoder",
    "ItemError": "inputs.items",
    "image_folder": "inputs.folders",
    "ImageFolder": "inputs.folders",
    "file_list": "inputs.sources",
    "FeatureStore": "features.store",
    "save": "heads.persistence",
    "train_head": "heads.training",
    "report": "evaluation",
    "CurveReport": "evaluation",
    "finetune": "finetuning.finetune",
    "FinetuneResult": "finetuning.finetune",
    "FinetunedClassifier": "finetuning.classifier",
    "CheckpointError": "errors",
    "HeadBackboneMismatchError": "errors",
    "search": "heads.persistence",
    "save_index": "heads.persistence",
    "load": "heads.persistence",
    "UnsafeModelError": "errors",
    "FaissKNNClassifier": "heads.knn",
    "FaissNearestNeighbors": "heads.knn",
    "quantize": "models.quantization",
    "half": "models.precision",
    "tune": "encoders.tuning",
    "TorchRuntime": "runtimes.torch_runtime",
    "OpenVINORuntime": "runtimes.openvino_runtime",
    "quantization_report": "encoders.quantization",
    "extract": "features.extraction",
    "compact_features": "features.compaction",
    "CompactReport": "features.compaction",
    "Compact": "encoders.compact",
    "Calibration": "encoders.compact",
    "ExtractReport": "features.run",
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
    "ImageAugment": "finetuning.augment",
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
