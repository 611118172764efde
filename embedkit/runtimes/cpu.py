"""What this CPU is and which matrix engines it has (read from ``/proc/cpuinfo``; no imports).

A reduced-precision candidate (bf16) is only worth measuring on a CPU that computes bf16 in
hardware: Intel AMX (``amx_bf16`` tiles) or AVX-512 BF16 (``avx512_bf16`` dot products).
Elsewhere a runtime emulates bf16 by converting to fp32 and back, which is slower than fp32
and no more exact, so :func:`embedkit.tune` does not offer it there.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
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
    """``{"model", "matrix_flags", "absent", "bf16"}``: what tune records and the benchmarks print."""
    present = matrix_flags()
    return {"model": cpu_model(), "matrix_flags": present, "absent": [f for f in MATRIX_FLAGS if f not in present],
            "bf16": has_bf16()}


def cpu_count() -> int:
    """Cores this process may use (respects CPU affinity and cgroup-pinned sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
