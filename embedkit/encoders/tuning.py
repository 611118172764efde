"""Runtime and precision selection by measurement: which runtime, in which precision, is fastest here.

``tune(artifact, device)`` runs a real encoder end to end with each candidate over the same items
(:func:`~embedkit.runtimes.table.candidates_for`: ONNX Runtime, torch, OpenVINO in fp32; OpenVINO bf16 and torch under bf16
autocast on a CPU with bf16 in hardware; the artifact's int8 variants that exist). Each candidate
is gated against the artifact's own ONNX Runtime CPU output, on the padded probe batches and on
the timed sample (:func:`~embedkit.runtimes.table.limits_for`: :data:`~embedkit.models.probes.LIMITS` for fp32 runtimes,
:data:`~embedkit.models.probes.BF16_LIMITS` (min cosine 0.9999) for reduced precision,
:data:`~embedkit.models.probes.FP16_LIMITS` for fp16 variants). The fastest that passes is recorded in
``<model store>/tuning/<digest>.json`` under a key naming the device (CPU model and cores, or
the GPU's name), with its precision and the CPU's matrix-engine flags. Encoders built with
``runtime="auto"`` (the default) use the recorded choice (:mod:`embedkit.runtimes.select`); on
CUDA the route (:func:`embedkit.encoder_for`) measures an artifact with no record once, as an
explicit logged step, since the answer differs by network (MiniLM: ONNX Runtime faster;
ResNet-50: torch faster, per DEVICE.md). On CPU the answer differs by machine (OpenVINO bf16
1.5x ONNX Runtime fp32 on a Zen 5 with AVX-512 BF16, 3x slower than it on a Xeon without AMX), so
the route measures there too on first use, within a time budget (:func:`first_use`):
a short sample, candidates cut short once they are slower than the best by :data:`MARGIN`,
the same gate. ``EMBEDKIT_TUNE=0`` (or ``tune=False``) turns that off: ONNX Runtime without a record.
"""
from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import EmbedkitError
from ..inputs.image import probe_images
from ..inputs.samples import load_split
from ..models.probes import cosine, onnx_runner, passes, probes_for
from ..models.resolve import resolve
from ..models.store import Artifact, ModelStore
from ..runtimes import records
from ..runtimes.candidates import candidates_for, limits_for
from ..runtimes.cpu import describe
from ..runtimes.records import device_key
from .image import ImageEncoder
from .text import TextEncoder

logger = logging.getLogger(__name__)


# First use (no record for this artifact on this device): the whole measurement's time budget, in
# seconds; the share each candidate is timed for; the sample; and the margin by which a candidate
# already slower than the best passing one is cut short (it cannot win; 1.5 leaves room for the
# noise of a shared machine).
FIRST_USE_BUDGET = 20.0
FIRST_USE_SECONDS = 1.0
FIRST_USE_TEXTS = 128
MARGIN = 1.5
# The thorough ``tune`` keeps timing every candidate for ``seconds``, but stops one after its
# first pass once it is this much slower than the best (a bf16 path emulated without hardware
# support ran 16x slower than fp32: minutes of timing to learn nothing).
THOROUGH_MARGIN = 3.0
# First use leaves ONNX Runtime (the default) only for a candidate at least this much faster: on a
# shared machine a second's timing moves by 10-20%, while what is worth switching for (bf16 on AMX
# or AVX-512 BF16: 1.5x and more) is far above it.
SWITCH = 1.15
TUNE_ENV = "EMBEDKIT_TUNE"


def first_use_enabled(tune: bool | None = None) -> bool:
    """Whether the route measures an artifact with no record on first use: ``tune`` if given,
    else ``EMBEDKIT_TUNE`` (``0``, ``false``, ``no``, ``off`` turn it off; default on)."""
    if tune is not None:
        return bool(tune)
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def default_items(artifact: Artifact) -> list[Any]:
    """What to time when the user gives nothing: 1,000 shipped Banking77 sentences (real lengths),
    or the synthetic probe images of varied sizes (decoding included)."""
    if artifact.modality == "text":
        return load_split("train")[0][:1000]
    return list(probe_images()) * 8


def _encoder(artifact: Artifact, **options: Any) -> TextEncoder | ImageEncoder:
    """A real encoder with one explicit runtime (``options`` as :func:`embedkit.encoder_for` takes them)."""
    cls = ImageEncoder if artifact.modality == "image" else TextEncoder
    return cls(artifact, **{k: v for k, v in options.items() if v is not None})


def first_use_items(artifact: Artifact) -> list[Any]:
    """The first-use sample: 128 shipped Banking77 sentences, or the 9 probe images twice."""
    if artifact.modality == "text":
        return load_split("train")[0][:FIRST_USE_TEXTS]
    return list(probe_images()) * 2


def _quick_order(names: tuple[str, ...]) -> tuple[str, ...]:
    """First-use order: ONNX Runtime first (the reference, and the best to beat from the start),
    then the runtimes cheap to start (OpenVINO, int8 variants), torch (imports torch, builds the
    module) last, so a spent budget leaves out the least likely winners."""
    rank = {"onnxruntime": 0, "openvino-bf16": 1, "openvino": 2, "torch-bf16": 4, "torch": 5}
    return tuple(sorted(names, key=lambda n: rank.get(n, 3)))


def _rate(encoder: Any, items: list[Any], seconds: float, chunk: int | None = None, passes: int = 2,
          floor: float | None = None, deadline: float | None = None) -> tuple[float, Any, str | None]:
    """Items/s of the encoder end to end (tokenising or decoding included), after a warm-up; the
    first pass's rows (:class:`~embedkit.encoder.Embeddings`' ``ok`` and ``vectors``, for the gate
    on the sample; fewer rows when cut short); and why it was cut short, or None.

    Items go in ``chunk``s (default: the whole sample per call), at least ``passes`` passes and
    until ``seconds``; timing stops early after a chunk once the rate so far is below ``floor``
    (slower than the best by the margin: it cannot be chosen, so its gate on the sample may see
    fewer rows) or, after one whole pass (the whole sample gated, as it may be chosen),
    ``deadline`` (``time.perf_counter()``) has passed.
    """
    chunk = chunk or len(items)
    whole = chunk >= len(items)
    encoder.encode(items[: max(1, len(items) // 4 if whole else min(chunk, 16))])  # allocator, compilation
    done, elapsed, rounds, first, cut = 0, 0.0, 0, [], None
    while cut is None and (rounds < passes or elapsed < seconds):
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            t = time.perf_counter()
            got = encoder.encode(part)
            elapsed += time.perf_counter() - t
            done += len(part)
            if rounds == 0:
                first.append(got)
            if floor is not None and done / elapsed < floor:
                cut = "slower than the best by more than the margin"
            elif deadline is not None and rounds >= 1 and time.perf_counter() > deadline:
                cut = "time budget spent"
            if cut is not None:
                break
        rounds += 1
    rows = SimpleNamespace(ok=np.concatenate([np.asarray(g.ok, bool) for g in first]),
                           vectors=np.concatenate([g.vectors for g in first]))
    return done / elapsed, rows, cut


def _memo(run: Any) -> Any:
    """``run`` remembering its outputs by the feeds' bytes: the probes' reference is computed once
    for all candidates (the gate is unchanged; on 2 cores this halves its cost)."""
    seen: dict[tuple[Any, ...], Any] = {}

    def cached(feeds: dict[str, np.ndarray]) -> Any:
        key = tuple((k, v.shape, str(v.dtype), v.tobytes()) for k, v in sorted(feeds.items()))
        if key not in seen:
            seen[key] = run(feeds)
        return seen[key]

    return cached


def _sample_gate(got: Any, reference: Any) -> dict[str, Any]:
    """Cosine of a candidate's features to the reference's on the sample (items both embedded;
    the first ``len(got.ok)`` items when the candidate's timing was cut short)."""
    n = len(got.ok)
    reference = SimpleNamespace(ok=np.asarray(reference.ok, bool)[:n], vectors=reference.vectors[:n])
    both = np.asarray(got.ok, bool) & np.asarray(reference.ok, bool)
    if not both.any():
        return {"compared": 0, "min_cosine": float("nan"), "mean_cosine": float("nan")}
    cos = cosine(got.vectors[both], reference.vectors[both])
    return {"compared": int(both.sum()), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "failed_differently": int((np.asarray(got.ok, bool) != np.asarray(reference.ok, bool)).sum())}


def machine(device: str) -> dict[str, Any]:
    """What the record says about the hardware: the CPU's model and matrix-engine flags, and
    OpenVINO's view of it (``OPTIMIZATION_CAPABILITIES``, its default inference precision) when installed."""
    info: dict[str, Any] = {"cpu": describe()}
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino"] = {"version": ov.__version__,
                            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                            "default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))}
    except Exception:  # noqa: BLE001 - openvino absent: the record simply lacks it
        pass
    return info


def tune(artifact: Artifact | str, device: str = "cpu", items: list[Any] | None = None, seconds: float = 2.0,
         runtimes: tuple[str, ...] | None = None, threads: int | None = None,
         store: ModelStore | str | None = None, progress: Any = None, budget: float | None = None,
         **options: Any) -> dict[str, Any]:
    """Measure each runtime on this device, gate it against fp32, record the fastest that passes.

    Each candidate (default: :func:`~embedkit.runtimes.table.candidates_for`) drives a real encoder over ``items``
    (default: :func:`default_items`; pass a sample of your own data for your lengths and sizes)
    end to end, as extraction will. ``options`` go to the encoder (e.g. ``batch_size``,
    ``batch_tokens``). The gate (:func:`~embedkit.runtimes.table.limits_for`) applies twice: on the padded probe batches
    against the artifact's ONNX Runtime CPU output, and on the sample against ONNX Runtime's
    features of the same items (min cosine). Returns the record, also written to the model
    store: ``choice``, its ``precision``, ``device``, ``machine`` (CPU model, matrix-engine flags,
    usable cores, OpenVINO's capabilities), ``mode``, ``seconds_spent`` and per candidate
    ``items_per_s``, ``precision``, ``parity``, ``sample``, ``limits`` and ``passes`` (or
    ``error`` when it could not run here; ``cut_short`` when its timing stopped early;
    ``skipped`` when the budget was spent before it). A candidate that is :data:`THOROUGH_MARGIN`
    times slower than the best after a pass stops being timed. ``progress(done, total)`` is
    called after each candidate.

    ``budget`` (seconds) is the first-use mode (:func:`first_use`): the items default to
    :func:`first_use_items`, ONNX Runtime goes first and torch last, each candidate is timed in
    chunks for ``seconds`` (one pass at least) and cut short once :data:`MARGIN` times slower
    than the best so far, and no candidate starts after the budget is spent; ONNX Runtime stays
    the choice unless a passing candidate is :data:`SWITCH` (1.15x) faster. The gate is the same.

    Raises:
        EmbedkitError: no candidate ran correctly (each one's reason in the message).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    started = time.perf_counter()
    deadline = None if budget is None else started + budget
    artifact = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    if items is None:
        items = first_use_items(artifact) if budget is not None else default_items(artifact)
    items = list(items)
    runtimes = tuple(runtimes or candidates_for(device, artifact))
    if budget is not None:
        runtimes = _quick_order(runtimes)
    chunk = None if budget is None else max(1, min(64, len(items) // 4 or 1))
    margin = THOROUGH_MARGIN if budget is None else MARGIN
    probes = probes_for(artifact)
    reference = _memo(onnx_runner(artifact.onnx_path, probes.rank))
    # The sample's reference features: the artifact itself on ONNX Runtime's CPU provider.
    base = _encoder(artifact, device="cpu", threads=threads, runtime="onnxruntime", **options)
    quick_base = budget is not None and device == "cpu" and "onnxruntime" in runtimes
    if quick_base:  # first use: the reference pass (warmed up, in the same chunks) is ONNX Runtime's timed pass
        base_rate, expected, _ = _rate(base, items, 0.0, chunk=chunk, passes=1)
    else:
        expected = base.encode(items)
    candidates: dict[str, dict[str, Any]] = {}
    best = 0.0  # the fastest passing candidate so far, items/s
    for name in runtimes:
        limits = limits_for(artifact, name)
        if deadline is not None and time.perf_counter() > deadline and candidates:
            row: dict[str, Any] = {"skipped": f"the {budget:g}s budget was spent before it", "passes": False,
                                   "limits": limits}
        else:
            try:
                encoder = base if name == "onnxruntime" and device == "cpu" else _encoder(
                    artifact, device=device, threads=threads, runtime=name, **options)
                rt = encoder.runtime
                parity = probes.compare(rt.run, reference, "onnxruntime-cpu", limits)
                if quick_base and encoder is base:
                    rate, last, cut = base_rate, expected, None
                else:
                    rate, last, cut = _rate(encoder, items, seconds, chunk=chunk, passes=2 if budget is None else 1,
                                            floor=best / margin if best else None, deadline=deadline)
                sample = _sample_gate(last, expected)
                ok = passes(parity, limits) and sample["min_cosine"] >= limits["min_cosine"]
                row = {"items_per_s": rate, "precision": rt.precision, "parity": parity, "sample": sample,
                       "limits": limits, "passes": bool(ok), "providers": list(rt.providers)}
                if cut is not None:
                    row["cut_short"] = cut
                if hasattr(rt, "compile_seconds"):
                    row["compile_seconds"] = round(rt.compile_seconds, 3)
                if ok:
                    best = max(best, rate)
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run here is recorded, not fatal
                row = {"error": f"{type(exc).__name__}: {exc}", "passes": False, "limits": limits}
        candidates[name] = row
        if progress is not None:
            progress(len(candidates), len(runtimes))
        logger.info("tune %s on %s: %s %s", artifact.name, device, name,
                    f"{row['items_per_s']:.1f} items/s, sample min cos {row['sample']['min_cosine']:.6f}"
                    + (f" ({row['cut_short']})" if "cut_short" in row else "")
                    if "items_per_s" in row else row.get("error") or row["skipped"])
    passing = {k: v for k, v in candidates.items() if v["passes"]}
    if not passing:
        raise EmbedkitError(f"no runtime ran {artifact.name} correctly on {device}: "
                            + "; ".join(f"{k}: {v.get('error') or v.get('skipped') or 'failed the parity gate'}"
                                        for k, v in candidates.items()))
    choice = max(passing, key=lambda k: passing[k]["items_per_s"])
    if budget is not None and "onnxruntime" in passing and choice != "onnxruntime" and \
            passing[choice]["items_per_s"] < SWITCH * passing["onnxruntime"]["items_per_s"]:
        choice = "onnxruntime"  # a short measurement's noise is no reason to leave the default
    record = {"device": device_key(device), "choice": choice, "precision": passing[choice]["precision"],
              "items": len(items), "candidates": candidates, "machine": machine(device),
              "mode": "thorough" if budget is None else "first use", "budget_s": budget,
              "seconds_spent": round(time.perf_counter() - started, 2),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return records.save(artifact, record)


def first_use(artifact: Artifact, device: str = "cpu", budget: float | None = None) -> dict[str, Any] | None:
    """The route's first-use measurement (:func:`embedkit.encoder_for` with ``runtime="auto"``
    and no record for this device): :func:`tune` within ``budget`` seconds (CPU; on CUDA the
    thorough measurement), recorded, with one log line naming the choice and the time spent.
    Returns the record, or None when it could not be measured or recorded (logged; the caller
    then gets ONNX Runtime, as without tuning). ``budget``: default :data:`FIRST_USE_BUDGET`."""
    budget = FIRST_USE_BUDGET if budget is None else budget
    folder = records.path(artifact).parent
    if not os.access(folder if folder.is_dir() else folder.parent, os.W_OK):
        # A read-only store (baked into an image): the choice could not be kept, and every process
        # would pay the measurement again. Run `embedkit tune` where the store is writable.
        logger.info("not measuring the runtimes of %s on %s: %s is not writable (embedkit tune records a choice "
                    "where it is); using ONNX Runtime", artifact.name, device, folder)
        return None
    started = time.perf_counter()
    try:
        record = tune(artifact, device, budget=budget if device == "cpu" else None,
                      seconds=FIRST_USE_SECONDS if device == "cpu" else 2.0)
    except Exception as exc:  # noqa: BLE001 - measuring is an optimisation; ONNX Runtime still works
        logger.warning("could not measure the runtimes of %s on %s (%s: %s); using ONNX Runtime "
                       "(EMBEDKIT_TUNE=0 skips the measurement)",
                       artifact.name, device, type(exc).__name__, exc)
        return None
    rows = record["candidates"]
    base = rows.get("onnxruntime", {}).get("items_per_s")
    speed = rows[record["choice"]]["items_per_s"]
    logger.info("first use of %s on %s: measured %d runtimes in %.1fs (budget %gs): %s (%s)%s; recorded for "
                "later processes (embedkit tune measures thoroughly on your data; EMBEDKIT_TUNE=0 turns this off)",
                artifact.name, record["device"], sum("items_per_s" in r for r in rows.values()),
                time.perf_counter() - started, budget, record["choice"], record["precision"],
                f", {speed / base:.2f}x ONNX Runtime fp32" if base else "")
    return record


def tune_table(record: dict[str, Any]) -> list[str]:
    """The lines of a :func:`tune` record's table, for the CLI and the benchmarks: the CPU's
    matrix-engine flags (present and absent), then one line per candidate (precision, items/s end
    to end, min cosine to fp32 on the probes and on the sample, and the gate's verdict)."""
    lines = []
    if record.get("mode") == "first use":
        lines.append(f"  first-use measurement: {record.get('seconds_spent')}s of a {record.get('budget_s')}s budget, "
                     f"{record.get('items')} items")
    cpu = record.get("machine", {}).get("cpu")
    if cpu:
        ov = record["machine"].get("openvino")
        lines.append(f"  matrix engines: {', '.join(cpu['matrix_flags']) or 'none'}; absent: {', '.join(cpu['absent']) or 'none'}"
                     + (f"; OpenVINO {ov['version'].split('-')[0]} capabilities {', '.join(ov['capabilities'])}" if ov else "")
                     + (f"; usable cores {cpu['cores']}" if "cores" in cpu else "")
                     + (f" (cgroup quota {cpu['quota']:g} CPUs)" if cpu.get("quota") else ""))
    lines.append(f"  {'candidate':<15} {'precision':<14} {'items/s':>9}  {'probe min cos':>13}  {'sample min cos':>14}  gate")
    for name, row in record["candidates"].items():
        if "error" in row:
            lines.append(f"  {name:<15} cannot run here: {row['error']}")
            continue
        if "skipped" in row:
            lines.append(f"  {name:<15} not measured: {row['skipped']}")
            continue
        gate = "passes" if row["passes"] else "FAILS"
        lines.append(f"  {name:<15} {row['precision']:<14} {row['items_per_s']:9.1f}  {row['parity']['min_cosine']:13.6f}  "
                     f"{row['sample']['min_cosine']:14.6f}  {gate} (>= {row['limits']['min_cosine']})"
                     + (f"  [timing cut short: {row['cut_short']}]" if "cut_short" in row else ""))
    return lines
