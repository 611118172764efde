"""The blocks embedkit infers for the networks it knows (see :mod:`embedkit.backbones.blocks`).

Each function returns block patterns (the form ``Backbone(blocks=...)`` declares), ``()`` when
the module is not of its family. torch, transformers and timm are used only when the module
comes from them (``sys.modules`` is checked first, nothing is imported to find out).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _is_transformers(module: Any) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def _transformers_blocks(module: "nn.Module") -> tuple[str, ...]:
    from torch import nn

    base_name, base = next(((n, m) for n, m in module.named_modules() if _is_transformers(m)), ("", None))
    if base is None:
        return ()
    # The layer stack: the ModuleList with the most children of one class.
    stack, size = None, 0
    for name, child in base.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > size and len({type(c) for c in child}) == 1:
            stack, size = name, len(child)
    if stack is None:
        return ()
    prefix = f"{base_name}." if base_name else ""
    # The embeddings: direct children of the model (and of the stack's parents) before the stack, holding an nn.Embedding.
    embeddings: list[str] = []
    scope, scope_name = base, ""
    for segment in stack.split("."):
        for name, child in scope.named_children():
            if name == segment:
                break
            if any(isinstance(m, nn.Embedding) for m in child.modules()):
                embeddings.append(f"{scope_name}{name}")
        scope, scope_name = getattr(scope, segment), f"{scope_name}{segment}."
    blocks = ["+".join(prefix + e for e in embeddings)] if embeddings else []
    return tuple(blocks + [f"{prefix}{stack}.*"])


def _timm_model(module: Any) -> tuple[str, Any] | None:
    for name, child in module.named_modules():
        if type(child).__module__.startswith("timm.") and callable(getattr(child, "group_matcher", None)):
            return name, child
    return None


def _timm_blocks(module: "nn.Module") -> tuple[str, ...]:
    found = _timm_model(module)
    if found is None:
        return ()
    prefix, model = found
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    owned = [(name, {f"{name}.{n}" for n, _ in child.named_parameters()}) for name, child in model.named_modules() if name]
    blocks = []
    for names in groups.values():
        blocks.append("+".join(f"{prefix}.{p}" if prefix else p for p in _cover(owned, set(names), order)))
    return tuple(blocks)


def _cover(owned: list[tuple[str, set[str]]], names: set[str], order: dict[str, int]) -> list[str]:
    """The fewest module paths (then parameter paths) whose parameters are exactly ``names``."""
    chosen: list[str] = []
    for module_name, own in owned:
        if own and own <= names and not any(module_name.startswith(c + ".") for c in chosen):
            chosen.append(module_name)
    covered = {n for n in names if any(n.startswith(c + ".") for c in chosen)}
    return chosen + sorted(names - covered, key=order.__getitem__)


def _vision_blocks(module: "nn.Module") -> tuple[str, ...]:
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        kind = type(child).__name__
        if kind == "EfficientNet" and hasattr(child, "_blocks") and hasattr(child, "_conv_stem"):
            # efficientnet-lite-pytorch (embedkit-vision's efficientnet-lite0): stem, MBConvs, head
            return (f"{prefix}_conv_stem+{prefix}_bn0", f"{prefix}_blocks.*", f"{prefix}_conv_head+{prefix}_bn1")
        if type(child).__module__.startswith("torchvision.models."):
            return _torchvision_blocks(child, prefix)
        if kind == "MobileNetV2" and _is_sequential(getattr(child, "features", None)):
            return (f"{prefix}features.*",)  # embedkit-vision's own MobileNetV2 (torchvision's names)
    return ()


def _is_sequential(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.Sequential)


def _stages(module: Any, path: str) -> list[str]:
    """The elements of a Sequential; a plain ``nn.Sequential`` of one block type (a stage) is its blocks."""
    from torch import nn

    found = []
    for name, child in module.named_children():
        if type(child) is nn.Sequential and len(child) and len({type(c) for c in child}) == 1:
            found += [f"{path}{name}.{n}" for n, _ in child.named_children()]
        else:
            found.append(f"{path}{name}")
    return found


def _torchvision_blocks(model: Any, prefix: str) -> tuple[str, ...]:
    """torchvision's families, as timm groups the same architectures (stem, each block, head)."""
    kind = type(model).__name__
    if kind == "ResNet":
        return (f"{prefix}conv1+{prefix}bn1",) + tuple(
            f"{prefix}layer{i}.*" for i in range(1, 5) if hasattr(model, f"layer{i}"))
    if kind == "VisionTransformer":
        stem = "+".join(f"{prefix}{p}" for p in ("conv_proj", "class_token", "encoder.pos_embedding") if _has(model, p))
        return (stem, f"{prefix}encoder.layers.*", f"{prefix}encoder.ln")
    if _is_sequential(getattr(model, "features", None)):
        # MobileNetV2/V3, EfficientNet(V2), ConvNeXt, Swin, VGG, DenseNet, SqueezeNet: the features'
        # elements, a stage of identical blocks split into its blocks; then what follows them (a norm).
        rest = [f"{prefix}{n}" for n, c in model.named_children() if n != "features" and any(True for _ in c.parameters())]
        return tuple(_stages(model.features, f"{prefix}features.") + rest)
    # Inception, GoogLeNet, ShuffleNet, RegNet, MNASNet...: the top-level modules, Sequentials opened;
    # auxiliary classifiers (GoogLeNet's aux1/aux2, Inception's AuxLogits) are off the embedding's path.
    found: list[str] = []
    for name, child in model.named_children():
        if name.lower().startswith("aux"):
            continue
        found += _stages(child, f"{prefix}{name}.") if _is_sequential(child) else [f"{prefix}{name}"]
    return tuple(found)


def _has(module: Any, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return path in dict(module.named_parameters())


def infer_blocks(module: "nn.Module") -> tuple[str, ...]:
    """Block patterns embedkit knows for ``module`` (see :mod:`embedkit.backbones.blocks`); ``()`` when none."""

    if "transformers" in sys.modules:
        found = _transformers_blocks(module)
        if found:
            return found
    if "timm" in sys.modules and _timm_model(module) is not None:
        return _timm_blocks(module)
    return _vision_blocks(module)


