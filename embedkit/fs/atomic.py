"""Crash-safe writes: a file or a whole folder is either absent/old or complete, never half written.

Everything embedkit publishes (store commits and manifests, exported artifacts, saved models and
indexes, command outputs) goes through here: write beside the target, fsync, rename into place,
fsync the folder.

Replacing a folder takes two renames (the old version aside, then the new one in), because a
folder cannot be renamed over a non-empty one. The old version is deleted only once the new one
is in place, so a crash at any point leaves one whole version: the target itself, or (a crash
between the two renames) the old version beside it as ``.<name>.<pid>-<random>.old``, which
:func:`current` finds and puts back. Names carry the writer's pid so that debris of a dead
writer can be told from a live writer's work in progress.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import OutputError, OutputExistsError

logger = logging.getLogger(__name__)

STAGING, ASIDE = "tmp", "old"


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """fsync every file under ``folder`` (recursively) and every folder below it."""
    for f in folder.iterdir():
        if f.is_symlink():
            continue
        if f.is_dir():
            fsync_files(f)
            fsync_dir(f)
        elif f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new content, nothing between."""
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` to write; when the block ends without error the file is
    fsynced and renamed over ``final`` (one atomic step). On error it is removed."""
    tmp = _sibling(final, STAGING)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only folder: the error that stopped the write is the one to see
            pass


@contextmanager
def staged_folder(final: Path, replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``final``; when the block ends without error its files are
    fsynced and it replaces ``final`` (see :func:`publish`). On error it is removed and
    ``final`` is left as it was. ``final``'s parent folder must exist."""
    staging = _sibling(final, STAGING)
    staging.mkdir()
    try:
        yield staging
        publish(staging, final, replaceable)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, final: Path, replaceable: Callable[[Path], bool] | None = None) -> None:
    """Move the complete folder ``staging`` to ``final``, keeping an existing ``final`` until
    the new one is in place.

    Raises:
        OutputExistsError: ``final`` exists and ``replaceable(final)`` says it is not an
            earlier output of the same kind (checked again here, just before the rename).
    """

    fsync_files(staging)
    for _ in range(5):  # a concurrent writer or reader may put a version back in between
        aside = None
        if os.path.lexists(final):
            if replaceable is not None and not replaceable(final):
                raise OutputExistsError(f"{final} exists and is not an embedkit output of this kind; nothing was replaced")
            aside = _sibling(final, ASIDE)
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                aside = None
            fsync_dir(final.parent)
        try:
            os.rename(staging, final)  # the commit point: from here on readers see the new version
        except OSError:
            if not os.path.lexists(final):
                raise
            continue
        fsync_dir(final.parent)
        if aside is not None:
            _remove(aside)
        sweep(final)
        return
    raise OutputError(f"{final} kept reappearing while it was being replaced; is another process writing it?")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def debris_of(name: str, final_name: str) -> tuple[int, str] | None:
    """``(writer pid, "tmp" | "old")`` when ``name`` is a staging copy or set-aside version of
    ``final_name`` (named by :func:`_sibling`), else None."""
    prefix = f".{final_name}."
    if not name.startswith(prefix):
        return None
    tag, _, suffix = name[len(prefix):].rpartition(".")
    pid = tag.split("-")[0]
    return (int(pid), suffix) if suffix in (STAGING, ASIDE) and pid.isdigit() else None


def _debris(final: Path) -> list[tuple[Path, int, str]]:
    """(path, writer pid, tmp|old) of every staging folder or set-aside version of ``final``."""
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    return [(p, *found) for p in entries if (found := debris_of(p.name, final.name)) is not None]


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts; another user's process counts too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(final: Path) -> None:
    """Remove staging folders and set-aside versions of ``final`` left by writers that died
    (only while ``final`` itself exists, so the last whole version is never touched)."""
    if not final.exists():
        return
    for path, pid, _ in _debris(final):
        if not alive(pid):
            _remove(path)


def current(final: Path, marker: str, wait: float = 5.0) -> Path:
    """The folder to read ``final`` from.

    Normally ``final`` itself. After a crash between the two renames of a replacement,
    ``final`` is missing and the earlier version (holding ``marker``) lies beside it: it is
    renamed back (or, in a read-only folder, read where it lies). While the writer is still
    alive, its new version is waited for (up to ``wait`` seconds) instead.
    """
    if final.exists():
        return final
    deadline = time.monotonic() + wait
    while True:
        asides = [(p, pid) for p, pid, kind in _debris(final) if kind == ASIDE and (p / marker).is_file()]
        if not asides:
            return final
        if not any(alive(pid) for _, pid in asides) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        if final.exists():
            return final
    aside = max((p for p, _ in asides), key=lambda p: (p / marker).stat().st_mtime)
    try:
        os.rename(aside, final)
        fsync_dir(final.parent)
        logger.warning("%s: a replacement was interrupted; the earlier version was put back", final)
        return final
    except OSError:
        if final.exists():
            return final
        logger.warning("%s: a replacement was interrupted; reading the earlier version at %s", final, aside)
        return aside


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file at ``path``, replaced in one atomic step.

    Serialised in memory and written through :func:`write_atomic`, never with
    ``safetensors.torch.save_file``: that one writes a temporary ``.tmpXXXXXX`` file of its own
    beside the target, which a ``kill -9`` leaves behind under a name embedkit does not know
    (a folder holding it then looks like it holds a user's file and is refused, e.g. by
    ``--resume``).
    """
    from safetensors.torch import save

    write_atomic(path, save(tensors, metadata=metadata))
