"""The embedkit error hierarchy.

Every error mixes in the builtin a caller would naturally catch, so
``except KeyError`` still works for an unknown backbone name.
"""
from __future__ import annotations

from typing import Any


class EmbedkitError(Exception):
    """Base class of every error raised by embedkit."""


class UnknownBackboneError(EmbedkitError, KeyError):
    """A backbone name that no loaded plugin registered."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = sorted(available)
        super().__init__(name)

    def __str__(self) -> str:
        names = ", ".join(self.available) or "none (is a plugin such as embedkit-text installed?)"
        return (
            f"unknown backbone {self.name!r}; registered backbones: {names}. "
            "A local Hugging Face or sentence-transformers folder can be given by path."
        )


class InvalidBackboneError(EmbedkitError, ValueError):
    """A backbone declaration that breaks the contract (bad name, dim, preprocessing...)."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"[{rule}] {message}")


class PluginError(EmbedkitError, RuntimeError):
    """A plugin that failed to load or registered something invalid."""


class DuplicateBackboneError(PluginError):
    """Two plugins registered the same backbone name."""


class MissingDependencyError(EmbedkitError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{module}' package: pip install 'embedkit[{extra}]' "
            f"(install torch==2.13.0 first for the CPU build)"
        )


class ExportError(EmbedkitError, RuntimeError):
    """Exporting a backbone to ONNX failed."""


class ExportParityError(ExportError):
    """The exported ONNX graph disagrees with the torch module on the probe inputs."""

    def __init__(self, name: str, exporter: str, parity: dict[str, Any], limits: dict[str, float]):
        self.name = name
        self.exporter = exporter
        self.parity = parity
        self.limits = limits
        scale = float(parity.get("output_scale", 1.0))
        scaled = f" x output scale {scale:.3g}" if scale > 1.0 else ""
        super().__init__(
            f"ONNX export of {name!r} ({exporter}) failed the parity gate: "
            f"max |diff| = {parity['max_abs_diff']:.3g} (limit {limits['max_abs_diff']:g}{scaled}), "
            f"min cosine = {parity['min_cosine']:.8f} (limit {limits['min_cosine']:g}) "
            f"on {parity['probes']} probes at batch sizes {parity['batch_sizes']}"
        )


class ArtifactError(EmbedkitError, RuntimeError):
    """A model-store artifact is missing, incomplete or corrupted."""


class DeviceUnavailableError(EmbedkitError, RuntimeError):
    """The requested device (e.g. CUDA) is not what the ONNX Runtime session runs on."""


class InvalidInputError(EmbedkitError, ValueError):
    """Some input items could not be embedded; ``errors`` lists one record per bad item.

    ``ok`` (when given) is the boolean mask of the items that did embed, in input order, so a
    caller can keep the good items: ``[x for x, k in zip(X, exc.ok) if k]``.
    """

    def __init__(self, errors: list[Any], ok: Any = None):
        self.errors = list(errors)
        self.ok = ok
        shown = "; ".join(f"item {e.index}: {e.code} ({e.message})" for e in self.errors[:5])
        more = f" and {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        super().__init__(f"{len(self.errors)} input item(s) could not be embedded: {shown}{more}")


class UnsafeModelError(EmbedkitError, PermissionError):
    """Loading would run code from a file (a pickle, an untrusted skops type) or a file changed."""


class StoreError(EmbedkitError, RuntimeError):
    """The feature store is inconsistent, of another schema, or lacks what was asked for."""


class UnsupportedInputError(EmbedkitError, ValueError):
    """An input file or column embedkit cannot read (wrong format, missing column)."""


class BackboneCheckError(EmbedkitError, AssertionError):
    """A backbone failed one rule of :func:`embedkit.testing.check_backbone`."""

    def __init__(self, backbone: str, rule: str, message: str):
        self.backbone = backbone
        self.rule = rule
        super().__init__(f"backbone {backbone!r} breaks rule '{rule}': {message}")


class UsageError(EmbedkitError, ValueError):
    """A command line that cannot run: a bad option value, a missing argument, a path that does not exist.

    ``usage`` is the command's usage line, printed before the message.
    """

    def __init__(self, message: str, usage: str = ""):
        self.usage = usage
        super().__init__(message)


class DatasetError(EmbedkitError, ValueError):
    """Labelled data too small or too degenerate for what was asked (one class, too few examples)."""
