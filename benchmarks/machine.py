"""The machine a benchmark ran on, in one line: every benchmark prints it before its figures.

Machines differ between sessions (AMX, AVX-512 BF16 / VNNI, or AVX2 only), so a figure means
little without the CPU model, the CPUs this process may use (affinity and the cgroup quota) and
the vector / matrix flags the runtimes pick kernels by. Built on :mod:`embedkit.runtimes.cpu`,
the same facts ``embedkit tune`` records.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedkit.runtimes import cpu as _cpu  # noqa: E402

VECTOR_FLAGS = ("avx", "avx2", "fma")  # beside embedkit.runtimes.cpu.MATRIX_FLAGS


def cpu() -> str:
    """``"<model>; <n> usable CPUs (of <m> visible[, cgroup quota q]); flags: ...; absent: ..."``."""
    flags = _cpu._cpuinfo()[1]
    present = [f for f in VECTOR_FLAGS if f in flags] + _cpu.matrix_flags()
    absent = [f for f in _cpu.MATRIX_FLAGS if f not in flags]
    quota = _cpu._cgroup_quota()
    limit = f", cgroup quota {quota:g}" if quota else ""
    return (f"{_cpu.cpu_model()}; {len(os.sched_getaffinity(0))} usable CPUs (of {os.cpu_count()} visible{limit}); "
            f"flags: {' '.join(present) or 'none'}; absent: {' '.join(absent) or 'none'}")


if __name__ == "__main__":
    print(cpu())
