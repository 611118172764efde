"""Garbage collection of a namespace: orphan shards, temp files, quarantined shards, stale caches.

Only files named as a commit names them (``<20-digit ns time>-<pid>-<8 hex>.arrow`` and its
``.<name>.arrow.tmp``) are ever removed from ``shards/``, and elsewhere only the staging copies
of :func:`embedkit.fs.atomic.write_atomic` (``.<name>.<pid>-<8 hex>.tmp``): anything else is left alone.
"""
from __future__ import annotations

import logging
import re
import shutil
from typing import Any

from ..errors import StoreWriteError
from . import cache

logger = logging.getLogger("embedkit.features.namespace")  # the namespace's log: its messages keep their name

SHARD_FILE = re.compile(r"^(?P<temp>\.)?(?P<shard>\d{20}-\d+-[0-9a-f]{8})\.arrow(?(temp)\.tmp)$")
STAGED_FILE = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")  # embedkit.fs.atomic's staging copies
GC_WAIT = 60.0  # seconds gc waits for readers and writers of a namespace to pause


def collect(ns: Any, wait: float = GC_WAIT) -> dict[str, int]:
    """Remove what namespace ``ns`` no longer needs, or nothing while it is in use (see :meth:`Namespace.gc`)."""
    removed = {"orphan_shards": 0, "temp_files": 0, "quarantined": 0, "cache_files": 0, "busy": 0}
    with ns._lock(exclusive=True, wait=wait) as got:
        if not got:
            removed["busy"] = 1
            logger.warning("gc skipped %s: in use by another process", ns.path)
            return removed
        try:
            committed = {p.stem for p in (ns.path / "commits").glob("*.json")}
            for path in (ns.path / "shards").glob("*") if (ns.path / "shards").is_dir() else []:
                made = SHARD_FILE.match(path.name)  # only what a commit writes: other files are the user's
                if made is None or not path.is_file():
                    continue
                if made["temp"]:
                    path.unlink(missing_ok=True)
                    removed["temp_files"] += 1
                elif made["shard"] not in committed:
                    path.unlink(missing_ok=True)
                    removed["orphan_shards"] += 1
            for path in [*ns.path.glob("*/.*.tmp"), *ns.path.glob(".*.tmp")]:
                if path.parent.name != "shards" and STAGED_FILE.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)  # a write_atomic copy left by a crash
                    removed["temp_files"] += 1
            if (ns.path / "quarantine").is_dir():
                removed["quarantined"] = len(list((ns.path / "quarantine").iterdir()))
                shutil.rmtree(ns.path / "quarantine")
            if (ns.path / "cache").is_dir():
                records = [r for _, r, why in ns._scan() if why is None]
                removed["cache_files"] = cache.remove_others(ns.path / "cache", cache.cache_key(records))
        except OSError as exc:  # a read-only store: what gc would remove stays, said so
            raise StoreWriteError(exc.filename or ns.path, exc) from exc
    return removed
