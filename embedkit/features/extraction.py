"""Extraction at scale: source -> skip what is stored -> encode -> commit shards, exactly once.

Shards are consecutive runs of ``shard_size`` source items (cached and duplicate items
included), so a rerun after a crash recomputes the interrupted shard with exactly the batches
of an uninterrupted run: the final store is the same, bit for bit. Within a shard only the
missing items are encoded (decoding / tokenising in parallel workers overlapped with ONNX
Runtime, see :mod:`embedkit.encoder`); each shard is committed atomically with the failure
records of its items. Planning happens here for every engine; the shard worker that encodes and
commits a planned shard is :func:`embedkit.features.shards.compute_shard`, run in this process by the
local engine and in Ray actors by :mod:`embedkit.features.ray`.

With user ids (``id_column``) each row's content fingerprint is stored beside its id: a rerun
recomputes an id whose content changed (``changed`` in the report; the new vector is served),
and two rows of one run with one id and different contents are a conflict: both rows count as
failed, with an ``id_conflict`` failure record, and the id serves no vector until the input is
fixed and extracted again.

Variants (:mod:`embedkit.features.variants`): with ``long="chunk"`` the vectors go into the chunk
variant's namespace (its overlap and window count in its name), never beside truncated ones;
with ``precision`` / ``dimensions`` the float namespace is extracted as always, then its compact
namespace derived from it (:func:`embedkit.features.compaction.compact_namespace`). With
``long="chunk", chunk_rows=True`` every window is also stored as a row of its own in the chunk
variant's per-chunk rows namespace (:mod:`embedkit.features.chunk_rows`), committed by the same
shard jobs just before their pooled vectors; an item counts as stored when both namespaces hold it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ..encoder import encoder_for
from ..encoders.compact import Compact
from ..errors import UsageError
from ..fs.outputs import check_output
from ..inputs.sources import Item, iter_items
from ..inputs.windows import long_policy
from ..models.resolve import resolve
from . import chunk_rows as rows_of
from . import variants
from .compaction import compact_namespace, rows_for
from .ray import RayRunner
from .run import ExtractReport, Run, advance, settle
from .shards import ShardJob, compute_shard
from .store import FeatureStore, Namespace

logger = logging.getLogger(__name__)

SHARD_SIZE = {"text": 4096, "image": 512}


class _Shard:
    def __init__(self) -> None:
        self.items: list[Item] = []  # to compute
        self.contents: list[str | None] = []  # their content fingerprints (user ids only)
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
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    precision: str = "float32",
    dimensions: int | None = None,
    calibration_rows: int | None = None,
    chunk_rows: bool = False,
    **options: Any,
) -> ExtractReport:
    """Extract features of every item of ``source`` into a :class:`FeatureStore`.

    Args:
        source: folder, glob, ``.txt`` / table file, or an iterable (see
            :func:`embedkit.inputs.sources.iter_items`).
        backbone: registered name, spec, artifact folder or digest.
        store: the feature store folder.
        column, id_column: the table columns of the payload and of user ids.
        shard_size: source items per shard (default 4096 texts / 512 images); keep it
            between a run and its reruns for bit-identical results.
        verify: check every committed shard's checksum first; damaged ones are set aside
            and their items recomputed.
        models: the model store (default ``$EMBEDKIT_HOME``, else the user cache folder).
        engine: ``local`` (this process) or ``ray`` (Ray Data actors, see :mod:`embedkit.features.ray`);
            both run the same shard worker (:func:`embedkit.features.shards.compute_shard`).
        address, workers, cpus_per_worker, gpus_per_worker: the Ray engine's cluster address
            (default: a private local Ray on 127.0.0.1), actors (encoders), and resources per actor.
        precision, dimensions: besides the float32 vectors, derive a compact namespace (``int8`` |
            ``uint8`` | ``binary`` | ``float32``; ``dimensions`` kept, None: all): see
            :func:`embedkit.compact_features`, whose report is ``report.compact``. Default: none.
        calibration_rows: int8 / uint8, the compact namespace's first run: fit the ranges on at
            most this many stored vectors (a seeded sample; None: 100,000); refused with another precision.
        chunk_rows: with ``long="chunk"``, also store every window as a row of its own (id
            ``<item id>#<chunk>``; parent id, chunk number, token and character spans, float32
            ``(D,)`` vector: :class:`~embedkit.features.chunk_rows.ChunkRows`) in the variant
            ``<digest>.chunk-o<O>-m<M>.rows``, read with ``FeatureStore.chunk_rows`` or
            ``load(..., long="chunk", chunk_rows=True)``; ``report.chunk_rows`` counts the rows
            committed, ``report.rows_namespace`` names the folder. Local engine only.
        options: encoder options (device, threads, batch_tokens, batch_size, workers, ...);
            text ``long="chunk"`` (with ``chunk_overlap``, ``max_chunks``) writes into the chunk
            variant's namespace.

    Raises:
        OutputError: ``store`` is refused before any work: its folder is missing, it is, holds
            or lies inside ``source``, or it exists and is not a feature store (nor empty).
        ValueError: an unknown ``engine``, or Ray options with the local engine.
        UsageError: (a ValueError) an unknown ``precision``, ``dimensions`` above the backbone's,
            bad long-text options, ``chunk_rows`` without ``long="chunk"`` (or with engine ``ray``);
            refused before any work.
        RayClusterError: (engine ``ray``) the cluster at ``address`` cannot be reached.
        RayResourcesError: (engine ``ray``) ``cpus_per_worker`` / ``gpus_per_worker`` fit no node.
        IncompleteExtractionError: (engine ``ray``) planned shards are neither committed nor failed.
    """

    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):  # 0 is refused, not "default"
        raise ValueError(f"shard_size must be a positive int or None, got {shard_size!r}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    ray_options = {"address": address, "workers": workers, "cpus_per_worker": cpus_per_worker,
                   "gpus_per_worker": gpus_per_worker}
    if engine == "local" and any(v is not None for v in ray_options.values()):
        given = ", ".join(k for k, v in ray_options.items() if v is not None)
        raise ValueError(f"{given} apply to engine='ray' only")
    variants.Wanted(precision, dimensions)  # UsageError before any work
    _check_chunk_rows(chunk_rows, options, engine)
    calibration_rows = rows_for(precision, calibration_rows)
    check_output(store, "feature-store", inputs=[source])  # before any work: not an input, not a foreign folder
    start = time.perf_counter()
    artifact = resolve(backbone, models)
    Compact(dimensions).output_dim(artifact.dim)  # dimensions above the backbone's: refused before any work
    if dimensions == artifact.dim:
        dimensions = None  # every dimension: the plain vectors (float32: no compact namespace), no d<D> twin
    variant = variants.long_variant(artifact, options)
    if not chunk_rows and options.get("long") == "chunk" and FeatureStore(store).holds(artifact, {**variant, "rows": True}):
        # the store keeps per-chunk rows of this variant: they follow the pooled vectors (a text whose
        # content changed gets its new windows), else search would answer with stale passages
        if engine != "local":
            raise UsageError(f"{store} keeps per-chunk rows of {artifact.name}'s chunked texts, which the Ray engine "
                             "cannot update (stale passages would be served): extract with engine='local'")
        logger.warning("%s keeps per-chunk rows of these texts: updating them too (chunk_rows=True)", store)
        chunk_rows = True
    if engine == "ray":
        runner: Any = RayRunner(artifact, store, options, models=models, **ray_options)
    else:
        runner = _LocalRunner(encoder_for(artifact, **options))
    namespace = FeatureStore(store).namespace(artifact, variant)
    namespace.check_writable()  # a read-only or full store fails before any compute
    rows = FeatureStore(store).namespace(artifact, {**variant, "rows": True}) if chunk_rows else None
    if rows is not None:
        rows.check_writable()
    _refuse_unchecked_truncations(namespace, artifact, options)
    report = ExtractReport(backbone=artifact.name, digest=artifact.digest, namespace=str(namespace.path), engine=engine,
                           rows_namespace=str(rows.path) if rows is not None else "")
    if verify:
        problems = [(ns, ns.verify(deep=True)) for ns in (namespace, rows) if ns is not None]
        for ns, found in problems:
            ns.quarantine(found)
        report.quarantined = sum(len(found) for _, found in problems)
    stored = namespace.stored()  # id -> content fingerprint, from earlier runs
    if rows is not None:  # stored only when its windows are too (a kill -9 may fall between the two commits)
        parents = rows_of.stored_parents(rows)
        stored = {item: fp for item, fp in stored.items() if parents.get(item) == fp}
        runner.rows = rows  # the local engine's (chunk_rows is refused with Ray)
    run = Run(report, progress, bool(id_column), artifact.modality)
    size = shard_size or SHARD_SIZE[artifact.modality]
    try:
        runner.start(namespace, run)
        _plan(source, artifact.modality, column, id_column, size, stored, run, runner)
        runner.close()
    finally:
        runner.stop()
    if precision != "float32" or dimensions is not None:
        report.compact = compact_namespace(FeatureStore(store), namespace, precision=precision, dimensions=dimensions,
                                           calibration_rows=calibration_rows).to_json()
    report.seconds = time.perf_counter() - start
    if report.changed:
        logger.info("%d ids had another content (or none recorded) in the store: recomputed", report.changed)
    logger.info("extract %s (%s): %s", artifact.name, artifact.digest[:12], report.summary())
    return report


def _check_chunk_rows(chunk_rows: Any, options: dict[str, Any], engine: str) -> None:
    """UsageError unless ``chunk_rows`` is a bool that may apply: with ``long="chunk"``, local engine."""
    if not isinstance(chunk_rows, bool):
        raise UsageError(f"chunk_rows must be True or False, got {chunk_rows!r}")
    if chunk_rows and options.get("long") != "chunk":
        raise UsageError(f"chunk_rows=True stores the windows of texts chunked by long='chunk'; long is "
                         f"{options.get('long') or 'truncate'!r}: add long='chunk'")
    if chunk_rows and engine != "local":
        raise UsageError("chunk_rows=True runs on engine='local' only (the Ray engine stores pooled vectors)")


def _refuse_unchecked_truncations(namespace: Namespace, artifact: Any, options: dict[str, Any]) -> None:
    """``long="error"`` on a namespace that holds vectors of truncated texts: UsageError, before any work.

    ``error`` and ``truncate`` share the plain namespace (a text within the window has one vector
    either way), and cached items are not tokenised again: a run under ``error`` would count the
    truncated vectors an earlier ``truncate`` run stored as ok, passing a policy they were never
    checked against. The commit records count the truncations of each shard (``stats.truncated``)."""
    if artifact.modality != "text":
        return
    try:
        policy = long_policy(options.get("long") or "truncate", options.get("truncate"))
    except ValueError:
        return  # the encoder refuses the contradiction with its own message
    if policy != "error":
        return
    truncated = sum(int((r.get("stats") or {}).get("truncated") or 0) for r in namespace.commits())
    if truncated:
        raise UsageError(
            f"{namespace.key} holds {truncated} vector(s) of texts longer than the backbone's window, truncated by "
            "earlier runs (long='truncate'); long='error' (--long error) would count them as ok without checking them (stored "
            "items are not embedded again), so it is refused on this store: extract with long='error' into "
            "another store, or keep long='truncate' here (its report counts truncated texts)")


def _plan(source: Any, modality: str, column: str | None, id_column: str | None, size: int,
          stored: dict[str, str], run: Run, runner: Any) -> None:
    """Stream the source into shards of ``size`` source items and hand each to ``runner``."""
    report = run.report
    shard = _Shard()
    for item in iter_items(source, modality, column, id_column):
        report.total += 1
        shard.size += 1
        fp = run.fingerprint(item)
        first = run.seen.setdefault(item.id, (fp, item.source)) if id_column else (None, "")
        if first[0] != fp:
            run.conflict(item, first[1])
        elif item.id in run.conflicted:
            run.count(item.id, ok=False)
        elif item.id in run.waiting:
            run.waiting[item.id] += 1
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
            run.waiting[item.id] = 0
        if shard.size >= size:
            _submit(shard, run, runner)
            shard = _Shard()
    _submit(shard, run, runner)


class _LocalRunner:
    """Runs each shard job in this process, as it is planned."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.rows: Namespace | None = None  # the per-chunk rows namespace (chunk_rows=True)

    def start(self, namespace: Namespace, run: Run) -> None:
        self.namespace, self.run = namespace, run

    def submit(self, job: ShardJob) -> None:
        outcome = compute_shard(job, self.encoder, self.namespace, rows=self.rows)
        self.run.report.chunk_rows += outcome.rows
        settle(job, outcome, self.run)

    def close(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _submit(shard: _Shard, run: Run, runner: Any) -> None:
    """Turn a planned shard into a job (ids that conflicted since they were queued fail here)."""
    keep = [n for n, item in enumerate(shard.items) if item.id not in run.conflicted]
    for n, item in enumerate(shard.items):  # an id that conflicted since it was queued: not embedded
        if item.id in run.conflicted:
            copies = 1 + run.waiting.pop(item.id, 0)
            run.count(item.id, ok=False, n=copies, tick=False)
            advance(run.progress, copies)
    items = [shard.items[n] for n in keep]
    if not items and not run.pending:
        return
    conflicts, run.pending = run.pending, []
    runner.submit(ShardJob(items, [shard.contents[n] for n in keep], conflicts, user_ids=run.user_ids))
