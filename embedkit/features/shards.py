"""The shard worker shared by every extraction engine (local and Ray).

A *shard job* is a fixed run of planned source items that still need an embedding; its key
is a hash of the artifact digest and the job's ids and contents, so a retried job has the same
key. :func:`compute_shard` decodes / tokenises, encodes and commits one job (vectors and the
per-item failure records in one commit record, which also names the key). It is idempotent:
given the keys already committed, a committed job is never computed again, its outcome is
read back from the commit record. With a namespace of per-chunk rows (``rows``), each job's
windows are committed there first, then its pooled vectors (:mod:`embedkit.features.chunk_rows`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..inputs.sources import Item
from . import chunk_rows

logger = logging.getLogger(__name__)

WORKER_CRASHED = "worker_crashed"


@dataclass
class ShardJob:
    """Items to compute in one commit, with records committed beside them (id conflicts)."""

    items: list[Item]
    contents: list[str | None]  # content fingerprints beside user ids (None: content ids)
    extra: list[dict[str, Any]] = field(default_factory=list)
    user_ids: bool = False  # ids from a column: the contents are stored beside them
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = job_key(self.items, self.contents, self.extra)


@dataclass
class ShardOutcome:
    """What a committed job gave: ``ok[i]`` for ``job.items[i]``, its failure records, truncations."""

    ok: list[bool]
    failures: list[dict[str, Any]]
    truncated: int = 0
    shard: str | None = None
    recomputed: bool = True  # False: read back from an earlier commit of the same key
    rows: int = 0  # per-chunk rows committed (extract with chunk_rows=True)


def job_key(items: Sequence[Item], contents: Sequence[str | None], extra: Sequence[dict[str, Any]] = ()) -> str:
    """A stable name for a job: the same items (ids, contents) and records give the same key."""
    h = hashlib.sha256()
    for item, content in zip(items, contents):
        h.update(item.id.encode("utf-8", "surrogatepass") + b"\0" + (content or "").encode() + b"\n")
    for record in extra:
        h.update(b"x" + str(record.get("id")).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()[:32]


def committed_keys(namespace: Any, since_ns: int = 0) -> dict[str, dict[str, Any]]:
    """Job key -> commit record, for readable commits named at or after ``since_ns`` that name a key.

    Shard names start with the committing clock's ``time_ns`` (see ``Namespace.commit``), so a
    run reads only the records of its own time (a long store history is not re-read per window).
    """
    import json

    first = f"{max(0, since_ns):020d}"
    found: dict[str, dict[str, Any]] = {}
    folder = namespace.path / "commits"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.stem < first:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # damaged: `verify` reports it; its job is simply computed again
        stats = record.get("stats") if isinstance(record, dict) else None
        if isinstance(stats, dict) and stats.get("key") and record.get("shard") == path.stem:
            found[stats["key"]] = record
    return found


def outcome_from_record(job: ShardJob, record: dict[str, Any]) -> ShardOutcome:
    """The outcome of a job that a commit record already holds (every item not failed there is stored)."""
    failed = {f["id"] for f in record.get("failures", [])}
    return ShardOutcome([item.id not in failed for item in job.items],
                        [f for f in record.get("failures", []) if f.get("code") != "id_conflict"],
                        int(record.get("stats", {}).get("truncated", 0)), record.get("shard"), recomputed=False)


def compute_shard(job: ShardJob, encoder: Any, namespace: Any, done: dict[str, dict[str, Any]] | None = None,
                  rows: Any = None) -> ShardOutcome:
    """Encode ``job``'s items and commit them with their failure records, once.

    ``done`` maps keys already committed to their records (see :func:`committed_keys`): a job
    found there is not computed again. ``rows``: the namespace of per-chunk rows (a text encoder
    with ``long="chunk"``), where the job's windows are committed before its pooled vectors.
    Raises StoreWriteError when the store cannot be written (nothing of the job is committed
    then) and ArtifactError when the model returns a wrong shape.
    """
    if done is not None and job.key in done:
        logger.info("shard job %s was committed already (%s): not computed again", job.key[:12], done[job.key]["shard"])
        return outcome_from_record(job, done[job.key])
    ok = np.zeros(0, dtype=bool)
    failures: list[dict[str, Any]] = []
    vectors = np.empty((0, namespace.dim), np.float32)
    stats: dict[str, Any] = {"key": job.key}
    truncated = 0
    result = None
    if job.items:
        result = encoder.encode([item.payload for item in job.items], **({"chunk_rows": True} if rows is not None else {}))
        ok = np.asarray(result.ok, dtype=bool)
        for error in result.errors:
            item = job.items[error.index]
            failures.append({"id": item.id, "source": item.source, "stage": error.stage,
                             "code": error.code, "message": error.message})
        vectors = result.vectors[ok] if ok.any() else vectors
        truncated = int(getattr(result.stats, "truncated", 0))
        runtime = encoder.runtime
        stats["runtime"] = {"kind": type(runtime).__name__, "device": runtime.device,
                            "providers": list(runtime.providers),
                            # provenance: every runtime passed this artifact's gate, so shards may mix
                            # them; the precision says which were computed in bf16 or by an int8 graph
                            "precision": getattr(runtime, "precision", "fp32")}
    good = [item for item, k in zip(job.items, ok) if k]
    fps = [c for c, k in zip(job.contents, ok) if k] if job.user_ids else None
    stats.update(computed=len(good), failed=len(failures), conflicts=len(job.extra), truncated=truncated)
    windows = chunk_rows.commit(rows, job, result) if rows is not None else 0  # first: see chunk_rows
    shard = namespace.commit([item.id for item in good], vectors, [item.source for item in good],
                             failures + list(job.extra), stats, contents=fps)
    return ShardOutcome([bool(k) for k in ok], failures, truncated, shard, rows=windows)


def crashed_outcome(job: ShardJob, namespace: Any, crashed: Iterable[Item], attempts: int) -> None:
    """Commit ``worker_crashed`` failure records for items whose every attempt killed its worker."""
    records = [{"id": item.id, "source": item.source, "stage": "model", "code": WORKER_CRASHED,
                "message": f"encoding this item killed its worker process on each of {attempts} attempts "
                           "(a crash in native code, an abort or out of memory); the other items were stored"}
               for item in crashed]
    if records or job.extra:
        namespace.commit([], np.empty((0, namespace.dim), np.float32), [], records + list(job.extra),
                         {"key": job.key + "-crashed", "failed": len(records), "conflicts": len(job.extra)})
