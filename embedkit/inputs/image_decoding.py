"""The image decoding policy, with PIL and numpy only (no torch at run time): an item (a path,
bytes, a PIL image, an array) to a loaded image or float bands, or one record of what is wrong
with it. Preprocessing (resize, crop, normalisation) is :mod:`embedkit.inputs.image`.

Decoding policy (one record per bad item, never a crash of the batch, never a silent fix):

==============================  ===============================================================
input                           what happens
==============================  ===============================================================
path, bytes, PIL image,         decoded; paths and bytes must be JPEG, PNG, GIF, BMP, TIFF,
numpy array (H, W[, 3|4])       WebP or PPM (decoders that run no external program)
missing path, empty path        error ``not_found``
FIFO, device, socket, folder    error ``not_a_file`` (checked with fstat before a byte is read,
(or a symlink to one)           so ``/dev/zero`` or a FIFO never hangs a run)
file over ``8 * max_pixels``    error ``too_large`` (no image format needs more bytes per pixel);
bytes (+ 16 MiB)                at most that many bytes are ever read
zero bytes                      error ``empty_file``
random bytes                    error ``not_an_image``
PDF, SVG, EPS, PSD, HEIC...     error ``unsupported_format`` (names the format)
truncated / corrupt data        error ``truncated`` / ``corrupt``; PIL's ``LOAD_TRUNCATED_IMAGES``
                                is never set, so a half-decoded grey image never gets through
more than ``max_pixels``        error ``too_large`` (decompression bombs), checked from the header
                                before any pixel is decoded
blank / placeholder graphic     error ``blank_image`` when ``reject_blank``: at most 256 distinct
                                colours, one covering over 90 % of the pixels (an "image not
                                found" GIF, an all-white frame); photos never have so few colours
EXIF orientation                applied
CMYK, YCbCr, palette, 1-bit     converted to RGB
LA / RGBA / PA / transparency   alpha composited on the preprocessing's fixed ``background``
16-bit greyscale                scaled to 0..255 (value / 257) in float, not clipped to white;
                                32-bit integer ('I') images outside 0..65535: ``invalid_range``
32-bit float ('F') images       (float TIFFs, PIL 'F' images) read as 0..1, like float arrays;
                                values outside 0..1 or not finite: error ``invalid_range``
animated GIF / WebP / TIFF      first frame
numpy uint8 / uint16 / float    0..255, 0..65535 (scaled), 0..1; other dtypes or shapes ->
                                error ``invalid_array``; floats outside 0..1 or not finite ->
                                error ``invalid_range`` (never guessed to mean 0..255)
anything else                   error ``not_an_image_input``
==============================  ===============================================================
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.backbone import ImagePreprocess
from .files import read_regular
from .items import ItemFailure

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG covers MPO (camera JPEGs)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 0.25 GB of RGB)
BLANK_FRACTION = 0.9
BLANK_COLOURS = 256

# Signatures of formats people meet in image folders that embedkit refuses to decode.
_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "Photoshop PSD"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "ZIP"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"qt  ": "QuickTime", b"isom": "MP4"}


def _describe(item: Any) -> str:
    # Never raw content in messages: type, and the file name for paths.
    if isinstance(item, (str, os.PathLike)):
        return f"file {Path(item).name!r}"
    return type(item).__name__


def _damage(exc: BaseException) -> str:
    """``truncated`` when the data ends early (PIL's wording varies by format), else ``corrupt``."""
    text = str(exc).lower()
    return "truncated" if "truncat" in text or "broken" in text or isinstance(exc, EOFError) else "corrupt"


def _sniff(head: bytes) -> str | None:
    for signature, name in _SIGNATURES:
        if head.lstrip()[: len(signature)].lower() == signature.lower():
            return name
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "ISO media (" + head[8:12].decode("latin-1") + ")")
    return None


class ImageDecoder:
    """Decodes one item by this module's policy (see its table): a loaded PIL image or float
    bands, or :class:`~embedkit.inputs.items.ItemFailure`. :class:`embedkit.inputs.image.ImageProcessor`
    adds the preprocessing (resize, crop, normalisation).

    Args:
        preprocess: its ``background`` is what transparency is composited on.
        max_pixels: images with more pixels (from the header) are refused as ``too_large``.
        reject_blank: refuse blank / placeholder graphics (see the module's policy table).
    """

    def __init__(self, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS, reject_blank: bool = True):
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.reject_blank = reject_blank
        self.max_bytes = 8 * max_pixels + (16 << 20)  # 16-bit RGBA, uncompressed, plus metadata

    # -- decoding ---------------------------------------------------------------------------
    def open(self, item: Any) -> Any:
        """The item as a loaded PIL image (first frame, EXIF orientation applied)."""
        from PIL import Image, ImageOps

        if isinstance(item, ItemFailure):  # a row its reader could not read
            raise ItemFailure(item.code, item.stage, item.message)
        if isinstance(item, Image.Image):
            image = item
            self._check_size(image.size)
        elif isinstance(item, np.ndarray):
            return self._from_array(item)
        elif isinstance(item, (str, os.PathLike)):
            image = self._open_bytes(read_regular(item, self.max_bytes), _describe(item))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            image = self._open_bytes(bytes(item), "bytes")
        else:
            raise ItemFailure(
                "not_an_image_input", "decode",
                f"expected a path, bytes, a PIL image or a numpy array, got {_describe(item)}",
            )
        try:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except ItemFailure:
            raise
        except Image.DecompressionBombError as exc:
            raise ItemFailure("too_large", "decode", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
            raise ItemFailure(_damage(exc), "decode", f"{type(exc).__name__}: {exc}") from exc
        return oriented if oriented is not None else image

    def _open_bytes(self, data: bytes, what: str) -> Any:
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise ItemFailure("empty_file", "read", f"{what} is empty (0 bytes)")
        with warnings.catch_warnings():
            # Our own max_pixels decides; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=FORMATS)
            except Image.DecompressionBombError as exc:
                raise ItemFailure("too_large", "decode", f"{what}: {exc}") from exc
            except UnidentifiedImageError as exc:
                name = _sniff(data[:32])
                if name:
                    raise ItemFailure(
                        "unsupported_format", "decode",
                        f"{what} is {name}; supported: {', '.join(FORMATS)}",
                    ) from exc
                raise ItemFailure("not_an_image", "decode", f"{what} is not an image in a known format") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise ItemFailure(_damage(exc), "decode", f"{what}: {type(exc).__name__}: {exc}") from exc
        self._check_size(image.size)
        return image

    def _check_size(self, size: tuple[int, int]) -> None:
        w, h = size
        if w < 1 or h < 1:
            raise ItemFailure("corrupt", "decode", f"image has no pixels ({w}x{h})")
        if w * h > self.max_pixels:
            raise ItemFailure(
                "too_large", "decode",
                f"{w}x{h} = {w * h} pixels exceeds max_pixels={self.max_pixels} (decompression bomb guard)",
            )

    def _from_array(self, array: np.ndarray) -> Any:
        from PIL import Image

        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ItemFailure("invalid_array", "decode", f"expected (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        self._check_size((array.shape[1], array.shape[0]))
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.dtype.byteorder not in ("=", "|") and array.dtype.kind in "uf":  # big-endian (e.g. FITS) data
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype == np.uint8:  # the PIL path: same conversions and blank check as a file
            return Image.fromarray(np.ascontiguousarray(array))
        if array.dtype == np.uint16:
            pixels = array.astype(np.float32) / 257.0
        elif array.dtype.kind == "f":
            pixels = unit_floats(array, "float array")
        else:
            raise ItemFailure("invalid_array", "decode", f"unsupported dtype {array.dtype} (use uint8, uint16 or float)")
        if pixels.ndim == 2:
            return [Image.fromarray(np.ascontiguousarray(pixels), "F")]
        channels = [Image.fromarray(np.ascontiguousarray(pixels[:, :, c]), "F") for c in range(pixels.shape[2])]
        return channels

    def channels(self, image: Any) -> list[Any]:
        """Float ('F' mode) channel images in 0..255: one (grey) or three (RGB), alpha composited."""
        if isinstance(image, list):  # from a numpy array
            if len(image) == 4:
                return self._composite(image[:3], np.asarray(image[3]) / 255.0)
            return image
        mode = image.mode
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode in ("PA", "RGBa", "La"):
            image = image.convert("RGBA" if mode != "La" else "LA")
        elif mode == "1":
            image = image.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        elif mode == "L" and "transparency" in image.info:
            image = image.convert("LA")
        elif mode == "RGB" and "transparency" in image.info:
            image = image.convert("RGBA")
        mode = image.mode
        if mode.startswith("I;16") or mode == "I":
            grey = np.asarray(image)
            if mode == "I" and grey.size and (grey.min() < 0 or grey.max() > 65535):
                # a 32-bit container holds 16-bit data by convention (PNG, TIFF); anything else is a guess
                raise ItemFailure("invalid_range", "decode",
                                  f"32-bit integer image with values {grey.min()}..{grey.max()}, outside 0..65535")
            return [_float_image(grey.astype(np.float32) / 257.0)]
        if mode == "F":
            return [_float_image(unit_floats(np.asarray(image), "32-bit float image"))]
        if mode in ("L", "RGB"):
            return [band.convert("F") for band in image.split()]
        if mode in ("LA", "RGBA"):
            bands = image.split()
            alpha = np.asarray(bands[-1], dtype=np.float32) / 255.0
            return self._composite([b.convert("F") for b in bands[:-1]], alpha)
        raise ItemFailure("unsupported_mode", "decode", f"image mode {mode!r} is not supported")

    def _composite(self, bands: list[Any], alpha: np.ndarray) -> list[Any]:
        if len(bands) == 1:
            bands = bands * 3
        out = []
        for band, bg in zip(bands, self.preprocess.background):
            value = np.asarray(band, dtype=np.float32)
            out.append(_float_image(value * alpha + np.float32(bg) * (1.0 - alpha)))
        return out

    def _is_blank(self, image: Any) -> bool:
        if isinstance(image, list) or image.mode in ("F", "I") or image.mode.startswith("I;16"):
            return False
        try:
            colours = image.getcolors(BLANK_COLOURS)
        except (ValueError, OSError):
            return False
        if colours is None:  # more distinct colours than BLANK_COLOURS: a photo
            return False
        return max(c for c, _ in colours) > BLANK_FRACTION * image.size[0] * image.size[1]

    def decode(self, item: Any) -> list[Any]:
        """The item's float ('F') channel images in 0..255, one (grey) or three, or raise :class:`ItemFailure`."""
        image = self.open(item)
        if self.reject_blank and self._is_blank(image):
            raise ItemFailure(
                "blank_image", "decode",
                f"blank or placeholder graphic: at most {BLANK_COLOURS} colours, one covering over "
                f"{BLANK_FRACTION:.0%} of the pixels (pass reject_blank=False to embed it anyway)",
            )
        try:
            return self.channels(image)
        except (OSError, ValueError) as exc:
            raise ItemFailure("corrupt", "decode", f"{type(exc).__name__}: {exc}") from exc


def unit_floats(values: np.ndarray, what: str) -> np.ndarray:
    """Float pixels in 0..1 as float32 0..255; anything else is ``invalid_range``, never a guess.

    The one rule for floats on every route (numpy arrays, PIL 'F' images, float TIFF files).
    """
    if values.size and not np.isfinite(values).all():
        raise ItemFailure("invalid_range", "decode", f"{what} holds NaN or inf")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 1:
        raise ItemFailure("invalid_range", "decode",
                          f"{what} with values {low:g}..{high:g}: float pixels must be in 0..1 "
                          "(scale it yourself, e.g. to uint8 0..255, if it means something else)")
    return values.astype(np.float32) * np.float32(255.0)


def _float_image(array: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), "F")
