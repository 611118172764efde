"""Compact namespaces derived from a float namespace, without running the model again.

:func:`compact` reads the float32 vectors of a namespace (plain, or chunked texts) and writes
their compact rows (:class:`~embedkit.encoders.compact.Compact`: int8 / uint8 / binary, or
``dimensions`` kept) into the namespace of that variant, ``<digest>[.chunk-...].<compact tag>``
(:mod:`embedkit.features.variants`):

- **Calibration, once.** The first run for an int8 / uint8 variant fits the per-dimension ranges
  on the stored float vectors (a seeded sample of at most ``calibration_rows`` of them, so a
  rerun on the same store fits the same ranges) and records them, with their sha256, in the
  compact namespace's ``namespace.json`` (``variant.compact.calibration``). Every later run
  reads them from there and never fits again: every vector of the namespace is quantised alike,
  whatever was added since (values outside the ranges are clipped).
- **Incremental.** Each commit of the compact namespace records the float shard its rows came
  from (``stats.origin``). An id is converted when the compact namespace does not serve it from
  the float shard that serves it now: new ids, and ids whose float vector was recomputed (content
  changed, a damaged shard recomputed). An id whose float vector became a failure gets that
  failure record in the compact namespace too (it is no longer served there).
- **Bounded, exactly once.** The float shards are read one at a time (checked against their
  sha256 first) and converted in commits of at most ``batch_rows`` rows, each atomic like
  extraction's (:meth:`Namespace.commit`); ``kill -9`` leaves complete commits, and a rerun
  converts what is left: the result equals an uninterrupted run's, bit for bit.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..encoders.compact import CALIBRATED, CALIBRATION_ROWS, Compact
from ..errors import StoreError, UsageError
from ..fs.locks import held
from . import variants
from .store import FeatureStore, Namespace

__all__ = ["BATCH_ROWS", "CompactReport", "check_settings", "compact", "compact_features", "compact_namespace",
           "rows_for"]

logger = logging.getLogger(__name__)

BATCH_ROWS = 65_536  # rows per commit at most: bounds memory (float32 rows read + compact rows written)
SEED = 0  # of the calibration sample
LOCK = ".compact.lock"  # in the float namespace: one process at a time fits and records a calibration


@dataclass
class CompactReport:
    """What :func:`compact` did. ``converted + skipped`` are the float namespace's served ids;
    ``dropped`` ids had a compact row but their float vector became a failure (recorded as one).
    ``calibration``: ``sha256``, ``rows``, ``source`` and ``fitted`` (True: fitted by this run,
    False: read from the namespace), None for binary and float32. ``vector_bytes``: one vector's
    values (d for int8 / uint8, ceil(d / 8) for binary, 4 d for float32); ``bytes_per_row``: the
    compact shards' bytes per stored row (the vector plus its id, source, fingerprint and Arrow's
    framing)."""

    backbone: str = ""
    digest: str = ""
    namespace: str = ""
    source: str = ""
    variant: str = ""
    precision: str = "float32"
    dimensions: int = 0
    rows: int = 0
    converted: int = 0
    skipped: int = 0
    dropped: int = 0
    shards: int = 0
    quarantined: int = 0
    calibration: dict[str, Any] | None = None
    vector_bytes: int = 0
    bytes_per_row: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        cal = self.calibration
        how = (f"; calibration {cal['sha256'][:12]} ({'fitted now' if cal['fitted'] else 'recorded'}, "
               f"{cal['rows']} rows of {cal['source']})" if cal else "")
        return (f"{self.rows} {self.precision} vectors of {self.dimensions} dims ({self.converted} converted, "
                f"{self.skipped} already there, {self.dropped} dropped){how}; {self.vector_bytes} bytes/vector, "
                f"{self.bytes_per_row:.1f} bytes/row stored -> {self.namespace}")


@dataclass(frozen=True)
class _Origin:
    """What :meth:`FeatureStore.namespace` reads of an artifact, from the float namespace's record."""

    name: str
    digest: str
    dim: int
    modality: str
    manifest: dict[str, Any]


def compact(store: Any, backbone: str, *, precision: str = "int8", dimensions: int | None = None,
            long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
            calibration_rows: int | None = None, batch_rows: int = BATCH_ROWS, verify: bool = True,
            progress: Callable[[int], None] | None = None) -> CompactReport:
    """Derive (or bring up to date) the compact namespace of a backbone's float vectors in ``store``.

    Args:
        store: the feature store (a folder or a :class:`FeatureStore`).
        backbone: name (the newest digest with float vectors of ``long``), digest or prefix.
        precision: ``int8`` | ``uint8`` (calibrated) | ``binary`` (sign bits, packed) | ``float32``
            (with ``dimensions`` only).
        dimensions: keep the first ``dimensions`` of each vector, renormalised (None: all D).
        long, chunk_overlap, max_chunks: which float namespace: ``truncate`` (plain) or ``chunk``.
        calibration_rows: int8 / uint8, first run only: fit the ranges on a seeded sample of at most
            this many stored vectors (>= 2; None: 100,000); refused with another precision.
        batch_rows: rows per commit at most.
        verify: check the compact namespace's shards first; damaged ones are set aside and their
            ids converted again.
        progress: called with the number of ids converted, after each commit.

    Returns:
        A :class:`CompactReport`.

    Raises:
        UsageError: an unknown precision, nothing to compact (float32 with all dimensions),
            ``dimensions`` above D, a bad ``calibration_rows`` / ``batch_rows``, or fewer than 2
            stored vectors to fit a calibration on.
        StoreError: no float namespace of ``backbone`` and ``long``, a damaged float shard (a rerun
            of extract sets it aside and recomputes it), or two compact namespaces of one digest
            and variant (calibrated apart).
        StoreWriteError: the store cannot be written.
    """
    variants.Wanted(precision, dimensions, long, chunk_overlap, max_chunks)  # UsageError before any work
    calibration_rows = rows_for(precision, calibration_rows)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    source = fs.find(backbone, long=long, chunk_overlap=chunk_overlap, max_chunks=max_chunks)
    return compact_namespace(fs, source, precision=precision, dimensions=dimensions,
                             calibration_rows=calibration_rows, batch_rows=batch_rows, verify=verify, progress=progress)


compact_features = compact  # the name of the public API: ``embedkit.compact_features``


def compact_namespace(fs: FeatureStore, source: Namespace, *, precision: str = "int8", dimensions: int | None = None,
                      calibration_rows: int = CALIBRATION_ROWS, batch_rows: int = BATCH_ROWS, verify: bool = True,
                      progress: Callable[[int], None] | None = None) -> CompactReport:
    """:func:`compact` of the float namespace ``source`` of ``fs`` (the route of ``extract(precision=...)``)."""
    start = time.perf_counter()
    check_settings(calibration_rows, batch_rows)
    if source.variant.get("compact"):
        raise UsageError(f"{source.key} holds compact vectors already; compact its float namespace")
    if dimensions is not None and dimensions == source.dim:
        dimensions = None  # every dimension kept: the namespace of dimensions=None, never a d<D> twin of it
    plan = Compact(dimensions, precision, None) if precision not in CALIBRATED else None
    if plan is not None and plan.is_float:
        raise UsageError(f"nothing to compact: float32 with every dimension ({source.dim}) is the float namespace "
                         "itself")
    d = Compact(dimensions).output_dim(source.dim)  # UsageError: more dimensions than the backbone gives
    target, fitted = _target(fs, source, precision, dimensions, calibration_rows, plan)
    report = CompactReport(backbone=source.name, digest=source.digest, namespace=str(target.path),
                           source=str(source.path), variant=target.tag, precision=precision, dimensions=d)
    if verify:
        problems = target.verify(deep=True)
        target.quarantine(problems)
        report.quarantined = len(problems)
    rule = target.compact
    cal = rule.calibration
    if cal is not None:
        report.calibration = {"sha256": cal.digest, "rows": cal.rows, "source": cal.source, "fitted": fitted}
    with source._lock():
        records = source._records_or_raise()
        served, failed = source._events(records)
    with target._lock():
        done_records = target._records_or_raise()
        done, _ = target._events(done_records)
    origins = [r.get("stats", {}).get("origin") for r in done_records]  # the float shard each commit came from
    todo: dict[int, list[tuple[int, str]]] = {}
    for item, (n, row, _) in served.items():
        there = done.get(item)
        if there is not None and origins[there[0]] == records[n]["shard"]:
            report.skipped += 1
        else:
            todo.setdefault(n, []).append((row, item))
    for n in sorted(todo):
        _convert(source, target, rule, records[n], sorted(todo[n]), batch_rows, report, progress)
    gone = [failed[item] for item in done if item in failed]
    if gone:
        target.commit([], np.empty((0, target.width), target.dtype), [], gone,
                      {"origin": None, "dropped": len(gone), "compact": target.tag})
        report.dropped, report.shards = len(gone), report.shards + 1
    # served now: every float vector, and compact rows whose float id is neither served nor failed (set aside)
    report.rows = len(served) + sum(1 for item in done if item not in served and item not in failed)
    written = target.commits()
    shard_rows = sum(r["rows"] for r in written)
    report.vector_bytes = variants.vector_bytes(rule, source.dim)
    report.bytes_per_row = sum(r["bytes"] for r in written) / shard_rows if shard_rows else 0.0
    report.seconds = time.perf_counter() - start
    logger.info("compact %s: %s", target.key, report.summary())
    return report


def rows_for(precision: str, calibration_rows: int | None) -> int:
    """The calibration sample size: ``calibration_rows`` (None: :data:`CALIBRATION_ROWS`); UsageError
    when it is given with a precision that fits no calibration (it would change nothing)."""
    if calibration_rows is None:
        return CALIBRATION_ROWS
    if precision not in CALIBRATED:
        raise UsageError(f"calibration_rows applies to precision int8 / uint8 (the ranges it fits), not {precision!r}")
    check_settings(calibration_rows)
    return calibration_rows


def check_settings(calibration_rows: int, batch_rows: int = BATCH_ROWS) -> None:
    """UsageError unless ``calibration_rows`` is an int >= 2 and ``batch_rows`` an int >= 1."""
    for name, value, low in (("calibration_rows", calibration_rows, 2), ("batch_rows", batch_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an int >= {low}, got {value!r}")


def _target(fs: FeatureStore, source: Namespace, precision: str, dimensions: int | None, calibration_rows: int,
            plan: Compact | None) -> tuple[Namespace, bool]:
    """The compact namespace (created, its calibration fitted, the first time) and whether it was fitted now."""
    want = variants.Wanted(precision, dimensions, source.variant.get("long", "truncate"),
                           source.variant.get("chunk_overlap"), source.variant.get("max_chunks"))
    with held(source.path / LOCK, exclusive=True):  # two first runs record one calibration, not two
        found = [n for n in fs.namespaces() if n.name == source.name and n.digest == source.digest
                 and n.variant.get("compact") and want.matches(n.variant)]
        if len(found) > 1:
            raise StoreError(f"{len(found)} compact namespaces of {source.key} answer {want.describe()}: "
                             f"{', '.join(sorted(n.tag for n in found))}; keep one (move the others out of the store)")
        if found:
            return found[0], False
        fitted = plan is None
        if plan is None:
            sample = _sample(source, calibration_rows)
            plan = Compact.fitted(sample, dimensions, precision, source=f"store:{source.key}", max_rows=calibration_rows)
            logger.info("calibration of %s fitted on %d stored vectors: %s", source.key, len(sample),
                        plan.calibration.digest[:12] if plan.calibration else "")
        origin = _Origin(source.name, source.digest, source.dim, str(source.info.get("modality", "")),
                         {"preprocess": source.info.get("preprocess")})
        return fs.namespace(origin, {**source.variant, "compact": plan.describe()}), fitted


def _sample(source: Namespace, most: int) -> np.ndarray:
    """float32 ``(k, D)``: a seeded sample of at most ``most`` served vectors, read shard by shard."""
    with source._lock():
        records = source._records_or_raise()
        served, _ = source._events(records)
    if len(served) < 2:
        raise UsageError(f"{source.key} holds {len(served)} vector(s); a calibration needs at least 2 "
                         "(extract more items first)")
    where = list(served.values())
    pick = range(len(where)) if len(where) <= most else np.sort(
        np.random.default_rng(SEED).choice(len(where), most, replace=False))
    by_shard: dict[int, list[int]] = {}
    for k in pick:
        n, row, _ = where[k]
        by_shard.setdefault(n, []).append(row)
    parts = [_vectors(source, records[n])[np.sort(rows)] for n, rows in sorted(by_shard.items())]
    return np.concatenate(parts).astype(np.float32, copy=False)


def _vectors(source: Namespace, record: dict[str, Any], table: Any = None) -> np.ndarray:
    """float32 ``(rows, D)`` of a float shard, checked against its commit record first."""
    why = source._check(record["shard"], record, deep=True)
    if why:
        raise StoreError(f"shard {record['shard']} of {source.path}: {why}; a rerun of extract sets it aside and "
                         "recomputes its items, then compact again")
    table = table if table is not None else source._shard_table(record["shard"])
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, source.width)


def _convert(source: Namespace, target: Namespace, rule: Compact, record: dict[str, Any], rows: list[tuple[int, str]],
             batch_rows: int, report: CompactReport, progress: Callable[[int], None] | None) -> None:
    """Convert the rows ``(row, id)`` of one float shard, committing at most ``batch_rows`` at a time."""
    table = source._shard_table(record["shard"])
    vectors = _vectors(source, record, table)
    names = table.column_names
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist() if "source" in names else [""] * len(ids)
    fps = table.column("content").to_pylist() if "content" in names else [None] * len(ids)
    for at in range(0, len(rows), batch_rows):
        part = [r for r, _ in rows[at:at + batch_rows]]
        contents = [fps[r] for r in part]
        target.commit([ids[r] for r in part], rule.apply(vectors[part]), [sources[r] or "" for r in part],
                      stats={"origin": record["shard"], "converted": len(part), "compact": target.tag},
                      contents=contents if any(contents) else None)
        report.converted += len(part)
        report.shards += 1
        if progress is not None:
            progress(len(part))
