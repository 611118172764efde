"""Garbage collection of a namespace: orphan shards, temp files, quarantined shards, stale caches."""
from __future__ import annotations

import logging
import shutil
from typing import Any

from ..errors import StoreWriteError
from . import cache

logger = logging.getLogger("embedkit.features.namespace")  # the namespace's log: its messages keep their name

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
                if path.name.startswith("."):
                    path.unlink(missing_ok=True)
                    removed["temp_files"] += 1
                elif path.stem not in committed:
                    path.unlink(missing_ok=True)
                    removed["orphan_shards"] += 1
            for path in [*ns.path.glob("*/.*.tmp"), *ns.path.glob(".*.tmp")]:
                path.unlink(missing_ok=True)
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
