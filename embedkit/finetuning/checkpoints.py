"""Fine-tuning checkpoints: one safetensors file holding everything a run needs to go on.

``<checkpoint_dir>/last.safetensors`` holds the module's and the head's state dicts, the
optimiser's per-parameter state, torch's RNG state(s); its metadata (safetensors keeps a
str -> str map) holds the JSON part: step, epoch, step within the epoch, the scheduler's state,
the optimiser's parameter groups, the history so far, early-stopping counters. One file is
replaced in one atomic step (:func:`write_safetensors`), so a ``kill -9`` at any
moment leaves the previous checkpoint or the new one, never a mix. ``best.safetensors`` holds
the weights of the best validation epoch. ``checkpoint.json`` (written when the run starts) is
the folder's marker: the run's hyperparameters and data fingerprint, which ``resume`` must match.

Data order needs no saved state: each epoch's permutation and each step's augmentation come
from generators seeded by ``(seed, epoch[, step])``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..fs.atomic import write_atomic, write_safetensors

logger = logging.getLogger(__name__)

MARKER = "checkpoint.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.json"
FORMAT = 1


def weights(module: Any, head: Any) -> dict[str, Any]:
    """The module's and the head's (None: no head) state dicts as CPU tensors, ``module.`` / ``head.`` prefixed."""
    tensors: dict[str, Any] = {}
    for prefix, part in (("module.", module), ("head.", head)):
        if part is None:
            continue
        for k, v in part.state_dict().items():
            tensors[prefix + k] = v.detach().cpu().contiguous().clone()
    return tensors


def _tensors(module: Any, head: Any, optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors = weights(module, head)
    meta: dict[str, Any] = {}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, values in state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    meta.setdefault("optim_scalars", {}).setdefault(str(idx), {})[key] = value
        meta["param_groups"] = state["param_groups"]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, meta


def start(folder: Path, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Prepare ``folder`` for a run; with ``resume`` return the last checkpoint's JSON state (None
    when there is none yet: the run starts from the beginning).

    Raises:
        CheckpointError: ``resume`` and the folder's run had other hyperparameters or data.
    """
    marker = folder / MARKER
    if resume and marker.is_file() and (folder / LAST).is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{marker} is unreadable ({exc}); start without resume") from exc
        if old.get("config") != json.loads(json.dumps(config, default=str)):
            diff = sorted(k for k in set(old.get("config", {})) | set(config)
                          if old.get("config", {}).get(k) != json.loads(json.dumps(config.get(k), default=str)))
            raise CheckpointError(f"cannot resume from {folder}: it was made with other settings or data "
                                  f"({', '.join(diff)} differ); run with the same ones, or without resume to start over")
        return read(folder / LAST)[1]
    if resume:
        logger.info("no checkpoint in %s yet: starting from the beginning", folder)
    folder.mkdir(exist_ok=True)
    for stale in (LAST, BEST, METRICS):
        (folder / stale).unlink(missing_ok=True)  # an earlier run's, in a folder check_output accepted
    write_atomic(marker, json.dumps({"kind": "checkpoints", "format": FORMAT, "config": config},
                                    indent=2, sort_keys=True, default=str).encode())
    return None


def save(folder: Path, module: Any, head: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Replace ``last.safetensors`` with the run's state now (atomically)."""
    tensors, meta = _tensors(module, head, optimizer)
    meta.update(state, scheduler=scheduler.state_dict(), format=FORMAT)
    write_safetensors(folder / LAST, tensors, {"embedkit": json.dumps(meta, default=float)})


def save_best(folder: Path, module: Any, head: Any) -> None:
    """Replace ``best.safetensors`` with the weights now (atomically)."""
    tensors, _ = _tensors(module, head)
    write_safetensors(folder / BEST, tensors)


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Replace ``metrics.json`` with the history so far."""
    write_atomic(folder / METRICS, json.dumps(history, indent=2).encode())


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, json state)`` of a checkpoint file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("embedkit", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # a foreign or damaged file: say which, do not guess
        raise CheckpointError(f"{path} is not a readable embedkit checkpoint ({type(exc).__name__}: {exc}); it cannot "
                              "be resumed from: run without resume to start over") from exc


def restore_weights(tensors: dict[str, Any], module: Any, head: Any) -> None:
    """Load :func:`weights`' tensors back into the module and the head (None: no head)."""
    for prefix, part in (("module.", module), ("head.", head)):
        if part is None:
            continue
        part.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def restore(path: Path, module: Any, head: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load the whole run state from ``path`` into the given objects; returns the JSON state."""
    import torch

    tensors, meta = read(path)
    restore_weights(tensors, module, head)
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in (meta.get("optim_scalars") or {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return meta

