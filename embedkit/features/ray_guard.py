"""What bounds a Ray run: retries and restarts sized so that attempts, not Ray, end a pass
(:func:`restarts_for`), a stall guard that abandons a pass making no progress
(:func:`read_guarded`, :data:`STALL_S`), the executor of an abandoned pass stopped
(:func:`stop_executors`), and Ctrl-C kept (:func:`ctrl_c_kept`).

The bound: each shard job is tried at most ``1 + MAX_TASK_RETRIES`` times whole, then each of its
items as often alone (:class:`embedkit.features.ray.RayRunner`); a pass in which no block comes back
and nothing is committed for ``STALL_S`` seconds (``$EMBEDKIT_RAY_STALL_S``) is abandoned and its
unfinished items reported missing. ``ray`` itself is never imported here.
"""
from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterable

MAX_TASK_RETRIES = 2  # a job is tried 1 + this many times per pass (two passes: whole, then item by item)
MAX_RESTARTS = 4  # per actor, beyond the deaths of the pass's own attempts (restarts_for); fresh actors each pass
# A pass with no block returned and nothing committed for this long is abandoned (its items are
# missing: IncompleteExtractionError, exit 3); EMBEDKIT_RAY_STALL_S overrides it
STALL_S = 600.0


def restarts_for(jobs: int) -> int:
    """Restarts allowed to each actor of a pass over ``jobs`` jobs.

    An actor that has used up its restarts is dead for good, and Ray Data (2.60) then waits for it
    for ever: the driver spun a core with no progress once two items killed the one actor of
    ``--workers 1`` (3 attempts each: 6 deaths > 4 restarts). Each death of an actor that embedkit
    causes is the death of one attempt of one job, and attempts are bounded (``1 +
    MAX_TASK_RETRIES`` per job), so an actor allowed this many restarts outlives every attempt of
    the pass (plus ``MAX_RESTARTS`` deaths from outside, a kill or out of memory). Deaths beyond
    that are caught by the stall guard (:data:`STALL_S`).
    """
    return MAX_RESTARTS + jobs * (1 + MAX_TASK_RETRIES)


def stop_executors(before: set[threading.Thread], pumping: threading.Thread) -> None:
    """Shut down the Ray Data executor of an abandoned pass (and wait for its reader to end).

    Left running, it would go on scheduling, and once the private Ray is shut down its thread
    would start a new one (Ray Data initialises Ray when it finds none). Ray Data's streaming
    executor is a thread of its own: the new ones are this pass's.
    """
    for thread in set(threading.enumerate()) - before:
        if type(thread).__name__ == "StreamingExecutor" and callable(getattr(thread, "shutdown", None)):
            with contextlib.suppress(Exception):
                thread.shutdown(force=True, exception=RuntimeError("abandoned by embedkit: no progress"))
    pumping.join(timeout=30)


def read_guarded(batches: Callable[[], Iterable[Any]], progress: Callable[[], int], stall_s: float,
                 take: Callable[[Any], None]) -> bool:
    """Read one pass's blocks while a stall guard watches it; returns False when it was abandoned.

    ``batches()`` (Ray Data's iterator) is read in a helper thread; this thread hands each block
    to ``take`` and watches ``progress()`` (the store's commit count). A pass in which no block
    comes back and ``progress()`` does not change for ``stall_s`` seconds is abandoned: Ray Data
    waits for ever on a pool whose actors can no longer start (an actor that dies while it loads
    its model, or killed more often than :func:`restarts_for` allows), and a job that hangs in
    native code never returns. Whatever ends the read early (abandoned, an error raised by the
    pass or by ``take``, Ctrl-C) stops the pass's executor: nothing of it goes on running.
    """
    results: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for batch in batches():
                results.put(("batch", batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            results.put(("error", exc))
        else:
            results.put(("end", None))

    before = set(threading.enumerate())
    pumping = threading.Thread(target=pump, name="embedkit-ray-pass", daemon=True)
    pumping.start()
    last, seen = time.monotonic(), progress()
    ended = False
    try:
        while True:
            try:
                kind, value = results.get(timeout=0.5)
            except queue.Empty:
                now, count = time.monotonic(), progress()
                if count != seen:
                    last, seen = now, count
                elif now - last > stall_s:
                    return False
                continue
            last = time.monotonic()
            if kind == "end":
                ended = True
                return True
            if kind == "error":
                raise value
            take(value)
    finally:
        if not ended:  # abandoned, an error, Ctrl-C: nothing of this pass goes on running
            stop_executors(before, pumping)


@contextlib.contextmanager
def ctrl_c_kept() -> Any:
    """Ctrl-C during a Ray Data run always ends the run with ``KeyboardInterrupt``.

    Ray Data's iterators can swallow a ``KeyboardInterrupt`` (seen in CI: the interrupted window
    looked like blocks lost to crashes, was rerun item by item, and the run ended with exit 0), so
    the signal is recorded here and raised again once Ray returns. Main thread only (where Python
    delivers signals); a SIGINT the caller ignores stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        yield
        return
    hit: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        hit.append(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt
