"""Verification of a namespace: each commit's shard checked (:class:`Problem`), bad ones quarantined."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Sequence

from ..fs.atomic import fsync_dir
from . import cache

logger = logging.getLogger("embedkit.features.namespace")  # the namespace's log: its messages keep their name


@dataclass
class Problem:
    """A shard, commit record, cache or namespace record that failed verification."""

    shard: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"shard": self.shard, "reason": self.reason}


def verify(ns: Any, deep: bool = True) -> list[Problem]:
    """The problems of namespace ``ns``'s commits and current cache (see :meth:`Namespace.verify`)."""
    problems: list[Problem] = []
    with ns._lock():
        records = []
        for shard, record, why in ns._scan():
            why = why or ns._check(shard, record, deep)
            if why:
                problems.append(Problem(shard, why))
            else:
                records.append(record)
        key = cache.cache_key(records)
        folder = ns.path / "cache"
        if (folder / f"{key}.json").exists():  # a cache without its record is unfinished, never served
            why = cache.problem(folder, key, ns.digest, ns.tag)
            if why:
                problems.append(Problem("cache", f"{why} (derived data: the next load rebuilds it)"))
    return problems


def quarantine(ns: Any, problems: Sequence[Problem]) -> None:
    """Set the shards of ``problems`` aside in namespace ``ns`` (see :meth:`Namespace.quarantine`)."""
    if not problems:
        return
    with ns._lock(exclusive=True):
        target = ns.path / "quarantine"
        target.mkdir(exist_ok=True)
        for p in problems:
            if p.shard == "cache":
                shutil.rmtree(ns.path / "cache", ignore_errors=True)
                continue
            for src in (ns.path / "commits" / f"{p.shard}.json", ns.path / "shards" / f"{p.shard}.arrow"):
                if src.exists():
                    os.replace(src, target / src.name)
            logger.warning("quarantined shard %s of %s: %s", p.shard, ns.name, p.reason)
        if (ns.path / "commits").is_dir():
            fsync_dir(ns.path / "commits")
        ns.write_manifest()
