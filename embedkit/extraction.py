"""Extraction at scale: source -> skip what is stored -> encode -> commit shards, exactly once.

Shards are consecutive runs of ``shard_size`` source items (cached and duplicate items
included), so a rerun after a crash recomputes the interrupted shard with exactly the batches
of an uninterrupted run: the final store is the same, bit for bit. Within a shard only the
missing items are encoded (decoding / tokenising in parallel workers overlapped with ONNX
Runtime, see :mod:`embedkit.encoder`); each shard is committed atomically with the failure
records of its items.

With user ids (``id_column``) each row's content fingerprint is stored beside its id: a rerun
recomputes an id whose content changed (``changed`` in the report; the new vector is served),
and two rows of one run with one id and different contents are a conflict: both rows count as
failed, with an ``id_conflict`` failure record, and the id serves no vector until the input is
fixed and extracted again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .sources import Item, fingerprint, iter_items
from .store import FeatureStore, Namespace

logger = logging.getLogger(__name__)

SHARD_SIZE = {"text": 4096, "image": 512}


@dataclass
class ExtractReport:
    """What an extraction did; ``ok + failed == total`` always.

    ``ok`` counts every item whose embedding is in the store now: ``computed`` here,
    ``cached`` from earlier runs, and ``duplicates`` (content or id seen before in this run).
    ``changed`` counts user ids whose content differs from the stored one (recomputed);
    ``conflicts`` counts ids that named two contents in this run (their rows are ``failed``).
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
    seconds: float = 0.0
    backbone: str = ""
    digest: str = ""
    namespace: str = ""

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


class _Shard:
    def __init__(self) -> None:
        self.items: list[Item] = []  # to compute
        self.contents: list[str | None] = []  # their content fingerprints (user ids only)
        self.waiting: dict[str, int] = {}  # id -> later copies in this shard waiting on its result
        self.size = 0  # source items in this shard, computed or not


def extract(
    source: Any,
    backbone: str = "minilm-l6",
    store: str = "features",
    *,
    column: str | None = None,
    id_column: str | None = None,
    shard_size: int | None = None,
    verify: bool = True,
    models: str | None = None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> ExtractReport:
    """Extract features of every item of ``source`` into a :class:`FeatureStore`.

    Args:
        source: folder, glob, ``.txt`` / table file, or an iterable (see
            :func:`embedkit.sources.iter_items`).
        backbone: registered name, spec, artifact folder or digest.
        store: the feature store folder.
        column, id_column: the table columns of the payload and of user ids.
        shard_size: source items per shard (default 4096 texts / 512 images); keep it
            between a run and its reruns for bit-identical results.
        verify: check every committed shard's checksum first; damaged ones are set aside
            and their items recomputed.
        models: the model store (default ``$EMBEDKIT_HOME``, else the user cache folder).
        options: encoder options (device, threads, batch_tokens, batch_size, workers, ...).

    Raises:
        OutputError: ``store`` is refused before any work: its folder is missing, it is, holds
            or lies inside ``source``, or it exists and is not a feature store (nor empty).
    """
    from .encoder import encoder_for
    from .exporter import resolve
    from .outputs import check_output

    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):  # 0 is refused, not "default"
        raise ValueError(f"shard_size must be a positive int or None, got {shard_size!r}")
    check_output(store, "feature-store", inputs=[source])  # before any work: not an input, not a foreign folder
    start = time.perf_counter()
    artifact = resolve(backbone, models)
    encoder = encoder_for(artifact, **options)
    namespace = FeatureStore(store).namespace(artifact)
    namespace.check_writable()  # a read-only or full store fails before any compute
    report = ExtractReport(backbone=artifact.name, digest=artifact.digest, namespace=str(namespace.path))
    if verify:
        problems = namespace.verify(deep=True)
        namespace.quarantine(problems)
        report.quarantined = len(problems)
    stored = namespace.stored()  # id -> content fingerprint, from earlier runs
    run = _Run(report, progress, bool(id_column), artifact.modality)
    size = shard_size or SHARD_SIZE[artifact.modality]
    shard = _Shard()
    for item in iter_items(source, artifact.modality, column, id_column):
        report.total += 1
        shard.size += 1
        fp = run.fingerprint(item)
        first = run.seen.setdefault(item.id, (fp, item.source)) if id_column else (None, "")
        if first[0] != fp:
            run.conflict(item, first[1])
        elif item.id in run.conflicted:
            run.count(item.id, ok=False)
        elif item.id in shard.waiting:
            shard.waiting[item.id] += 1
        elif item.id in stored and (not id_column or stored[item.id] == fp):
            report.cached += 1
            run.count(item.id, ok=True)
        elif item.id in run.done or item.id in run.failed:
            report.duplicates += 1
            run.count(item.id, ok=item.id in run.done)  # the same content already failed in this run
        else:
            if item.id in stored:
                report.changed += 1  # the stored vector is of another content: recompute
                logger.debug("id %r (%s): content changed since it was stored; recomputing", item.id, item.source)
            shard.items.append(item)
            shard.contents.append(fp if id_column else None)
            shard.waiting[item.id] = 0
        if shard.size >= size:
            _flush(shard, encoder, namespace, run)
            shard = _Shard()
    _flush(shard, encoder, namespace, run)
    report.seconds = time.perf_counter() - start
    if report.changed:
        logger.info("%d ids had another content (or none recorded) in the store: recomputed", report.changed)
    logger.info("extract %s (%s): %s", artifact.name, artifact.digest[:12], report.summary())
    return report


class _Run:
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
            _tick(self.progress, n)

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


def _tick(progress: Callable[[int], None] | None, n: int = 1) -> None:
    if progress is not None and n:
        progress(n)


def _flush(shard: _Shard, encoder: Any, namespace: Namespace, run: _Run) -> None:
    report = run.report
    ticks = len(shard.items) + sum(shard.waiting.values())
    keep = [n for n, item in enumerate(shard.items) if item.id not in run.conflicted]
    for n, item in enumerate(shard.items):  # an id that conflicted since it was queued: not embedded
        if item.id in run.conflicted:
            run.count(item.id, ok=False, n=1 + shard.waiting.pop(item.id, 0), tick=False)
    items = [shard.items[n] for n in keep]
    contents = [shard.contents[n] for n in keep]
    if not items and not run.pending:
        _tick(run.progress, ticks)
        return
    ok = np.zeros(0, dtype=bool)
    failures: list[dict[str, Any]] = []
    vectors = np.empty((0, namespace.dim), np.float32)
    stats: dict[str, Any] = {}
    if items:
        result = encoder.encode([item.payload for item in items])
        ok = np.asarray(result.ok, dtype=bool)
        for error in result.errors:
            item = items[error.index]
            failures.append({"id": item.id, "source": item.source, "stage": error.stage,
                             "code": error.code, "message": error.message})
            run.failed.add(item.id)
        vectors = result.vectors[ok] if ok.any() else vectors
        report.truncated += int(getattr(result.stats, "truncated", 0))
        runtime = encoder.runtime
        # provenance: every runtime passed this artifact's gate, so shards may mix them; the
        # precision says which shards were computed in bf16 (or by an int8 variant's graph)
        stats["runtime"] = {"kind": type(runtime).__name__, "device": runtime.device,
                            "providers": list(runtime.providers), "precision": getattr(runtime, "precision", "fp32")}
    good = [item for item, k in zip(items, ok) if k]
    ids = [item.id for item in good]
    sources = [item.source for item in good]
    fps = [c for c, k in zip(contents, ok) if k] if run.user_ids else None
    conflicts, run.pending = run.pending, []
    namespace.commit(ids, vectors, sources, failures + conflicts,
                     {"computed": len(ids), "failed": len(failures), "conflicts": len(conflicts), **stats},
                     contents=fps)
    run.done.update(ids)
    report.shards += 1
    report.computed += len(ids)
    for item, k in zip(items, ok):
        copies = 1 + shard.waiting.get(item.id, 0)
        report.duplicates += copies - 1
        run.count(item.id, ok=bool(k), n=copies, tick=False)
    _tick(run.progress, ticks)
