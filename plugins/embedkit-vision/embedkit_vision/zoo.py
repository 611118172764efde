"""Any timm or torchvision architecture as a backbone, with weights from a local checkpoint.

Spec strings (what ``embedkit export``, ``Embedder`` and ``check`` accept)::

    timm:resnet50@/path/to/checkpoint.pth         timm architecture, local weights
    torchvision:vgg16@/path/to/vgg16.pth          torchvision architecture, local weights
    timm:vit_tiny_patch16_224@random              random weights (seed 0), for tests

Nothing is downloaded: the hubs are out of reach at run time, so weights always come from a
file. The classifier is removed (timm: ``reset_classifier(0)``; torchvision: the last
``nn.Linear`` becomes ``Identity``), so the backbone emits pooled penultimate features.
Preprocessing comes from the model's own config: timm's ``pretrained_cfg`` or the
torchvision weights' eval transform.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from embedkit import Backbone, ImagePreprocess
from embedkit.errors import InvalidBackboneError, MissingDependencyError

LIBRARIES = ("timm", "torchvision")
SPEC = re.compile(r"^(timm|torchvision):([A-Za-z0-9_.\-]+)(?:@(.+))?$")
RANDOM = "random"


def parse(spec: str) -> tuple[str, str, str] | None:
    """``(library, architecture, checkpoint-or-random)``, or None when ``spec`` is no zoo spec."""
    match = SPEC.match(spec)
    if match is None:
        return None
    library, arch, weights = match.groups()
    if weights is None:
        raise InvalidBackboneError(
            "weights",
            f"{spec!r} names no weights: use {library}:{arch}@/path/to/checkpoint.pth "
            f"(no downloads at run time) or {library}:{arch}@random for random weights",
        )
    return library, arch, weights


def _import(library: str) -> Any:
    try:
        if library == "timm":
            import timm

            return timm
        import torchvision

        return torchvision
    except ImportError as exc:
        # The extra belongs to this plugin's distribution, not to embedkit (which has no "zoo").
        raise MissingDependencyError(library, "zoo", f"building {library} architectures",
                                     install="pip install 'embedkit-vision[zoo]'") from exc


def _state_dict(path: str) -> dict[str, Any]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def _seeded(fn: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn()


def _strip_torchvision_head(model: Any) -> int:
    """Replace the last ``nn.Linear`` with Identity; returns its input width (the embedding dim)."""
    from torch import nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise InvalidBackboneError("build", f"{type(model).__name__} has no nn.Linear classifier to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dim = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    if hasattr(model, "aux_logits"):  # inception: the auxiliary head only runs in training
        model.aux_logits = False
        model.AuxLogits = None
    return int(dim)


class ZooModel:
    """Builds the network once (its dim and preprocessing are read from it) and serves it."""

    def __init__(self, library: str, arch: str, weights: str):
        self.library, self.arch, self.weights = library, arch, weights
        lib = _import(library)
        if weights != RANDOM and not Path(weights).is_file():
            raise InvalidBackboneError("weights", f"checkpoint {weights!r} is not a file")
        if library == "timm":
            self.model = _seeded(lambda: lib.create_model(arch, pretrained=False))
            if weights != RANDOM:
                self.model.load_state_dict(_state_dict(weights), strict=True)
            self.model.reset_classifier(0)
            config = lib.data.resolve_data_config({}, model=self.model)
            self.preprocess = ImagePreprocess.from_timm_config(config)
        else:
            from torchvision import models

            self.model = _seeded(lambda: models.get_model(arch, weights=None))
            if weights != RANDOM:
                self.model.load_state_dict(_state_dict(weights), strict=True)
            self.preprocess = _torchvision_preprocess(models, arch)
            _strip_torchvision_head(self.model)
        self.model.eval()
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        import torch

        h, w = self.preprocess.crop
        with torch.inference_mode():
            out = self.model(torch.zeros(1, 3, h, w))
        return int(out.shape[-1])


def _torchvision_preprocess(models: Any, arch: str) -> ImagePreprocess:
    try:
        transform = models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return ImagePreprocess()
    crop = int(transform.crop_size[0])
    return ImagePreprocess(
        crop=(crop, crop),
        resize=int(transform.resize_size[0]),
        interpolation=str(transform.interpolation.value),
        mean=tuple(float(m) for m in transform.mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in transform.std),  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=8)
def _cached(library: str, arch: str, weights: str, stamp: int | None) -> ZooModel:
    # Resolving the same spec again (export, then Embedder.fit) must not rebuild the network;
    # the checkpoint's mtime is part of the key so a replaced file is read again.
    return ZooModel(library, arch, weights)


def zoo_backbone(library: str, arch: str, weights: str, name: str | None = None) -> Backbone:
    """A backbone for a timm / torchvision architecture with weights from ``weights`` (a file or ``random``)."""
    if library not in LIBRARIES:
        raise InvalidBackboneError("name", f"library must be one of {', '.join(LIBRARIES)}, got {library!r}")
    stamp = None if weights == RANDOM or not Path(weights).is_file() else Path(weights).stat().st_mtime_ns
    zoo = _cached(library, arch, weights, stamp)
    slug = re.sub(r"[^a-z0-9._-]", "-", arch.lower())
    files = () if weights == RANDOM else (str(Path(weights).resolve()),)
    return Backbone(
        name=name or f"{library}-{slug}" + ("-random" if weights == RANDOM else ""),
        modality="image",
        dim=zoo.dim,
        preprocess=zoo.preprocess,
        weights="random initialisation (seed 0)" if weights == RANDOM else f"local checkpoint {Path(weights).name}",
        license="random weights" if weights == RANDOM else "see the checkpoint's source",
        weight_files=files,
        description=f"{library} {arch}, pooled penultimate features",
        builder=lambda: zoo.model,
    )
