"""Fine-tuned backbones in the model store: a new backbone made of its parent and tuned weights,
kept (:func:`persist`), named (:func:`default_name`) and removed (:func:`remove`).

A fine-tune (:func:`embedkit.finetune`) keeps its result beside the exports of that name (the
layout and the record are :mod:`embedkit.models.finetuned_record`, which also reads them back:
:class:`TunedBackbone`, :func:`find`, :func:`listing`, importable from here too).
``finetuned.json`` is written last (atomically), so a record always names complete weights.
The backbone's ``build()`` is the parent's ``build()`` with the tuned state dict loaded, so it
exports through the same parity gate (:func:`embedkit.export`) and gets its own digest, hence
its own feature-store namespace. The registry (:func:`embedkit.get_backbone`) finds it by name
in any later process from the default model store; :func:`embedkit.export` /
:func:`embedkit.resolve` with an explicit ``store`` look in that store first.

Names. Without a user name a fine-tune is named ``<parent>+ft-<8 hex digits>``: the start of a
sha256 of its weights' sha256 *and* of its run's identity (:func:`run_identity`: the parent's
digest, the training and validation data's fingerprints, the hyperparameters with the seed, the
device). Two different runs never share a name or a record, even when their weights are equal (a
``unfreeze="head"`` run leaves the body as the parent's, whatever its seed, data or epochs), and
an identical rerun gets the same name and leaves the record as it was. A name already holding
another run's fine-tune is refused (:class:`~embedkit.errors.OutputExistsError`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..backbones.backbone import NAME_PATTERN, Backbone
from ..backbones.registry import registry
from ..errors import InvalidBackboneError, OutputError, OutputExistsError, UsageError
from ..fs import locks
from ..fs.atomic import alive, write_atomic
from ..hookspecs import hookimpl
from .finetuned_record import (
    FORMAT,
    RECORD,
    STAGING,
    USERS,
    WEIGHTS,
    TunedBackbone,
    declaration,
    find,
    from_record,
    listing,
    load_weights,
    read_record,
    save_weights,
    saved_models,
)
from .finetuned_removal import CHECKED, Removed, remove
from .store import sha256_file

__all__ = ["CHECKED", "FORMAT", "RECORD", "STAGING", "USERS", "WEIGHTS", "Removed", "TunedBackbone", "check_name",
           "check_writable", "default_name", "discard", "find", "listing", "load_weights", "persist", "record_user",
           "remove", "resolve_backbone", "run_identity", "save_weights"]

logger = logging.getLogger(__name__)


def run_identity(lineage: dict[str, Any]) -> str:
    """The identity of the run a lineage describes: the sha256 of its parent's digest, its data
    (training fingerprint, item counts, classes, the given validation items' fingerprint), its
    hyperparameters (the seed among them) and its device, in canonical JSON; its metrics, warnings
    and time are what the run gave, not what it was."""
    lineage = json.loads(json.dumps(lineage, default=str))
    key = {"parent": (lineage.get("parent") or {}).get("digest"), "data": lineage.get("data"),
           "hyperparameters": lineage.get("hyperparameters"), "device": lineage.get("device")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_name(parent: str, weights_sha256: str, lineage: dict[str, Any]) -> str:
    """``<parent>+ft-<first 8 hex digits of sha256(weights' sha256, run identity)>`` (see the module docstring).

    Args:
        parent: the parent's name (a spec or a path: its last part, lower-cased).
        weights_sha256: the sha256 of the tuned weights file.
        lineage: the run's lineage (:func:`run_identity`).
    """

    base = parent if NAME_PATTERN.match(parent) else Path(parent).name.lower()
    digest = hashlib.sha256(f"{weights_sha256}:{run_identity(lineage)}".encode()).hexdigest()
    return f"{base}+ft-{digest[:8]}"


def persist(root: Path, name: str, parent: Backbone, parent_spec: str, module: Any, lineage: dict[str, Any],
            user_named: bool) -> tuple[TunedBackbone, bool]:
    """Write the tuned weights and record into the store at ``root``; return the backbone and
    whether this call created it (False: this very run was already there, its record is kept).

    With no user name the name is :func:`default_name`'s. A name holding a fine-tune of another
    run (other weights, or another :func:`run_identity`) is refused; one holding another kind of
    backbone (a registered name) is refused too.

    Raises:
        InvalidBackboneError: ``name`` breaks the naming rule.
        OutputExistsError: ``name`` is taken by a registered backbone or another run's fine-tune.
    """
    tmp_dir = root / STAGING
    tmp = tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"  # two threads of one process too
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        _sweep(tmp_dir)
        save_weights(module, tmp)
    except OSError as exc:  # the user's store is what cannot be written, not embedkit's staging file
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot keep the fine-tuned backbone in the model store {root}: {exc.strerror or exc}; "
                          "give store= a writable folder with free space") from exc
    weights_sha256 = sha256_file(tmp)
    if not name:
        name = default_name(parent.name, weights_sha256, lineage)
    if not NAME_PATTERN.match(name):
        tmp.unlink(missing_ok=True)
        raise InvalidBackboneError("name", f"name {name!r} must match {NAME_PATTERN.pattern}")
    folder = root / name
    with locks.held(tmp_dir / "persist.lock", exclusive=True):  # check-then-write, one run at a time
        try:
            existing = _claim(root, name, tmp, weights_sha256, lineage, user_named)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if existing is not None:  # this very run: its record stays as it was (an identical rerun is idempotent)
            return from_record(folder, existing), False
        record = {
            "format": FORMAT, "kind": "finetuned-backbone", "name": name, "parent": parent_spec,
            "weights": WEIGHTS, "weights_sha256": weights_sha256, "spec": declaration(parent),
            "lineage": lineage,
        }
        write_atomic(folder / RECORD, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    return from_record(folder, record), True


DIGEST_LIKE = re.compile(r"^[0-9a-f]{8,}$")  # read as a digest (prefix) by resolve and ModelStore.get
VARIANT_NAME = re.compile(r"-(fp16|bf16|int8-[a-z0-9._+-]+)$")  # precision.half's and quantization.quantize's names


def check_name(root: Path, name: str) -> None:
    """Refuse ``name`` for a fine-tune in the model store at ``root`` when another kind of backbone
    holds it, or when it could be read as something else (checked before training, and again when
    the weights are claimed): a digest (:data:`DIGEST_LIKE`), a variant's name (:data:`VARIANT_NAME`).

    Raises:
        UsageError: ``name`` reads as a digest or as a variant's name.
        OutputExistsError: ``name`` is a registered backbone, or names other artifacts in the store.
    """
    if DIGEST_LIKE.match(name):
        raise UsageError(f"name {name!r} could be read as an artifact digest (8 or more hex digits only), so "
                         "embedkit could not tell the fine-tune from the artifact that digest starts; give the "
                         "fine-tune a name with a letter beyond a-f, e.g. 'my-" + name[:8] + "'")
    if VARIANT_NAME.search(name):
        raise UsageError(f"name {name!r} is how embedkit names an artifact's variants (<name>-fp16, <name>-bf16, "
                         "<name>-int8-<variant>): the fine-tune's own variants, or another backbone's, would share "
                         "its folder; give the fine-tune a name that does not end so")
    if name in registry().backbones and not isinstance(registry().backbones[name], TunedBackbone):
        raise OutputExistsError(f"{name!r} is a registered backbone; give the fine-tune another name")
    folder = root / name
    if not (folder / RECORD).is_file() and any((sub / "manifest.json").is_file() for sub in _subfolders(folder)):
        raise OutputExistsError(f"{name!r} already names other artifacts in the model store {root}; give the "
                                "fine-tune another name")


def check_writable(root: Path) -> None:
    """Refuse, before any training, a model store that cannot take a new backbone (``root`` or,
    when it does not exist yet, the nearest folder above it that does).

    Raises:
        OutputError: a read-only file system, no permission, or a file where a folder should be.
    """
    for folder in (root / STAGING, root, *root.absolute().parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise OutputError(f"cannot keep the fine-tuned backbone in the model store {root}: {folder} is a "
                                  "file, not a folder; give store= another folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                what = "it" if folder == root else str(folder)
                raise OutputError(f"cannot keep the fine-tuned backbone in the model store {root}: {what} is not "
                                  "writable (read-only file system or no permission); give store= a writable folder")
            return


def _claim(root: Path, name: str, tmp: Path, weights_sha256: str, lineage: dict[str, Any],
           user_named: bool) -> dict[str, Any] | None:
    """Move the staged weights ``tmp`` (sha256 ``weights_sha256``) to ``<root>/<name>``. Returns
    None when the name was free, or the record there when it holds this very run (the same
    weights and :func:`run_identity`: an identical rerun, or a resume finishing the run that
    made it). Called with the store's persist lock held.

    Raises:
        OutputExistsError: ``name`` is a registered backbone, other artifacts, or another run's fine-tune.
    """

    check_name(root, name)
    folder = root / name
    existing = read_record(folder / RECORD) if (folder / RECORD).is_file() else None
    if existing is not None:
        other = "other weights" if existing.get("weights_sha256") != weights_sha256 else \
            "other settings or data" if run_identity(existing.get("lineage") or {}) != run_identity(lineage) else ""
        if other:
            how = "" if user_named else " (its default name, a hash of weights and run, is the same: name this one)"
            raise OutputExistsError(f"a fine-tuned backbone {name!r} made by another run ({other}) is already in the "
                                    f"model store {root}; choose another name{how}")
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder / WEIGHTS)  # these bytes (a rerun's are the same: a missing file is put back)
    return existing


def discard(backbone: TunedBackbone) -> None:
    """Remove a fine-tuned backbone that :func:`persist` just created and that failed its export:
    the record first (it is no longer found nor listed), then the weights, then its folder when
    nothing else is left in it."""
    folder = Path(backbone.weight_files[0]).parent
    (folder / RECORD).unlink(missing_ok=True)
    (folder / WEIGHTS).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it (e.g. a lock file): leave the folder
        pass


def record_user(backbone: TunedBackbone, model: Path) -> None:
    """Note in the fine-tune's folder that the saved model at ``model`` uses it (:func:`remove`
    refuses to remove a fine-tune while a saved model at a recorded folder still uses it)."""
    folder = Path(backbone.weight_files[0]).parent
    with locks.held(folder.parent / STAGING / "persist.lock", exclusive=True):
        users = saved_models(folder)
        path = str(Path(model).absolute())
        if path not in users:
            write_atomic(folder / USERS, json.dumps(users + [path], indent=2).encode())


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


def _sweep(folder: Path) -> None:
    """Remove staged weights of fine-tunes whose process died (named ``<pid>[-<random>].safetensors``),
    and folders a removal set aside (``<pid>-removing-<random>``) whose process died."""

    for path in folder.glob("*.safetensors"):
        pid = path.stem.split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            path.unlink(missing_ok=True)
    for path in folder.glob("*-removing-*"):
        pid = path.name.split("-")[0]
        if pid.isdigit() and not alive(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


@hookimpl(tryfirst=True)
def resolve_backbone(spec: str) -> Backbone | None:
    """embedkit's own resolver (a default plugin, see :data:`embedkit.backbones.registry.DEFAULT_PLUGINS`):
    a fine-tune kept in the default model store, by its name."""
    found = find(spec)
    if found is not None:
        found.validate()
    return found
