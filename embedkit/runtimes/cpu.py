"""What this CPU is and which matrix engines it has (read from ``/proc/cpuinfo``; no imports).

A reduced-precision candidate (bf16) is only worth measuring on a CPU that computes bf16 in
hardware: Intel AMX (``amx_bf16`` tiles) or AVX-512 BF16 (``avx512_bf16`` dot products).
Elsewhere a runtime emulates bf16 by converting to fp32 and back, which is slower than fp32
and no more exact, so :func:`embedkit.tune` does not offer it there.
"""
from __future__ import annotations

import math
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# The flags that name a matrix or dot-product engine for bf16 / int8 / fp16 inference.
MATRIX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "amx_fp16", "avx512_bf16", "avx512_vnni", "avx_vnni",
                "avx512_fp16", "avx512f")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: no flags known, so no bf16 candidate is offered
        pass
    return model, frozenset(flags)


def cpu_model() -> str:
    """The CPU's model name, e.g. ``Intel(R) Xeon(R) Platinum 8480+``."""
    return _cpuinfo()[0]


def matrix_flags() -> list[str]:
    """Those of :data:`MATRIX_FLAGS` this CPU has, in that order."""
    flags = _cpuinfo()[1]
    return [f for f in MATRIX_FLAGS if f in flags]


def has_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AMX or AVX-512 BF16)."""
    return any(f in _cpuinfo()[1] for f in BF16_FLAGS)


def describe() -> dict[str, Any]:
    """``{"model", "matrix_flags", "absent", "bf16", "cores", "quota"}``: what tune records and the
    benchmarks print (``cores``: :func:`cpu_count`; ``quota``: the cgroup CPU quota, or None)."""
    present = matrix_flags()
    return {"model": cpu_model(), "matrix_flags": present, "absent": [f for f in MATRIX_FLAGS if f not in present],
            "bf16": has_bf16(), "cores": cpu_count(), "quota": _cgroup_quota()}


def _cgroup_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroups in CPUs (``quota / period``), the smallest along the
    hierarchy, or None when none is set (or nothing can be read).

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``) in the process's cgroup and
    each parent up to the mount; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no
    quota) in the ``cpu`` controller's hierarchy. Containers (docker ``--cpus``, Kubernetes
    limits) set these, while affinity still lists every core of the host: runtimes sized by the
    core count alone start far more threads than the quota lets run, and stall.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        names = set(controllers.split(","))
        if controllers == "":  # v2: one unified hierarchy, mounted at root or root/unified
            mounts = [Path(root), Path(root) / "unified"]
            files = [("cpu.max", None)]
        elif "cpu" in names:  # v1: the cpu controller (often mounted as cpu,cpuacct)
            mounts = [Path(root) / d for d in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            files = [("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        else:
            continue
        for mount in mounts:
            if not mount.is_dir():
                continue
            folder = mount / path.lstrip("/")
            # A container sees its own cgroup as the mount's root; a host process its full path.
            # Walk up to the mount: a parent's quota bounds its children too.
            while True:
                for quota_file, period_file in files:
                    cpus = _read_quota(folder, quota_file, period_file)
                    if cpus is not None:
                        found.append(cpus)
                if folder == mount or mount not in folder.parents:
                    break
                folder = folder.parent
            break
    return min(found) if found else None


def _read_quota(folder: Path, quota_file: str, period_file: str | None) -> float | None:
    try:
        if period_file is None:  # v2 cpu.max: "<quota|max> <period>"
            quota, _, period = (folder / quota_file).read_text().strip().partition(" ")
        else:
            quota, period = (folder / quota_file).read_text().strip(), (folder / period_file).read_text().strip()
        if quota in ("max", "-1", ""):
            return None
        q, p = int(quota), int(period or 100000)
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def cpu_count() -> int:
    """Cores this process may use: its CPU affinity (``taskset``, cpusets), bounded by the cgroup
    CPU quota (v1 ``cpu.cfs_quota_us``, v2 ``cpu.max``) rounded up, at least 1.

    Every runtime sizes its threads by this (ONNX Runtime intra-op threads, OpenVINO threads and
    streams, torch threads, image decoding workers, the service's decoding pool), and tuning
    records are keyed by it, so a measurement made with 16 cores is not reused in a 2-core container.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota - 1e-9))
    return max(1, cores)
