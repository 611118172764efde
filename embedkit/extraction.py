"""Extraction at scale: source -> skip what is stored -> encode -> commit shards, exactly once.

Shards are consecutive runs of ``shard_size`` source items (cached and duplicate items
included), so a rerun after a crash recomputes the interrupted shard with exactly the batches
of an uninterrupted run: the final store is the same, bit for bit. Within a shard only the
missing items are encoded (decoding / tokenising in parallel workers overlapped with ONNX
Runtime, see :mod:`embedkit.encoder`); each shard is committed atomically with the failure
records of its items.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .sources import Item, iter_items
from .store import FeatureStore, Namespace

logger = logging.getLogger(__name__)

SHARD_SIZE = {"text": 4096, "image": 512}


@dataclass
class ExtractReport:
    """What an extraction did; ``ok + failed == total`` always.

    ``ok`` counts every item whose embedding is in the store now: ``computed`` here,
    ``cached`` from earlier runs, and ``duplicates`` (content or id seen before in this run).
    """

    total: int = 0
    ok: int = 0
    failed: int = 0
    computed: int = 0
    cached: int = 0
    duplicates: int = 0
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
            f"{self.duplicates} duplicates), {self.failed} failed, {self.truncated} truncated; "
            f"{rate:.0f} items/s computed -> {self.namespace}"
        )


class _Shard:
    def __init__(self) -> None:
        self.items: list[Item] = []  # to compute
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
        models: the model store (default ``$EMBEDKIT_HOME`` or ``./models``).
        options: encoder options (device, threads, batch_tokens, batch_size, workers, ...).
    """
    from .encoder import encoder_for
    from .exporter import resolve

    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):  # 0 is refused, not "default"
        raise ValueError(f"shard_size must be a positive int or None, got {shard_size!r}")
    start = time.perf_counter()
    artifact = resolve(backbone, models)
    encoder = encoder_for(artifact, **options)
    namespace = FeatureStore(store).namespace(artifact)
    report = ExtractReport(backbone=artifact.name, digest=artifact.digest, namespace=str(namespace.path))
    if verify:
        problems = namespace.verify(deep=True)
        namespace.quarantine(problems)
        report.quarantined = len(problems)
    stored = namespace.done_ids()  # ids with an embedding from earlier runs
    done: set[str] = set()  # ... and from this run
    failed: set[str] = set()
    size = SHARD_SIZE[artifact.modality] if shard_size is None else shard_size
    shard = _Shard()
    for item in iter_items(source, artifact.modality, column, id_column):
        report.total += 1
        shard.size += 1
        if item.id in shard.waiting:
            shard.waiting[item.id] += 1
        elif item.id in stored:
            report.cached += 1
            report.ok += 1
            _tick(progress)
        elif item.id in done or item.id in failed:
            report.duplicates += 1
            if item.id in done:
                report.ok += 1
            else:
                report.failed += 1  # the same content already failed in this run
            _tick(progress)
        else:
            shard.items.append(item)
            shard.waiting[item.id] = 0
        if shard.size >= size:
            _flush(shard, encoder, namespace, report, done, failed, progress)
            shard = _Shard()
    _flush(shard, encoder, namespace, report, done, failed, progress)
    report.seconds = time.perf_counter() - start
    logger.info("extract %s (%s): %s", artifact.name, artifact.digest[:12], report.summary())
    return report


def _tick(progress: Callable[[int], None] | None, n: int = 1) -> None:
    if progress is not None and n:
        progress(n)


def _flush(shard: _Shard, encoder: Any, namespace: Namespace, report: ExtractReport,
           done: set[str], failed: set[str], progress: Callable[[int], None] | None) -> None:
    if not shard.items:
        return
    result = encoder.encode([item.payload for item in shard.items])
    ok = result.ok
    ids = [item.id for item, good in zip(shard.items, ok) if good]
    sources = [item.source for item, good in zip(shard.items, ok) if good]
    failures = []
    for error in result.errors:
        item = shard.items[error.index]
        failures.append({"id": item.id, "source": item.source, "stage": error.stage,
                         "code": error.code, "message": error.message})
        failed.add(item.id)
    vectors = result.vectors[ok] if ids else np.empty((0, namespace.dim), np.float32)
    runtime = encoder.runtime
    namespace.commit(ids, vectors, sources, failures, {
        "computed": len(ids), "failed": len(failures),
        # provenance: every runtime passed this artifact's gate, so shards may mix them
        "runtime": {"kind": type(runtime).__name__, "device": runtime.device, "providers": list(runtime.providers)},
    })
    done.update(ids)
    report.shards += 1
    report.computed += len(ids)
    report.ok += len(ids)
    report.failed += len(failures)
    report.truncated += int(getattr(result.stats, "truncated", 0))
    for item_id, copies in shard.waiting.items():
        report.duplicates += copies
        if item_id in failed:
            report.failed += copies
        else:
            report.ok += copies
    _tick(progress, len(shard.items) + sum(shard.waiting.values()))
