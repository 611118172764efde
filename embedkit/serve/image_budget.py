"""The decoded images of all requests in flight, bounded (``--max-inflight-image-bytes``).

A request's body is bounded in bytes (``--max-body-bytes``, ``--max-inflight-bytes``), but not what
its images become: each decodes to its model's input, a (3, H, W) float32 array (3 x 224 x 224:
602,112 bytes) that waits in the batching queue until its batch runs, while a 224 x 224 PNG of a few
colours is ~1 KB. So tiny images within the body budget could hold 4096 x 602 KB = 2.4 GB of decoded
pixels in one model's queue of 4096 items (more with several image models, and requests refused
``queue_full`` were refused only after all their images were decoded).

:class:`ImageBudget` counts ``images x 3 x H x W x 4`` bytes for every image request, across all
requests and image models, from *before* its images are decoded until it is answered (decoding,
queued, in a batch):

* a request that can never fit (more decoded bytes than the whole budget) gets 413
  ``too_many_image_bytes``, naming how many images of that model fit: a retry cannot succeed;
* a request that does not fit beside those in flight gets 429 ``image_budget_full`` before any of its
  images is decoded, with ``Retry-After`` the time until enough *whole* requests in flight are
  answered (a request gives back all its bytes at once, when it is answered): from the measured
  durations of answered image requests of their size and each holder's age (before any was
  answered, the batch wait plus the model's measured seconds per batched item); a holder that has
  run longer than that is expected to need as long again as it has run. Seconds, an integer, at
  least 1 (the rule: :mod:`embedkit.serve.retry`).

The working memory of an image while it is decoded and resized (~18 bytes a source pixel, up to
``--max-pixels``) is bounded separately: the decode pool decodes a few images at once
(:data:`embedkit.serve.service.IMAGE_DECODERS`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from .api_error import ApiError
from .retry import Holds

FLOAT32 = 4


def item_bytes(crop: tuple[int, int]) -> int:
    """Bytes of one decoded image of a model whose input is ``crop`` (height, width): 3 x H x W float32."""
    return 3 * int(crop[0]) * int(crop[1]) * FLOAT32


class ImageBudget:
    """Decoded image bytes held by the requests in flight, at most ``limit`` (used on the event loop only)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.holds = Holds()

    @contextmanager
    def hold(self, count: int, crop: tuple[int, int], batcher: Any) -> Iterator[int]:
        """Hold the decoded bytes of ``count`` images of input ``crop`` while the block runs.

        ``batcher`` (the model's :class:`~embedkit.serve.batching.Batcher`) gives the duration estimate
        before any request was measured.

        Raises:
            ApiError: 413 ``too_many_image_bytes`` (can never fit), 429 ``image_budget_full`` (not now).
        """
        each = item_bytes(crop)
        size = count * each
        if size > self.limit:
            raise ApiError(413, "too_many_image_bytes", f"this request's {count} images decode to {size} bytes "
                           f"({each} each: 3 x {crop[0]} x {crop[1]} float32), over the {self.limit} bytes that all "
                           "requests in flight may hold (--max-inflight-image-bytes): it can never be served; send "
                           f"at most {self.limit // each} images of this model per request")
        if self.used + size > self.limit:
            retry = self.retry_after(size, each, batcher)
            raise ApiError(429, "image_budget_full", f"the image requests in flight hold {self.used} decoded bytes; "
                           f"this one needs {size} more, over the limit of {self.limit} "
                           f"(--max-inflight-image-bytes); retry after {retry} s", headers={"Retry-After": str(retry)})
        self.used += size
        token = self.holds.start(size)
        try:
            yield size
        finally:
            self.used -= size
            self.holds.finish(token)

    def retry_after(self, size: int, each: int, batcher: Any) -> int:
        """Seconds (integer, >= 1) until the requests in flight will have given back enough bytes for
        ``size`` more: when enough of them will be answered (the module docstring)."""
        streams = max(1, getattr(batcher, "streams", 1))

        def unmeasured(held: int) -> float:  # the batch wait plus the model's measured seconds per item
            return batcher.max_wait + held / each * batcher.item_seconds / streams

        return self.holds.retry_after(self.used + size - self.limit, unmeasured)
