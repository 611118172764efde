"""Item ids: content fingerprints of texts, bytes, image files and in-memory images (locator ids otherwise)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .files import content_id, open_regular
from .items import ItemFailure

MAX_HASH_BYTES = 8 << 30  # larger files get a locator id (they fail as too_large when decoded)


def fingerprint(payload: Any, modality: str) -> str | None:
    """The content hash of a payload: a text's UTF-8 bytes (``str`` or ``bytes``), an image file's
    bytes (see :func:`file_id`), raw bytes as given; ``None`` when there is no content to hash
    (an unreadable row, an in-memory image: see :func:`image_id`). Item ids and the fingerprints
    the feature store keeps beside user ids both come from here."""
    if modality == "image" and isinstance(payload, str):
        return file_id(payload)
    if isinstance(payload, str):
        return content_id(payload.encode("utf-8", "surrogatepass"))
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return content_id(bytes(payload))
    return None


def text_id(payload: Any, where: str) -> str:
    """A text's id: its fingerprint; with no content, the item fails when encoded, identified by its locator."""
    return fingerprint(payload, "text") or "src-" + content_id(where.encode("utf-8", "surrogateescape"))


def image_id(image: Any, where: str) -> str:
    """The id of an in-memory image: a hash of everything that defines it, not its raw bytes alone.

    PIL: mode, size, palette (mode and colours), transparency, EXIF orientation and pixels.
    numpy: dtype, shape and elements. Bytes: the bytes (as a file's id). Anything else fails
    later, by its locator.
    """
    from PIL import Image

    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return content_id(bytes(image))
    if isinstance(image, Image.Image):
        try:
            palette = image.palette
            meta = {
                "kind": "PIL", "mode": image.mode, "size": list(image.size),
                "palette_mode": palette.mode if palette is not None else None,
                "transparency": repr(image.info.get("transparency")),
                "orientation": image.getexif().get(0x0112),
            }
            h.update(json.dumps(meta, sort_keys=True).encode())
            if palette is not None:
                h.update(bytes(image.getpalette(palette.mode) or []))
            h.update(image.tobytes())
        except Exception:  # a broken lazy image: it fails when decoded, by its locator
            return "src-" + content_id(where.encode())
        return h.hexdigest()[:32]
    import numpy as np

    if isinstance(image, np.ndarray):
        h.update(json.dumps({"kind": "ndarray", "dtype": image.dtype.str, "shape": list(image.shape)}).encode())
        if image.dtype.hasobject:
            return "src-" + content_id(where.encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()[:32]
    return "src-" + content_id(where.encode())


def file_id(path: str) -> str:
    """A hash of a regular file's bytes; a locator id for what cannot be hashed (it fails when decoded)."""
    located = "src-" + content_id(os.fsencode(path))
    try:
        f, info = open_regular(path)
    except ItemFailure:
        return located
    h = hashlib.sha256()
    with f:
        if info.st_size > MAX_HASH_BYTES:
            return located
        try:
            while block := f.read(1 << 20):
                h.update(block)
        except OSError:
            return located
    return h.hexdigest()[:32]
