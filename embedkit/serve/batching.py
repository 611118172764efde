"""Dynamic batching: items of concurrent requests coalesced into model batches.

One :class:`Batcher` per artifact (runtime). Requests put already-validated model inputs
(token ids, or decoded pixel arrays) on its queue; one worker thread per runtime stream
forms a batch and runs it, so inference never runs on the event loop.

How a batch is formed (after infinity's length-sorted queue and text-embeddings-inference's
token budget):

* a batch is led by the oldest queued item of the request (job) that has led the fewest batches,
  so requests take turns: a small request waits about one batch behind a large one, not behind
  all of it (with one request queued: its oldest item, so no item waits behind a stream of others);
* text: then the queued items closest in length to it, while the *padded* batch
  (items x longest) stays within ``max_tokens``: similar lengths waste little padding;
* images: then the next items in arrival order, up to ``max_images``;
* the worker waits at most ``max_wait`` seconds from the oldest item's arrival for the
  batch to fill before running what it has.

The queue is bounded (``max_queue`` items): :meth:`Batcher.submit` raises
:class:`QueueFullError` rather than letting memory and latency grow without limit. A request
whose client went away is :meth:`cancelled <Batcher.cancel>`: its queued items are dropped.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import EmbedkitError
from ..inputs.image import stack
from ..inputs.items import ItemError
from ..inputs.text import pad

logger = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 256


class QueueFullError(EmbedkitError, RuntimeError):
    """The batching queue holds ``max_queue`` items already; retry after ``retry_after`` seconds."""

    def __init__(self, queued: int, asked: int, limit: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(
            f"the server's queue is full ({queued} items queued, {asked} more asked, limit {limit}); "
            f"retry after {retry_after} s or send fewer items per request"
        )


@dataclass(eq=False)
class Job:
    """The items of one request: their output rows fill in as batches finish.

    ``vectors`` is (n, dim) float32, NaN until a row is done; the job's ``future`` (an asyncio
    future of the submitting event loop) gets ``(vectors, errors)`` when every row is done.
    """

    n: int
    dim: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: np.ndarray = field(init=False)
    errors: list[ItemError] = field(default_factory=list)
    remaining: int = field(init=False)
    cancelled: bool = False
    turns: int = 0  # batches this job's item led (fairness between requests)

    def __post_init__(self) -> None:
        self.vectors = np.full((self.n, self.dim), np.nan, dtype=np.float32)
        self.remaining = self.n

    def _resolve(self, value: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(settle)


@dataclass(eq=False)
class _Item:
    job: Job
    row: int
    data: Any  # list[int] token ids or a (3, H, W) float32 array
    cost: int  # tokens (text) or 1 (image)
    arrived: float


class Batcher:
    """A bounded queue of items and the worker threads that run them on one runtime.

    Args:
        runtime: an :class:`~embedkit.runtimes.onnx_runtime.Runtime` (or TorchRuntime): ``run(feeds, stream)``
            returning (n, dim) float32, and ``sessions`` (one worker thread per session).
        dim: embedding width.
        modality: ``text`` (token-budget batches, padded with :func:`embedkit.inputs.text.pad`) or
            ``image`` (count batches, stacked with :func:`embedkit.inputs.image.stack`).
        max_tokens: padded tokens per text batch (items x longest item).
        max_images: images per image batch.
        max_wait: seconds the oldest item waits for its batch to fill.
        max_queue: items queued at most, over all requests.
        on_batch: called with (items, seconds) after each batch (metrics).
    """

    def __init__(self, runtime: Any, dim: int, modality: str, max_tokens: int = 2048, max_images: int = 16,
                 max_wait: float = 0.002, max_queue: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "model"):
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be text or image, got {modality!r}")
        for label, value in (("max_tokens", max_tokens), ("max_images", max_images), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        self.runtime = runtime
        self.dim = dim
        self.modality = modality
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.name = name
        self.dropped = 0  # items of cancelled jobs removed from the queue
        self._pending: list[_Item] = []
        self._cond = threading.Condition()
        self._rows = threading.Lock()  # job row accounting, shared by the worker threads
        self._closed = False
        self._idle = 0  # workers waiting for items
        self.item_seconds = 0.05  # measured seconds per item of a batch (moving average): Retry-After
        self.streams = streams = max(1, len(getattr(runtime, "sessions", [None])))  # one worker each
        self._threads = [
            threading.Thread(target=self._work, args=(k,), name=f"embedkit-batch-{name}-{k}", daemon=True)
            for k in range(streams)
        ]
        for thread in self._threads:
            thread.start()

    # -- the request side (event loop) ---------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items queued now (not yet in a running batch)."""
        return len(self._pending)

    def submit(self, job: Job, rows: Sequence[int], data: Sequence[Any]) -> None:
        """Queue ``data[i]`` as row ``rows[i]`` of ``job``; rows not given here must be settled by
        the caller (``job.remaining`` counts only what is queued).

        Raises:
            QueueFullError: the queue cannot take ``len(data)`` more items.
            RuntimeError: the batcher is closed (the server is shutting down).
        """
        now = time.monotonic()
        if self.modality == "text":
            items = [_Item(job, r, d, max(1, len(d)), now) for r, d in zip(rows, data)]
        else:
            items = [_Item(job, r, d, 1, now) for r, d in zip(rows, data)]
        job.remaining = len(items)
        if not items:
            job._resolve((job.vectors, job.errors), None)
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._pending) + len(items) > self.max_queue:
                # When the queue will have room, from the measured time per item on every stream.
                wait = self.max_wait + self.item_seconds * (len(self._pending) + len(items) - self.max_queue
                                                            ) / max(1, len(self._threads))
                raise QueueFullError(len(self._pending), len(items), self.max_queue, max(1, int(wait + 0.999)))
            self._pending.extend(items)
            self._cond.notify()

    def cancel(self, job: Job) -> int:
        """Drop ``job``'s queued items (its client went away); returns how many were dropped."""
        job.cancelled = True
        with self._cond:
            before = len(self._pending)
            self._pending = [item for item in self._pending if item.job is not job]
            dropped = before - len(self._pending)
            self.dropped += dropped
        if dropped:
            logger.info("dropped %d queued items of a cancelled request", dropped)
        return dropped

    def abort(self) -> int:
        """Stop taking items and drop what is queued (the drain deadline); its jobs fail with
        RuntimeError. Returns how many items were dropped."""
        with self._cond:
            self._closed = True
            dropped, self._pending = self._pending, []
            self.dropped += len(dropped)
            self._cond.notify_all()
        for job in {item.job for item in dropped}:
            job.cancelled = True
            job._resolve(None, RuntimeError("the server is shutting down"))
        return len(dropped)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking items, run what is queued, and join the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # -- the worker side ---------------------------------------------------------------------
    def _full(self) -> bool:
        if len(self._pending) >= MAX_BATCH_ITEMS:
            return True
        if self.modality == "image":
            return len(self._pending) >= self.max_images
        longest = max(item.cost for item in self._pending)
        return longest * len(self._pending) >= self.max_tokens

    def _take(self) -> list[_Item]:
        """The next batch (called with the lock held and at least one item queued).

        When other workers are idle, the queued items are shared among them (one request of 16
        texts runs as two batches on two streams at once) rather than all taken by this one.
        """
        lead = self._leader()
        first = self._pending[lead]
        first.job.turns += 1
        share = -(-len(self._pending) // (1 + self._idle))
        if self.modality == "image":
            order = [lead] + [i for i in range(len(self._pending)) if i != lead]
            taken = set(order[: min(self.max_images, share)])
            batch = [self._pending[i] for i in sorted(taken)]
            self._pending = [item for i, item in enumerate(self._pending) if i not in taken]
            return batch
        # The leader, then the closest in length while the padded batch fits the budget.
        others = sorted((i for i in range(len(self._pending)) if i != lead),
                        key=lambda i: abs(self._pending[i].cost - first.cost))
        chosen = [lead]
        longest = first.cost
        for i in others:
            if len(chosen) >= min(MAX_BATCH_ITEMS, share):
                break
            wider = max(longest, self._pending[i].cost)
            if wider * (len(chosen) + 1) > self.max_tokens:
                if self._pending[i].cost >= first.cost:
                    continue  # a shorter one may still fit
                break
            chosen.append(i)
            longest = wider
        taken = set(chosen)
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [item for i, item in enumerate(self._pending) if i not in taken]
        return batch

    def _leader(self) -> int:
        """The index of the oldest queued item of the job that has led the fewest batches."""
        best, turns = 0, self._pending[0].job.turns
        if turns == 0:
            return 0
        for i, item in enumerate(self._pending):
            if item.job.turns < turns:
                best, turns = i, item.job.turns
                if turns == 0:
                    break
        return best

    def _next(self) -> list[_Item] | None:
        with self._cond:
            while True:
                self._idle += 1
                while not self._pending and not self._closed:
                    self._cond.wait()
                self._idle -= 1
                if not self._pending:
                    return None  # closed and drained
                while not self._closed and not self._full():
                    left = self._pending[0].arrived + self.max_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    if not self._pending:
                        break  # all cancelled meanwhile
                if self._pending:
                    batch = self._take()
                    if self._pending:
                        self._cond.notify()  # another worker may start on the rest
                    return batch

    def _work(self, stream: int) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            batch = [item for item in batch if not item.job.cancelled]
            if batch:
                self._run(batch, stream)

    def _run(self, batch: list[_Item], stream: int) -> None:
        start = time.perf_counter()
        try:
            feeds = pad([item.data for item in batch]) if self.modality == "text" else stack([item.data for item in batch])
            out = self.runtime.run(feeds, stream)
            if out.shape != (len(batch), self.dim):
                raise RuntimeError(f"the model returned shape {out.shape}, expected {(len(batch), self.dim)}")
        except Exception as exc:  # the jobs in this batch fail; the worker and other jobs go on
            logger.exception("a batch of %d items failed", len(batch))
            for job in {item.job for item in batch}:
                job._resolve(None, exc)
            return
        seconds = time.perf_counter() - start
        finite = np.isfinite(out).all(axis=1)
        done: list[Job] = []
        with self._rows:
            for item, row, good in zip(batch, out, finite):
                job = item.job
                if good:
                    job.vectors[item.row] = row
                else:
                    job.errors.append(ItemError(item.row, "non_finite", "model", "the model output NaN or inf"))
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
        self.item_seconds = 0.8 * self.item_seconds + 0.2 * seconds / len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        for job in done:
            job.errors.sort(key=lambda e: e.index)
            job._resolve((job.vectors, job.errors), None)
