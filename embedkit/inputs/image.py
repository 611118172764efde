"""Image preprocessing with PIL and numpy only (no torch at run time): the declared resize,
centre crop and normalisation (:class:`ImageProcessor`), batches (:func:`stack`), probe images,
and the refusal of one image given where a sequence of images is expected.

Decoding (what happens to each kind of input: formats, sizes, modes, transparency, bad files)
is :mod:`embedkit.inputs.image_decoding`; its public names are importable from here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..backbones.backbone import ImagePreprocess
from ..errors import UnsupportedInputError
from .image_decoding import BLANK_COLOURS, BLANK_FRACTION, DEFAULT_MAX_PIXELS, FORMATS, ImageDecoder, unit_floats
from .items import ItemFailure

__all__ = ["BLANK_COLOURS", "BLANK_FRACTION", "DEFAULT_MAX_PIXELS", "FORMATS", "ImageDecoder", "ImageProcessor",
           "ImageStats", "probe_images", "refuse_single_image", "stack", "unit_floats"]

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


@dataclass
class ImageStats:
    """Counts of what the decoding policy did."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    pixels: int = 0  # decoded source pixels, a measure of the decoding work

    def add(self, other: "ImageStats") -> None:
        for name in ("total", "ok", "failed", "pixels"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class ImageProcessor(ImageDecoder):
    """Decodes one item (:class:`~embedkit.inputs.image_decoding.ImageDecoder`) and applies an
    :class:`ImagePreprocess`, as the artifact declares.

    Args:
        preprocess: resize, crop, interpolation, mean/std, background.
        max_pixels: images with more pixels (from the header) are refused as ``too_large``.
        reject_blank: refuse blank / placeholder graphics (see :mod:`embedkit.inputs.image_decoding`).
    """

    def __init__(self, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS, reject_blank: bool = True):
        super().__init__(preprocess, max_pixels, reject_blank)
        p = preprocess
        self._scale = np.asarray([1.0 / (255.0 * s) for s in p.std], dtype=np.float32)
        self._offset = np.asarray([-m / s for m, s in zip(p.mean, p.std)], dtype=np.float32)

    # -- geometry ---------------------------------------------------------------------------
    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The resized size (shorter side = ``resize``) and the centre-crop box inside it."""
        p = self.preprocess
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = p.resize, int(p.resize * long / short)  # torchvision's rounding
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        crop_h, crop_w = p.crop
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        return (new_w, new_h), (left, top, left + crop_w, top + crop_h)

    def _resize(self, band: Any, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        resample = _RESAMPLE[self.preprocess.interpolation]
        if box is not None:  # a training view: this source region cut out, then resized to the crop size
            crop_h, crop_w = self.preprocess.crop  # (cut first, as torchvision's resized_crop does)
            return np.asarray(band.crop(box).resize((crop_w, crop_h), resample), dtype=np.float32)
        width, height = band.size
        (new_w, new_h), crop = self.geometry(width, height)
        size = (crop[2] - crop[0], crop[3] - crop[1])
        if resample == 0:  # nearest: PIL maps a source box differently; resize, then crop
            return np.asarray(band.resize((new_w, new_h), resample).crop(crop), dtype=np.float32)
        # Resample only the source region the crop keeps: the same filter taps as resizing the
        # whole image and cropping (PIL clips the support to the image, not the box), less work.
        sx, sy = width / new_w, height / new_h
        box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
        return np.asarray(band.resize(size, resample, box=box), dtype=np.float32)

    def pixels(self, bands: list[Any], box: tuple[int, int, int, int] | None = None, flip: bool = False) -> np.ndarray:
        """``pixel_values`` (3, H, W) float32 from :meth:`decode`'s bands.

        ``box`` (left, top, right, bottom, source pixels) is resized to the crop size instead of
        the declared resize + centre crop (a training view, see :mod:`embedkit.finetuning.augment`);
        ``flip`` mirrors left-right. Without them: exactly what inference feeds the network.
        """
        try:
            resized = [self._resize(b, box) for b in bands]
        except (OSError, ValueError, MemoryError) as exc:
            raise ItemFailure("corrupt", "preprocess", f"resize failed: {type(exc).__name__}: {exc}") from exc
        if len(resized) == 1:
            resized = resized * 3
        out = np.stack(resized)
        if flip:
            out = np.ascontiguousarray(out[:, :, ::-1])
        out *= self._scale[:, None, None]
        out += self._offset[:, None, None]
        return out

    def __call__(self, item: Any) -> tuple[np.ndarray, int]:
        """``(pixel_values (3, H, W) float32, source pixels)`` or raise :class:`ItemFailure`."""
        bands = self.decode(item)
        width, height = bands[0].size
        return self.pixels(bands), width * height


def probe_images(count: int = 9) -> list[np.ndarray]:
    """Deterministic synthetic RGB images of varied sizes and aspect ratios (uint8 arrays)."""
    rng = np.random.default_rng(1234)
    sizes = [(240, 320), (320, 240), (300, 300), (180, 500), (512, 384), (257, 263), (600, 200), (224, 224), (400, 640)]
    images = []
    for k in range(count):
        h, w = sizes[k % len(sizes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([
            127 + 100 * np.sin(x / (7 + 3 * k) + k),
            127 + 100 * np.cos(y / (11 + k)),
            255 * ((x + y) % (40 + 5 * k)) / (40 + 5 * k),
        ], axis=-1)
        noise = rng.normal(0, 20, size=(h, w, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def stack(rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """A batch feed: ``pixel_values`` (N, 3, H, W) float32."""
    return {"pixel_values": np.ascontiguousarray(np.stack(rows), dtype=np.float32)}



def refuse_single_image(items: Any, where: str = "a sequence of images") -> None:
    """Raise when ``items`` may be one image given where a sequence of images is expected.

    Iterating an ``(H, W, 3)`` array yields H arrays of ``(W, 3)``, each a valid grey image, so
    one photo would be embedded silently as H strips. A 3-D array whose last axis could be
    channels (1, 3 or 4) is therefore never guessed: the caller says which it is. An
    ``(N, H, W)`` array whose last axis is not 1, 3 or 4 cannot be one image (N grey images);
    an ``(N, H, W, C)`` array is N images; a PIL image is one image.

    Raises:
        UnsupportedInputError: the input could be one image; the message gives both spellings.
    """
    if hasattr(items, "getpixel"):  # a PIL image
        raise UnsupportedInputError(f"one image was given where {where} is expected; wrap it in a list: [image]")
    if not isinstance(items, np.ndarray) or items.dtype == object or items.ndim != 3 or items.shape[2] not in (1, 3, 4):
        return
    n, h, w = items.shape
    raise UnsupportedInputError(
        f"an array of shape {items.shape} was given where {where} is expected: it may be one {n}x{h} image "
        f"with {w} channel(s), or {n} grey images of {h}x{w} pixels, and embedkit does not guess. "
        f"One image: pass [image] (or image[None]); {n} grey images: pass a list of {n} arrays, or image[..., None]")
