"""Files named by metadata stay inside their folder: the one check every reader of such files uses.

A saved model's ``model.json``, an index's ``index.json`` and an artifact's ``manifest.json``
name the files beside them. A crafted name (``../../etc/hostname``, an absolute path, a symlink
out of the folder) or a special file (a FIFO, ``/dev/zero``) would make a reader open, hash and
print something else or hang; :func:`member` refuses all of these before a byte is read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UnsafeModelError


def within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, once both are resolved (symlinks followed)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def member(folder: str | os.PathLike[str], name: str, error: type[Exception] = UnsafeModelError) -> Path:
    """The regular file ``name`` names inside ``folder``, resolved.

    Raises:
        error (default :class:`UnsafeModelError`): ``name`` is absolute, leaves ``folder``
            (``..``, a symlink pointing out), is missing, or is not a regular file (a FIFO,
            a device such as ``/dev/zero``, a folder).
    """
    root = Path(folder).resolve()
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise error(f"{name!r} named in {root}'s metadata is not a relative file name; refusing it")
    target = (root / name).resolve()
    if root not in target.parents:
        raise error(f"{name!r} named in {root}'s metadata points outside {root}; refusing it")
    try:
        mode = target.stat().st_mode
    except OSError as exc:
        raise error(f"{target} named in {root}'s metadata is missing ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        raise error(f"{target} named in {root}'s metadata is not a regular file; refusing to read it")
    return target
