"""Training augmentation for images, from the same preprocessing code as inference.

A training view of an image is a random resized crop (a random region of the source image,
resized to the backbone's declared crop size with its declared interpolation), maybe mirrored
left-right, then the declared normalisation: the decoding, resizing and normalising are
:class:`embedkit.inputs.image.ImageProcessor`'s, so a network is never tuned on inputs that inference
would make differently. With augmentation off (``augment=None``) a training input is the
inference input, pixel for pixel. No torchvision needed.

The crop sampling is torchvision's ``RandomResizedCrop.get_params`` (torchvision/transforms/
transforms.py), with its defaults ``scale=(0.08, 1.0)`` (fraction of the image's area) and
``ratio=(3/4, 4/3)`` (width / height, sampled log-uniformly), ten tries then a centre crop of
the largest region within the ratio; the flip is ``RandomHorizontalFlip(p=0.5)``. These are the
transforms of torchvision's ImageNet training recipe and of PyTorch's fine-tuning tutorial (on
the hymenoptera set). Randomness comes only from the numpy ``Generator`` the caller passes, so
a seed (and, for resuming, the generator's state) fixes every view.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..backbones.backbone import ImagePreprocess
from ..errors import InvalidAugmentError
from ..inputs.image import DEFAULT_MAX_PIXELS, ImageProcessor


@dataclass(frozen=True)
class ImageAugment:
    """Declarative training augmentation for images (JSON-able, kept with a fine-tune's record).

    Attributes:
        scale: (low, high) fraction of the source image's area a crop covers, 0 < low <= high <= 1.
        ratio: (low, high) aspect ratio (width / height) of the crop, 0 < low <= high.
        flip: probability of a left-right mirror, 0..1.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidAugmentError` naming the bad field."""
        def pair(value: Any) -> bool:
            return (isinstance(value, tuple) and len(value) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))

        if not pair(self.scale) or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise InvalidAugmentError(f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale!r}")
        if not pair(self.ratio) or not 0 < self.ratio[0] <= self.ratio[1]:
            raise InvalidAugmentError(f"ratio must be (low, high) width/height with 0 < low <= high, got {self.ratio!r}")
        if isinstance(self.flip, bool) or not isinstance(self.flip, (int, float)) or not 0 <= self.flip <= 1:
            raise InvalidAugmentError(f"flip must be a probability in 0..1, got {self.flip!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImageAugment":
        return cls(**data)


@dataclass(frozen=True)
class View:
    """One sampled training view: the source region (pixels) and whether it is mirrored."""

    left: int
    top: int
    width: int
    height: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), PIL's box."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def sample_view(width: int, height: int, augment: ImageAugment, rng: np.random.Generator) -> View:
    """A random resized crop of a ``width`` x ``height`` image, and a flip (torchvision's algorithm)."""
    area = width * height
    log_low, log_high = math.log(augment.ratio[0]), math.log(augment.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(augment.scale[0], augment.scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # centre crop of the largest region within the ratio
        in_ratio = width / height
        if in_ratio < augment.ratio[0]:
            w, h = width, int(round(width / augment.ratio[0]))
        elif in_ratio > augment.ratio[1]:
            w, h = int(round(height * augment.ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(augment.flip > 0 and rng.random() < augment.flip)
    return View(left, top, w, h, flip)


class Augmenter:
    """Training inputs for images: :class:`ImageProcessor` plus random views.

    Args:
        preprocess: the backbone's declared :class:`ImagePreprocess` (crop size, interpolation, mean/std).
        augment: an :class:`ImageAugment`, or None for none (training inputs = inference inputs).
        max_pixels, reject_blank: as :class:`ImageProcessor` (the same decoding policy).
    """

    def __init__(self, preprocess: ImagePreprocess, augment: ImageAugment | None = ImageAugment(),
                 max_pixels: int = DEFAULT_MAX_PIXELS, reject_blank: bool = True):
        if augment is not None and not isinstance(augment, ImageAugment):
            raise InvalidAugmentError(f"augment must be an embedkit.finetuning.augment.ImageAugment or None, got {augment!r}")
        self.processor = ImageProcessor(preprocess, max_pixels=max_pixels, reject_blank=reject_blank)
        self.augment = augment

    def view(self, item: Any, rng: np.random.Generator) -> tuple[np.ndarray, View | None]:
        """``(pixel_values (3, H, W) float32, the view drawn)``; raises :class:`ItemFailure` for a bad item.

        The generator is used only when augmenting (a fixed number of draws is not promised:
        the crop loop retries), so pass one per item when views must not depend on each other.
        """
        bands = self.processor.decode(item)
        if self.augment is None:
            return self.processor.pixels(bands), None
        width, height = bands[0].size
        view = sample_view(width, height, self.augment, rng)
        return self.processor.pixels(bands, view.box, view.flip), view

    def __call__(self, item: Any, rng: np.random.Generator) -> np.ndarray:
        """``pixel_values`` (3, H, W) float32 of one training view of ``item``."""
        return self.view(item, rng)[0]
