"""Advisory locks that let readers, writers and maintenance share one feature-store namespace.

One lock file per namespace (``.lock``), held with ``flock``: readers and writers hold it
*shared* while they read or write (many at once), ``gc`` and ``quarantine`` hold it
*exclusive*, so they never remove a file that a live process is writing or reading. The lock
belongs to the open file: a process killed with ``kill -9`` releases it, and a crashed writer's
leftovers are then provably abandoned. On a read-only store no writer or ``gc`` can run, so
readers proceed without the lock. On systems without ``fcntl`` (Windows) locking is a no-op.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor
        except OSError:
            return None  # read-only store without a lock file: nothing can write it


def _acquire(fd: int, mode: int, deadline: float | None) -> bool:
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        except OSError as exc:  # a file system without flock support
            logger.debug("no lock: %s", exc)
            return mode == fcntl.LOCK_SH


@contextmanager
def held(path: Path, exclusive: bool = False, wait: float | None = None) -> Iterator[bool]:
    """Hold the lock at ``path`` for the block; yields whether it is held.

    ``wait`` (seconds; None waits forever) bounds the wait of an exclusive request: when it
    runs out the block runs with ``False`` and the caller does only what is safe without the
    lock (``gc`` skips). Shared requests always wait. A lock that cannot be created
    (read-only store) yields ``True`` for shared requests.

    Exclusive requests do not starve behind a stream of readers: they first take the gate
    (``<path>.gate``) that every shared request passes, so new readers wait while the
    current ones finish.
    """
    fd = _open(path) if fcntl is not None else None
    if fd is None:
        yield not exclusive or fcntl is None
        return
    gate = _open(path.with_name(path.name + ".gate"))
    deadline = None if wait is None else time.monotonic() + wait
    try:
        if exclusive:
            got = (gate is None or _acquire(gate, fcntl.LOCK_EX, deadline)) and _acquire(fd, fcntl.LOCK_EX, deadline)
        else:
            if gate is not None:
                _acquire(gate, fcntl.LOCK_SH, None)
            got = _acquire(fd, fcntl.LOCK_SH, None)
            if gate is not None:
                os.close(gate)  # through the gate: let a waiting gc close it behind us
                gate = None
        yield got
    finally:
        if gate is not None:
            os.close(gate)
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def owned(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock at ``path`` for the block, without waiting; yields whether it is held
    (False: another live process holds it now). For one writer per output folder (a fine-tune's
    run folder, its checkpoints). A process killed with ``kill -9`` releases it; the lock file stays
    (an expected entry of the folder). Without ``fcntl``, or on a file system without ``flock``,
    yields True."""
    fd = _open(path) if fcntl is not None else None
    if fd is None:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        except OSError as exc:  # a file system without flock support
            logger.debug("no lock: %s", exc)
            got = True
        yield got
    finally:
        os.close(fd)
