"""One extraction's bookkeeping, shared by every engine: the report, what the run has seen
(ids, first contents, per-id ok rows, conflicts), and :func:`settle`, which counts a committed
shard job's items. The local engine (:mod:`.extraction`) and Ray (:mod:`.ray`) both settle here,
so the two report alike."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..inputs.fingerprints import fingerprint
from ..inputs.sources import Item
from .shards import ShardJob, ShardOutcome

logger = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    """What an extraction did; ``ok + failed + missing == total`` always (``missing``: Ray engine only,
    items of jobs lost with the cluster; the run then raises IncompleteExtractionError).

    ``ok`` counts every item whose embedding is in the store now: ``computed`` here,
    ``cached`` from earlier runs, and ``duplicates`` (content or id seen before in this run).
    ``changed`` counts user ids whose content differs from the stored one (recomputed);
    ``conflicts`` counts ids that named two contents in this run (their rows are ``failed``).
    ``namespace`` is the float namespace written (plain, or the chunk variant); ``compact`` the
    :class:`~embedkit.features.compaction.CompactReport` (as JSON) of the compact namespace derived
    from it when ``extract`` was given ``precision`` / ``dimensions``, else None. With
    ``chunk_rows=True``, ``rows_namespace`` is the per-chunk rows namespace written and
    ``chunk_rows`` the rows (windows) committed by this run (``""`` and 0 otherwise).
    """

    total: int = 0
    ok: int = 0
    failed: int = 0
    computed: int = 0
    cached: int = 0
    duplicates: int = 0
    changed: int = 0
    conflicts: int = 0
    truncated: int = 0
    shards: int = 0
    quarantined: int = 0
    missing: int = 0
    engine: str = "local"
    seconds: float = 0.0
    backbone: str = ""
    digest: str = ""
    namespace: str = ""
    compact: dict[str, Any] | None = None
    rows_namespace: str = ""
    chunk_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.total} items: {self.ok} ok ({self.computed} computed, {self.cached} already cached, "
            f"{self.duplicates} duplicates), {self.failed} failed, {self.truncated} truncated"
            + (f", {self.changed} changed" if self.changed else "")
            + (f", {self.conflicts} id conflicts" if self.conflicts else "") + "; "
            f"{rate:.0f} items/s computed -> {self.namespace}"
        )


class Run:
    """What one extraction has seen: ids, their first content, and per-id counts of ok rows."""

    def __init__(self, report: ExtractReport, progress: Callable[[int], None] | None, user_ids: bool,
                 modality: str) -> None:
        self.report, self.progress, self.user_ids, self.modality = report, progress, user_ids, modality
        self.seen: dict[str, tuple[str | None, str]] = {}  # id -> (fingerprint, first source)
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.ok_rows: dict[str, int] = {}
        self.conflicted: set[str] = set()
        self.pending: list[dict[str, Any]] = []  # conflict records for the next commit
        self.waiting: dict[str, int] = {}  # id queued for compute -> later copies waiting on its result

    def fingerprint(self, item: Item) -> str | None:
        """The content fingerprint of a user-id item (the id itself is one otherwise)."""
        if not self.user_ids:
            return None
        return fingerprint(item.payload, self.modality)  # None for no content (a bad row): it fails when encoded

    def count(self, item_id: str, ok: bool, n: int = 1, tick: bool = True) -> None:
        if ok:
            self.report.ok += n
            self.ok_rows[item_id] = self.ok_rows.get(item_id, 0) + n
        else:
            self.report.failed += n
        if tick:
            advance(self.progress, n)

    def conflict(self, item: Item, first: str) -> None:
        """A second content for an id: this row and every earlier ok row of the id fail."""
        moved = self.ok_rows.pop(item.id, 0)
        self.report.ok -= moved
        self.report.failed += moved
        self.count(item.id, ok=False)
        if item.id not in self.conflicted:
            self.conflicted.add(item.id)
            self.report.conflicts += 1
            self.done.discard(item.id)
            self.failed.add(item.id)
            self.pending.append({
                "id": item.id, "source": item.source, "stage": "id", "code": "id_conflict",
                "message": f"id {item.id!r} names different contents at {first} and {item.source}; "
                           "give each content its own id (or fix the duplicate row) and extract again",
            })
            logger.warning("id %r names different contents at %s and %s: recorded as a conflict",
                           item.id, first, item.source)


def advance(progress: Callable[[int], None] | None, n: int = 1) -> None:
    """Report ``n`` more items done to ``progress`` (when given)."""
    if progress is not None and n:
        progress(n)


def settle(job: ShardJob, outcome: ShardOutcome, run: Run) -> None:
    """Count a committed job's items (and the later copies of them that waited) in the report."""
    report = run.report
    ticks = 0
    ids = [item.id for item, k in zip(job.items, outcome.ok) if k]
    run.failed.update(f["id"] for f in outcome.failures)
    run.done.update(ids)
    report.shards += 1
    report.computed += len(ids)
    report.truncated += outcome.truncated
    for item, k in zip(job.items, outcome.ok):
        copies = 1 + run.waiting.pop(item.id, 0)
        ticks += copies
        report.duplicates += copies - 1
        ok = bool(k) and item.id not in run.conflicted  # a conflict found after it was queued (Ray windows)
        run.count(item.id, ok=ok, n=copies, tick=False)
    advance(run.progress, ticks)
