"""The Ray Data engine (``extract(..., engine="ray")``) and :class:`EmbedBatch` for Ray pipelines.

Ray schedules; embedkit's shard plan and commit records decide what is done. The driver plans
shard jobs exactly as the local engine does (:mod:`embedkit.features.extraction`), skips what the store
holds, and runs the rest on Ray Data: one actor per encoder (``ActorPoolStrategy``), each actor
running the shared shard worker (:func:`embedkit.features.shards.compute_shard`), which commits each job
to the store itself (a shared filesystem when the actors run on several machines). Ray's own
retries are bounded (``max_restarts`` / ``max_task_retries``) and Ray Data may drop a block whose
every attempt killed its worker: the driver then reconciles from the commit records, runs each
lost job item by item in fresh actors, and records an item that still kills its worker as a
``worker_crashed`` failure. Jobs are planned and run in windows, so the driver holds a bounded
number of items at a time. What bounds a run (retries and restarts, the stall guard, Ctrl-C) is
:mod:`embedkit.features.ray_guard`.

Without an address the engine starts a private Ray on this machine (:mod:`embedkit.features.ray_cluster`):
every process bound to 127.0.0.1, the dashboard and usage reporting off, and shut down after the
run (also on Ctrl-C). ``ray`` is imported on first use only: ``import embedkit`` never loads it.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import sys
import time
import warnings
from typing import Any

import numpy as np

from ..backbones.registry import register_plugin, registry
from ..encoder import encoder_for
from ..errors import IncompleteExtractionError, RayResourcesError
from ..models.resolve import resolve
from ..models.store import Artifact
from .ray_cluster import _ray, local_cluster
from .ray_guard import MAX_RESTARTS, MAX_TASK_RETRIES, STALL_S, ctrl_c_kept, read_guarded, restarts_for
from .run import settle
from .shards import ShardJob, ShardOutcome, committed_keys, compute_shard, crashed_outcome, outcome_from_record
from .store import FeatureStore

__all__ = ["MAX_RESTARTS", "MAX_TASK_RETRIES", "STALL_S", "EmbedBatch", "RayRunner", "local_cluster", "restarts_for"]

logger = logging.getLogger(__name__)

CLOCK_MARGIN_NS = 600 * 10**9  # 10 minutes
WINDOW_JOBS = 64  # shard jobs planned ahead per Ray Data run (bounds the driver's memory)


def _in_process_plugins() -> list[str]:
    """Modules registered with :func:`embedkit.register_plugin` in this process (actors register them too)."""

    reg = registry()
    names = []
    for name, info in reg.plugins.items():
        plugin = reg.pm.get_plugin(name)
        if info.distribution == "(in process)" and plugin is not None and hasattr(plugin, "__name__") \
                and isinstance(sys.modules.get(plugin.__name__), type(sys)):
            names.append(plugin.__name__)
    return names


def _register(modules: list[str]) -> None:
    from importlib import import_module

    for module in modules:
        try:
            register_plugin(import_module(module), module)
        except ImportError as exc:  # the backbone lookup that needs it says which name is unknown
            logger.warning("plugin module %s registered by the driver does not import here: %s", module, exc)


class _ShardActor:
    """One encoder per actor; runs shard jobs through the shared shard worker."""

    def __init__(self, artifact: str, store: str, options: dict[str, Any], plugins: list[str], since_ns: int,
                 variant: dict[str, Any] | None = None) -> None:

        _register(plugins)
        found = Artifact.open(artifact)
        self.encoder = encoder_for(found, **options)
        self.namespace = FeatureStore(store).namespace(found, variant)  # the driver's namespace (chunked or plain)
        self.done = committed_keys(self.namespace, since_ns)  # a restarted actor sees what its predecessor committed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, outcomes, errors = [], [], []
        for key, blob in zip(batch["key"], batch["job"]):
            job: ShardJob = pickle.loads(blob)
            try:
                outcome = compute_shard(job, self.encoder, self.namespace, self.done)
                outcomes.append(pickle.dumps(outcome))
                errors.append(b"")
            except Exception as exc:  # a store or model error is the run's, not Ray's to retry blindly
                outcomes.append(b"")
                errors.append(pickle.dumps(exc))
            keys.append(key)
        return {"key": np.array(keys, dtype=object), "outcome": np.array(outcomes, dtype=object),
                "error": np.array(errors, dtype=object)}


class RayRunner:
    """Runs the shard jobs of :func:`embedkit.extract` on Ray Data (see the module docstring).

    Args:
        artifact: the resolved artifact (its folder must be readable by every actor).
        store: the feature store folder (on a filesystem every actor shares).
        options: encoder options (device, threads, runtime, batch_size, workers, ...).
        address: a Ray cluster (``host:port``, ``auto``, ``ray://``); None starts a private local Ray.
        workers: actors, one encoder each (default: local CPUs / cluster CPUs per worker).
        cpus_per_worker, gpus_per_worker: Ray resources per actor (default CPUs: fractional
            locally so the actors and Ray Data's own tasks fit the machine; GPUs: 0).
        stall_s: a pass with no block returned and nothing committed for this many seconds is
            abandoned and its items reported missing (default ``$EMBEDKIT_RAY_STALL_S``, else 600).
    """

    def __init__(self, artifact: Any, store: Any, options: dict[str, Any], models: Any = None,
                 address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
                 gpus_per_worker: float | None = None, window: int = WINDOW_JOBS,
                 stall_s: float | None = None) -> None:
        for name, value, zero_ok in (("workers", workers, False), ("cpus_per_worker", cpus_per_worker, False),
                                     ("gpus_per_worker", gpus_per_worker, True)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and not zero_ok) or (name == "workers" and not isinstance(value, int)):
                wanted = {"workers": "a positive int", "cpus_per_worker": "a positive number",
                          "gpus_per_worker": "a number >= 0"}[name]
                raise ValueError(f"{name} must be {wanted} or None, got {value!r}")
        _ray()  # a missing extra is said before any work
        self.artifact, self.store, self.options = artifact, str(store), dict(options)
        self.address, self.workers, self.window = address, workers, window
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker or 0
        self.jobs: list[ShardJob] = []
        self.missing = 0
        self.missing_sources: list[str] = []
        self.stalled = False
        self.stall_s = float(os.environ.get("EMBEDKIT_RAY_STALL_S", STALL_S) if stall_s is None else stall_s)
        self._cluster: Any = None

    # -- the runner protocol of embedkit.features.extraction ---------------------------------------------
    def start(self, namespace: Any, run: Any) -> None:
        self.namespace, self.run = namespace, run
        # this run's commit records only (a failed item is tried again by a rerun, as locally);
        # the margin covers clocks of other nodes a little behind the driver's
        self.since_ns = time.time_ns() - CLOCK_MARGIN_NS
        self._cluster = local_cluster(address=self.address)
        self._cluster.__enter__()
        self._size()

    def submit(self, job: ShardJob) -> None:
        self.jobs.append(job)
        if len(self.jobs) >= self.window:
            self._run_window()

    def close(self) -> None:
        self._run_window()
        if self.missing:
            self.run.report.missing = self.missing
            shown = ", ".join(self.missing_sources[:10]) + (" ..." if len(self.missing_sources) > 10 else "")
            logger.warning("%d item(s) neither stored nor recorded as failed%s: %s", self.missing,
                           f" (no progress for {self.stall_s:.0f} s)" if self.stalled else " (workers lost)", shown)
            raise IncompleteExtractionError(self.run.report, self.missing,
                                            f"no progress for {self.stall_s:.0f} s" if self.stalled else "workers lost")

    def stop(self) -> None:
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            cluster.__exit__(None, None, None)  # shuts Ray down if this run started it

    # -- running jobs ---------------------------------------------------------------------------
    def _size(self) -> None:
        ray = _ray()
        total = float(ray.cluster_resources().get("CPU", 1))
        if self.cpus is None:  # fractional: Ray Data's own tasks must still fit beside the actors
            self.cpus = max(0.25, min(1.0, (total - 0.25) / (self.workers or max(1, int(total)))))
        if self.workers is None:
            self.workers = max(1, int(total // self.cpus)) if self.address else max(1, int(total))
        self.options.setdefault("threads", max(1, int(self.cpus)))
        self._check_fits(ray)
        if self.gpus and self.options.get("device", "cpu") == "cpu":
            self.options["device"] = "cuda"
        logger.info("Ray engine: %d actor(s), %.2f CPU and %.2f GPU each, of %.1f CPUs", self.workers, self.cpus,
                    self.gpus, total)

    def _check_fits(self, ray: Any) -> None:
        """Refuse an actor that no alive node can hold: Ray would wait for one forever, silently."""

        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        for resource, wanted in (("CPU", self.cpus), ("GPU", self.gpus)):
            largest = max((float(n.get(resource, 0)) for n in nodes), default=0.0)
            if wanted and wanted > largest + 1e-9:
                raise RayResourcesError(resource, wanted, largest)

    def _execute(self, jobs: list[ShardJob]) -> dict[str, ShardOutcome]:
        """One Ray Data run over ``jobs``; outcomes of the jobs whose block came back."""
        ray = _ray()
        if not jobs:
            return {}

        ctx = ray.data.DataContext.get_current()
        saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
        ctx.max_errored_blocks = -1  # a block lost to crashes is reconciled from the commit records
        ctx.enable_progress_bars = False
        quiet = logging.getLogger("ray.data")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # its tracebacks of crashed workers: reconciled and reported here
        rows = [{"key": j.key, "job": pickle.dumps(j)} for j in jobs]
        try:
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            with warnings.catch_warnings():
                # Ray 2.60 takes max_restarts / max_task_retries only as (deprecated) extra remote
                # args; left out, Ray Data sets both to -1: retried forever (pyproject pins < 2.64)
                warnings.simplefilter("ignore", DeprecationWarning)
                out = ds.map_batches(
                    _ShardActor, batch_size=1, batch_format="numpy",
                    fn_constructor_kwargs={"artifact": str(self.artifact.path), "store": self.store,
                                           "options": self.options, "plugins": _in_process_plugins(),
                                           "since_ns": self.since_ns, "variant": self.namespace.variant},
                    compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(jobs)),
                                                       max_tasks_in_flight_per_actor=1),
                    num_cpus=self.cpus, num_gpus=self.gpus,
                    max_restarts=restarts_for(len(jobs)), max_task_retries=MAX_TASK_RETRIES,
                )
            found = self._collect(out, len(jobs))
        finally:
            ctx.max_errored_blocks, ctx.enable_progress_bars = saved
            quiet.setLevel(level)
        return found

    def _collect(self, out: Any, planned: int) -> dict[str, ShardOutcome]:
        """The outcomes of one pass, read under the stall guard (:func:`.ray_guard.read_guarded`);
        a pass abandoned by it sets ``self.stalled`` (its unfinished items are reported missing)."""
        found: dict[str, ShardOutcome] = {}

        def take(batch: dict[str, np.ndarray]) -> None:
            for key, outcome, error in zip(batch["key"], batch["outcome"], batch["error"]):
                if error:
                    raise pickle.loads(error)
                found[key] = pickle.loads(outcome)

        if not read_guarded(lambda: out.iter_batches(batch_size=None, batch_format="numpy"), self._commits,
                            self.stall_s, take):
            self.stalled = True
            logger.warning("Ray pass of %d shard job(s): no block returned and nothing committed for %.0f s: "
                           "abandoned (its unfinished items are reported missing)", planned, self.stall_s)
        return found

    def _commits(self) -> int:
        try:
            return len(os.listdir(self.namespace.path / "commits"))
        except OSError:
            return 0

    def _run_window(self) -> None:
        jobs, self.jobs = self.jobs, []
        if not jobs:
            return
        if self.stalled:  # the cluster stopped making progress: nothing more is started
            self._lose(jobs)
            return
        with ctrl_c_kept():
            outcomes = self._execute(jobs)
            done = committed_keys(self.namespace, self.since_ns)  # jobs committed whose answer was lost with their worker
            for job in jobs:
                if job.key not in outcomes and job.key in done:
                    outcomes[job.key] = outcome_from_record(job, done[job.key])
            lost = [job for job in jobs if job.key not in outcomes]
            if lost and not self.stalled:
                logger.warning("%d shard job(s) lost their worker on every attempt: running them item by item", len(lost))
                self._isolate(lost, outcomes)
        for job in jobs:
            if job.key in outcomes:
                settle(job, outcomes[job.key], self.run)
            else:
                self._lose([job])

    def _lose(self, jobs: list[ShardJob]) -> None:
        for job in jobs:
            self.missing += len(job.items)
            self.missing_sources += [item.source for item in job.items]

    def _isolate(self, lost: list[ShardJob], outcomes: dict[str, ShardOutcome]) -> None:
        """Run the items of ``lost`` jobs one per job in fresh actors; record items that still crash."""
        ray = _ray()
        singles = {job.key: [ShardJob([item], [content], user_ids=job.user_ids)
                             for item, content in zip(job.items, job.contents)] for job in lost}
        found = self._execute([s for subs in singles.values() for s in subs])
        done = committed_keys(self.namespace, self.since_ns)
        alive = any(node.get("Alive") for node in ray.nodes())
        attempts = 2 * (1 + MAX_TASK_RETRIES)
        for job in lost:
            subs = singles[job.key]
            results = [found.get(s.key) or (outcome_from_record(s, done[s.key]) if s.key in done else None)
                       for s in subs]
            crashed = [s.items[0] for s, r in zip(subs, results) if r is None]
            if crashed and (not alive or self.stalled):
                continue  # the cluster went away or stopped making progress: missing, not the items' fault
            crashed_outcome(job, self.namespace, crashed, attempts)
            failures = [f for r in results if r is not None for f in r.failures]
            failures += [{"id": item.id, "code": "worker_crashed"} for item in crashed]
            outcomes[job.key] = ShardOutcome([r is not None and r.ok[0] for r in results], failures,
                                             sum(r.truncated for r in results if r is not None))
            if crashed:
                logger.warning("%d item(s) killed their worker on each of %d attempts: recorded as worker_crashed "
                               "(%s)", len(crashed), attempts, ", ".join(i.source for i in crashed[:5]))


class EmbedBatch:
    """A callable class for ``ray.data.Dataset.map_batches``: adds ``embedding``, ``ok``, ``error_code``.

    ``ds.map_batches(EmbedBatch, fn_constructor_kwargs={"backbone": "minilm-l6", "column": "text"},
    concurrency=2, batch_size=256)``. ``embedding`` is float32 ``(N, dim)`` (NaN rows where
    ``ok`` is False), ``error_code`` the reason (``""`` when ok). A bad row never raises: it
    gets ``ok=False`` and its code; the other rows of its batch are embedded.

    Args:
        backbone: registered name, artifact folder or digest (resolved once per actor).
        column: the payload column (texts, or image paths / bytes for image backbones).
        models: the model store (default ``$EMBEDKIT_HOME``, else the user cache folder).
        options: encoder options (device, threads, runtime, batch_tokens, batch_size, ...).
    """

    def __init__(self, backbone: str = "minilm-l6", column: str = "text", models: str | None = None,
                 **options: Any) -> None:

        self.column = column
        self.artifact = resolve(backbone, models)
        self.encoder = encoder_for(self.artifact, **options)

    def __call__(self, batch: Any) -> Any:
        if type(batch).__module__.startswith("pyarrow"):  # batch_format="pyarrow": answered as pandas
            batch = batch.to_pandas()
        if isinstance(batch, dict):
            out = dict(batch)
            payloads = list(batch[self.column]) if self.column in batch else None
        else:  # pandas
            out = batch.copy()
            payloads = list(batch[self.column]) if self.column in batch.columns else None
        if payloads is None:
            raise KeyError(f"EmbedBatch: the batch has no column {self.column!r}; give column=")
        payloads = [p.item() if isinstance(p, np.generic) else p for p in payloads]
        vectors = np.full((len(payloads), self.artifact.dim), np.nan, dtype=np.float32)
        ok = np.zeros(len(payloads), dtype=bool)
        codes = np.array([""] * len(payloads), dtype=object)
        try:
            result = self.encoder.encode(payloads)
            vectors, ok = result.vectors.astype(np.float32), np.asarray(result.ok, dtype=bool)
            for error in result.errors:
                codes[error.index] = error.code
        except Exception as exc:  # noqa: BLE001 - a row the encoder cannot take: retried one by one
            logger.warning("EmbedBatch: batch failed (%s: %s); embedding its rows one by one", type(exc).__name__, exc)
            for n, payload in enumerate(payloads):
                try:
                    one = self.encoder.encode([payload])
                    vectors[n], ok[n] = one.vectors[0], bool(one.ok[0])
                    codes[n] = one.errors[0].code if one.errors else ""
                except Exception as row_exc:  # noqa: BLE001
                    codes[n] = "encode_failed"
                    logger.warning("EmbedBatch: row %d: %s: %s", n, type(row_exc).__name__, row_exc)
        # a DataFrame column takes one object per row, a numpy batch the (N, dim) array
        out["embedding"] = vectors if isinstance(batch, dict) else list(vectors)
        out["ok"], out["error_code"] = ok, codes
        return out
