"""The ``embedkit serve`` options: what to serve (:class:`Settings`) and the per-request :class:`Limits`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Pixels per image for untrusted requests: 16.8 Mpx (4096 x 4096; a 16 Mpx phone photo fits) instead of
# the library's 89 Mpx, which suits a user's own files. Issue 22 measured +1.47 GB peak for one
# 81 Mpx PNG (~18 bytes a pixel while decoding and resizing): ~0.3 GB at this limit.
SERVE_MAX_PIXELS = 4096 * 4096
# Decoded images (model inputs, 3 x H x W float32) of all requests in flight together: 512 MiB, so
# tiny compressed images cannot make the queues hold GBs (4096 queued 224 x 224 inputs are 2.4 GB).
# It is 891 images of 224 x 224 (602 KB each): 55 batches of 16, far more than the few per stream
# that keep every stream busy, and a request of up to 891 such images (303 of 384 x 384) fits.
SERVE_MAX_INFLIGHT_IMAGE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Limits:
    """Per-request limits: body bytes (checked before parsing), items, characters per text,
    pixels per image (larger images fail as ``too_large``), and the body bytes and the decoded image
    bytes of all the requests in flight together (beyond them: 429 with ``Retry-After``; see
    :mod:`embedkit.serve.image_budget`)."""

    max_body_bytes: int = 16 * 2**20
    max_items: int = 2048
    max_chars: int = 100_000
    max_pixels: int = SERVE_MAX_PIXELS
    max_inflight_bytes: int = 64 * 2**20
    max_inflight_image_bytes: int = SERVE_MAX_INFLIGHT_IMAGE_BYTES


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
    host: str = "127.0.0.1"
    allowed_hosts: list[str] = field(default_factory=list)  # besides loopback names and the bound address
    allowed_origins: list[str] = field(default_factory=list)  # besides origins on an allowed host
    # int8 / uint8 ranges for /v1/embeddings (--calibration): (artifact digest they were fitted on, or
    # None when the record names none, Calibration) pairs; see embedkit.serve.openai_api.
    calibrations: list[tuple[str | None, Any]] = field(default_factory=list)
    # The long-text policy of the served backbones' text encoders (embedkit.inputs.windows); a saved
    # model keeps the policy it was saved with (its head was trained on those vectors). None: the default.
    long: str = "truncate"
    chunk_overlap: int | None = None
    max_chunks: int | None = None
