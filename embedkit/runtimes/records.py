"""Tuning records: which runtime :func:`embedkit.tune` measured fastest for an artifact, per device.

Kept in ``<model store>/tuning/<digest>.json``, one entry per device key: the CPU model, its
matrix-engine flags and the cores this process may use (affinity and cgroup quota,
:func:`~embedkit.runtimes.cpu.cpu_count`), or the GPU's name. A record measured with other cores,
other flags (a VM that hides AVX-512) or on another GPU is not reused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fs.atomic import write_atomic
from ..models.store import Artifact, ModelStore
from .cpu import cpu_count, cpu_model, matrix_flags


def device_key(device: str) -> str:
    """What a measurement is valid for: the CPU model, its matrix-engine flags and usable cores, or
    the GPU's name."""
    if device == "cuda":
        try:
            import torch

            return f"cuda:{torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - no torch: one key for any GPU
            return "cuda"
    flags = "+".join(matrix_flags()) or "no matrix engines"
    return f"cpu:{cpu_model()} ({flags}):{cpu_count()} cores"


def path(artifact: Artifact) -> Path:
    """The record file of ``artifact`` in its model store."""
    return ModelStore.holding(artifact).root / "tuning" / f"{artifact.digest}.json"


def recorded(artifact: Artifact, device: str) -> dict[str, Any] | None:
    """The measurement recorded for this artifact on this device, if any."""
    try:
        return json.loads(path(artifact).read_text()).get(device_key(device))
    except (OSError, json.JSONDecodeError):
        return None


def save(artifact: Artifact, record: dict[str, Any]) -> dict[str, Any]:
    """Keep ``record`` (under its ``device`` key) beside the artifact's other records; returns it
    as read back (JSON types)."""
    file = path(artifact)
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        records = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        records = {}
    records[record["device"]] = json.loads(json.dumps(record, default=str))
    write_atomic(file, json.dumps(records, indent=2, sort_keys=True).encode())
    return records[record["device"]]
