"""Removing a fine-tuned backbone from the model store (:func:`remove`): what depends on it is
checked first (fine-tunes of it, saved models recorded in its ``saved-models.json``), only what
embedkit made for it goes (record, weights, exports, its own variants, export staging), and files
a user put in its folder are kept and named (:attr:`Removed.kept`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.registry import registry
from ..errors import BackboneInUseError, UsageError
from ..fs import locks
from .finetuned_record import RECORD, STAGING, USERS, WEIGHTS, find, listing, saved_models
from .store import ModelStore

logger = logging.getLogger(__name__)


def _uses(model: Path, name: str, digests: set[str]) -> bool | None:
    """Whether the saved model folder ``model`` names backbone ``name`` or one of ``digests``; None
    when nothing is at that folder any more (deleted, or moved where embedkit cannot see it). A
    folder whose ``model.json`` cannot be read counts as using it: embedkit cannot tell."""
    if not os.path.lexists(model):
        return None
    try:
        record = json.loads((model / "model.json").read_text())
    except FileNotFoundError:  # the folder holds something else now: not a saved model
        return False
    except (OSError, ValueError):
        return True
    backbone = (record.get("backbone") if isinstance(record, dict) else None) or {}
    return not isinstance(backbone, dict) or backbone.get("name") == name or backbone.get("digest") in digests


CHECKED = ("the fine-tunes in the model store, and the saved models that `finetune` recorded (out= / --out) at the "
           "folders they were saved to; a saved model moved elsewhere since is not seen")


@dataclass
class Removed:
    """What :func:`remove` removed: the fine-tune's name, its folder, its exports' and variants'
    digests, and what it checked: ``checked_models``, the recorded saved-model folders found and
    checked; ``missing_models``, those no longer found there (deleted, or moved: not checked)."""

    name: str
    folder: Path
    digests: list[str]
    variants: list[str]
    checked_models: list[str] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files in its folder that embedkit did not make: left there


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(what embedkit made, what it did not)`` in a fine-tune's folder: its record, weights,
    dependents record, exports (``<sha256>/`` with a manifest), export staging (``.tmp-*``) and lock
    files are embedkit's; anything else (a user's file or folder) is not."""
    ours, other = [], []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = path.name
        if name in (RECORD, WEIGHTS, USERS) or name.endswith(".lock") or (
                path.is_dir() and not path.is_symlink() and (
                    name.startswith(".tmp-") or (re.fullmatch(r"[0-9a-f]{64}", name) is not None
                                                 and (path / "manifest.json").is_file()))):
            ours.append(path)
        else:
            other.append(path)
    return ours, other


def remove(name: str, root: str | os.PathLike[str] | None = None) -> Removed:
    """Remove the fine-tuned backbone ``name`` from the model store at ``root`` (default store):
    its record, weights, exports, and the fp16 / int8 variants made from them.

    Refused while something that embedkit can see depends on it: a fine-tune of it in this model
    store, or a saved model that :func:`embedkit.finetune` saved on it (``out=``), checked at the
    folder it was saved to (the record keeps that folder). A saved model moved elsewhere cannot be
    seen: a recorded folder found empty is listed in :attr:`Removed.missing_models` (and logged),
    so the caller can say plainly what was not checked. Only what embedkit made for the fine-tune
    is removed; the folder is first renamed aside in one step, so a crash leaves it whole or gone
    from the store (what is left aside is swept later).

    Raises:
        UsageError: no fine-tune of that name in the store (a registered backbone is not one).
        BackboneInUseError: dependents, each named (the message says what was checked).
    """
    store = ModelStore(root)
    staging = store.root / STAGING
    with locks.held(staging / "persist.lock", exclusive=True):  # no fine-tune claims or records meanwhile
        found = find(name, store.root)
        if found is None:
            known = ", ".join(b.name for b in listing(store.root)) or "none"
            extra = " (a registered backbone: embedkit removes only the fine-tunes it made)" \
                if name in registry().backbones else ""
            raise UsageError(f"no fine-tuned backbone {name!r} in the model store {store.root}{extra}; "
                             f"fine-tunes there: {known}")
        folder = store.root / name
        inventory = store.inventory()
        own = {a["digest"] for a in inventory if a["name"] == name}
        # a head-only fine-tune exports as its parent, byte for byte: what derives from that digest is the parent's
        own -= {a["digest"] for a in inventory if a["name"] != name and a["kind"] == "export"}
        # its variants: made from its exports *and* named after it (a head-only fine-tune's fp16 has the
        # parent's fp16's digest, but lives under <name>-fp16: each belongs to the backbone that made it)
        made = {a["digest"] for a in inventory if a["name"] == name}
        variants = [a for a in inventory if a["kind"] != "export" and a["parent"] in made
                    and a["name"] == f"{name}-{a['kind']}"]
        digests = own | {a["digest"] for a in variants}
        dependents = [f"fine-tune {b.name!r} (fine-tuned from it)" for b in listing(store.root)
                      if b.name != name and (b.parent == name or (b.lineage.get("parent") or {}).get("digest") in own)]
        uses = {u: _uses(Path(u), name, digests) for u in saved_models(folder, strict=True)}
        dependents += [f"saved model {u}" for u, used in uses.items() if used]
        if dependents:
            raise BackboneInUseError(f"fine-tuned backbone {name!r} is used by {'; '.join(dependents)}: remove "
                                     "those first (a saved model: delete its folder), then remove this one (checked: "
                                     f"{CHECKED})", dependents)
        ours, kept = _entries(folder)
        removed = Removed(name=name, folder=folder, digests=sorted(a["digest"] for a in inventory if a["name"] == name),
                          variants=sorted(a["digest"] for a in variants),
                          checked_models=[u for u, used in uses.items() if used is not None],
                          missing_models=[u for u, used in uses.items() if used is None],
                          kept=[str(p) for p in kept])
        staging.mkdir(exist_ok=True)
        if kept:  # files the user put there stay: the record goes first (the fine-tune is gone), then the rest
            paths = [folder / RECORD] + [p for p in ours if p.name != RECORD]
        else:
            paths = [folder]
        for path in paths + sorted({Path(a["path"]) for a in variants}):
            if not os.path.lexists(path):
                continue
            aside = staging / f"{os.getpid()}-removing-{uuid.uuid4().hex[:8]}"
            os.replace(path, aside)  # one step: gone from the store, whole or not at all
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink(missing_ok=True)
        for a in variants:  # a variant's <name> folder, when nothing else is left in it
            try:
                Path(a["path"]).parent.rmdir()
            except OSError:
                pass
    logger.info("removed fine-tuned backbone %s (%s)", name, folder)
    if removed.missing_models:
        logger.warning("fine-tuned backbone %s removed; saved model(s) made on it are no longer at their recorded "
                       "folders (deleted, or moved: not checked): %s", name, ", ".join(removed.missing_models))
    return removed
