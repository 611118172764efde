"""Fine-tuning checkpoints: one safetensors file holding everything a run needs to go on.

``<checkpoint_dir>/last.safetensors`` holds the module's and the head's state dicts, the
optimiser's per-parameter state, torch's RNG state(s); its metadata (safetensors keeps a
str -> str map) holds the JSON part: step, epoch, step within the epoch, the scheduler's state,
the optimiser's parameter groups, the history so far, early-stopping counters. One file is
replaced in one atomic step (:func:`_write`), so a ``kill -9`` at any
moment leaves the previous checkpoint or the new one, never a mix. ``best.safetensors`` holds
the weights of the best validation epoch. ``checkpoint.json`` (written when the run starts) is
the folder's marker: the run's hyperparameters and data fingerprint, which ``resume`` must match.

Nothing is resumed that was not verified, as shards are not read unverified: every checkpoint
file (``last`` and ``best``) carries in its header ``sha256``, a digest of its header (less that
field) and of every tensor byte, and ``run``, the identity of the run that wrote it (a digest of
the marker's config: parent digest, data fingerprint, hyperparameters, device). Before a resume
both are checked (:func:`read`): a flipped bit, a damaged header (a flipped byte in a key that
loses the checksum field is damage too, not an older file), or a file copied in from another run
(another seed, other data) is a :class:`CheckpointError` naming the file, never a run finished
silently with other weights. Only a file whose intact header says it is of checkpoint format 1 is
called older (format 1 wrote no checksum and no run).

Data order needs no saved state: each epoch's permutation and each step's augmentation come
from generators seeded by ``(seed, epoch[, step])``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..fs.atomic import staged_file, write_atomic

logger = logging.getLogger(__name__)

MARKER = "checkpoint.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.json"
FORMAT = 2  # 2: each file carries its checksum and its run's identity


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
        run = identity(config)
        if (folder / BEST).is_file():
            read(folder / BEST, run)  # checked now, not found out at the end of the run
        return read(folder / LAST, run)[1]
    if resume:
        logger.info("no checkpoint in %s yet: starting from the beginning", folder)
        if (folder / BEST).is_file():
            logger.warning("%s is discarded: no checkpoint (%s) beside it to resume from (a run stopped in its first "
                           "epoch); starting from the beginning", folder / BEST, LAST)
    folder.mkdir(exist_ok=True)
    for stale in (LAST, BEST, METRICS):
        (folder / stale).unlink(missing_ok=True)  # an earlier run's, in a folder check_output accepted
    write_atomic(marker, json.dumps({"kind": "checkpoints", "format": FORMAT, "config": config},
                                    indent=2, sort_keys=True, default=str).encode())
    return None


def check_folder(folder: Path, resume: bool) -> None:
    """Refuse, before any work, a checkpoint folder whose files embedkit cannot account for: a
    checkpoint (``last`` / ``best``) beside a missing or damaged ``checkpoint.json`` (nothing says
    which run wrote it), or a folder (or other non-file) where one of those files should be.

    Raises:
        CheckpointError: naming the file and what to do.
    """
    if not folder.is_dir() or folder.is_symlink():
        return
    for name in (MARKER, LAST, BEST, METRICS):
        path = folder / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
            raise CheckpointError(f"{path} is not a regular file (a folder or link where embedkit keeps a checkpoint "
                                  f"file): it cannot be {'resumed from' if resume else 'replaced'}; move it away, or "
                                  "choose another checkpoint_dir")
    held = [n for n in (LAST, BEST) if (folder / n).is_file()]
    if not held:
        return
    marker = folder / MARKER
    try:
        data = json.loads(marker.read_text())
        if not isinstance(data, dict) or data.get("kind") != "checkpoints" or not isinstance(data.get("config"), dict):
            raise ValueError("not an embedkit checkpoint marker")
    except FileNotFoundError:
        raise CheckpointError(f"{marker} is missing, so nothing says which run wrote {', '.join(held)} beside it: it "
                              f"cannot be resumed from nor taken over; delete {folder} (or move it away) to start over, "
                              "or choose another checkpoint_dir") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{marker} is damaged ({exc}), so nothing says which run wrote {', '.join(held)} beside "
                              f"it: it cannot be resumed from nor taken over; delete {folder} (or move it away) to "
                              "start over, or choose another checkpoint_dir") from exc


def identity(config: dict[str, Any]) -> str:
    """The identity of a run: the sha256 of its config (as the marker records it) in canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _header(blob: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """``(header, offset of the data)`` of a safetensors file's bytes.

    Raises:
        CheckpointError: not a safetensors header.
    """
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        if not 0 < size <= len(blob) - 8:
            raise ValueError(f"header length {size} for a file of {len(blob)} bytes")
        header = json.loads(blob[8:8 + size])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a readable embedkit checkpoint ({type(exc).__name__}: {exc}): damaged "
                              "(a flipped byte, a copy cut short) or not a checkpoint at all; it cannot be resumed "
                              "from: run without resume to start over") from exc
    return header, 8 + size


def _unverifiable(path: Path, header: dict[str, Any]) -> CheckpointError:
    """The error for a file whose header holds no checksum: written by an older embedkit (format 1:
    its ``embedkit`` state says so, and it names no run), not by embedkit at all (no metadata, only
    tensors), or else damaged (a checksum field embedkit wrote is gone: a flipped byte in a key, an edit)."""
    meta = header.get("__metadata__")
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    intact = all(isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= v.keys() for v in tensors)
    try:
        state = json.loads(meta.get("embedkit") or "null") if isinstance(meta, dict) else None
    except ValueError:
        state = None
    fmt = state.get("format") if isinstance(state, dict) else None
    if intact and isinstance(meta, dict) and isinstance(fmt, int) and fmt < FORMAT and "run" not in meta:
        return CheckpointError(f"{path} carries no checksum (written by an older embedkit, checkpoint format {fmt}): "
                               "it cannot be verified, so it is not resumed from: run without resume to start over")
    if intact and meta is None:
        return CheckpointError(f"{path} carries no embedkit metadata (not written by embedkit): it cannot be verified, "
                               "so it is not resumed from: run without resume to start over")
    return CheckpointError(f"{path} is damaged: its header lacks the checksum embedkit writes into it (a flipped byte "
                           "in the header, a damaged disk or copy, an edit); it is not resumed from: run without "
                           "resume to start over")


def _checksum(header: dict[str, Any], data: bytes | memoryview) -> str:
    """sha256 of the header (less its ``sha256`` field) and of the data bytes."""
    header = json.loads(json.dumps(header))
    (header.get("__metadata__") or {}).pop("sha256", None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(data)
    return digest.hexdigest()


def _write(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file at ``path``, its checksum in its header, replaced in one
    atomic step (serialised once in memory, never with ``save_file``: see :func:`embedkit.fs.atomic.write_safetensors`)."""
    from safetensors.torch import save as serialise

    blob = serialise(tensors, metadata=metadata)
    header, start = _header(blob, path)
    data = memoryview(blob)[start:]
    header.setdefault("__metadata__", {})["sha256"] = _checksum(header, data)
    # the data's offsets are relative to the end of the header: a longer header moves nothing
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def save(folder: Path, module: Any, head: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
         run: str = "") -> None:
    """Replace ``last.safetensors`` with the run's state now (atomically); ``run``: :func:`identity`."""
    tensors, meta = _tensors(module, head, optimizer)
    meta.update(state, scheduler=scheduler.state_dict(), format=FORMAT)
    _write(folder / LAST, tensors, {"embedkit": json.dumps(meta, default=float), "run": run})


def save_best(folder: Path, module: Any, head: Any, run: str = "") -> None:
    """Replace ``best.safetensors`` with the weights now (atomically); ``run``: :func:`identity`."""
    tensors, _ = _tensors(module, head)
    _write(folder / BEST, tensors, {"embedkit": json.dumps({"format": FORMAT}), "run": run})


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Replace ``metrics.json`` with the history so far."""
    write_atomic(folder / METRICS, json.dumps(history, indent=2).encode())


def read(path: Path, run: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, json state)`` of a checkpoint file, verified: its checksum, and (``run`` given)
    that the run of :func:`identity` ``run`` wrote it.

    Raises:
        CheckpointError: unreadable, damaged (its checksum does not match, or its header lost the
            checksum field), written by an older embedkit without one (or not by embedkit), or
            written by another run.
    """
    from safetensors.torch import load

    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); run without resume to start over") from exc
    header, start = _header(blob, path)
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    recorded = meta.get("sha256")
    if not recorded:
        raise _unverifiable(path, header)
    if _checksum(header, memoryview(blob)[start:]) != recorded:
        raise CheckpointError(f"{path} does not match its checksum: it changed after embedkit wrote it (a damaged "
                              "disk or copy, an edit); it is not resumed from: run without resume to start over")
    if run is not None and meta.get("run") != run:
        raise CheckpointError(f"{path} was written by another run (other settings or data, e.g. another seed, or "
                              "copied in from another run's folder) than the one its folder's checkpoint.json "
                              "records; it is not resumed from: run without resume to start over")
    try:
        state = json.loads(meta.get("embedkit") or "{}")
        return load(blob), state
    except Exception as exc:  # a file embedkit wrote and verified: only a bug of its own gets here
        raise CheckpointError(f"{path} is not a readable embedkit checkpoint ({type(exc).__name__}: {exc}); it cannot "
                              "be resumed from: run without resume to start over") from exc


def restore_weights(tensors: dict[str, Any], module: Any, head: Any) -> None:
    """Load :func:`weights`' tensors back into the module and the head (None: no head)."""
    for prefix, part in (("module.", module), ("head.", head)):
        if part is None:
            continue
        part.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def restore(path: Path, module: Any, head: Any, optimizer: Any, scheduler: Any, run: str | None = None
            ) -> dict[str, Any]:
    """Load the whole run state from ``path`` (verified: :func:`read`) into the given objects;
    returns the JSON state."""
    import torch

    tensors, meta = read(path, run)
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

