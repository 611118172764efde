"""The ``embedkit serve`` options: what to serve (:class:`Settings`) and the per-request :class:`Limits`."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..inputs.image import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Limits:
    """Per-request limits: body bytes (checked before parsing), items, characters per text,
    pixels per image (the library's ``max_pixels``: larger images fail as ``too_large``)."""

    max_body_bytes: int = 16 * 2**20
    max_items: int = 2048
    max_chars: int = 100_000
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Settings:
    """What to serve and how (the ``embedkit serve`` options)."""

    backbones: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    store: str | None = None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch_tokens: int | None = None  # None: the encoder's own budget (384 on CPU, as measured)
    max_batch_images: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 4096
    threads: int | None = None
    streams: int | None = None
