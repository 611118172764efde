"""Fine-tuned backbones in the model store: a new backbone made of its parent and tuned weights.

A fine-tune (:func:`embedkit.finetune`) keeps its result beside the exports of that name::

    <model store>/<name>/finetuned.json          the record: parent, lineage (see below)
    <model store>/<name>/finetuned.safetensors   the tuned module's whole state dict
    <model store>/<name>/<digest>/...            its exports, as for any backbone

``finetuned.json`` is written last (atomically), so a record always names complete weights.
The backbone's ``build()`` is the parent's ``build()`` with the tuned state dict loaded, so it
exports through the same parity gate (:func:`embedkit.export`) and gets its own digest, hence
its own feature-store namespace. The registry (:func:`embedkit.get_backbone`) finds it by name
in any later process from the default model store; :func:`embedkit.export` /
:func:`embedkit.resolve` with an explicit ``store`` look in that store first.

The record's ``lineage``: ``parent`` (name, spec, artifact digest), ``data`` (fingerprint of
the training items and labels, item count), ``hyperparameters``, ``metrics`` (per epoch).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones.backbone import NAME_PATTERN, Backbone, preprocess_from_json
from ..backbones.registry import get_backbone, registry
from ..errors import (
    ArtifactError,
    BackboneInUseError,
    InvalidBackboneError,
    OutputError,
    OutputExistsError,
    UsageError,
)
from ..fs import locks
from ..fs.atomic import alive, write_atomic, write_safetensors
from ..fs.home import default_root
from ..hookspecs import hookimpl
from .store import ModelStore, sha256_file

logger = logging.getLogger(__name__)

STAGING = ".finetune-staging"  # weights staged before a fine-tune claims its name
RECORD = "finetuned.json"
USERS = "saved-models.json"  # the folders of models saved on it by embedkit.finetune (out=): its dependents
WEIGHTS = "finetuned.safetensors"
FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class TunedBackbone(Backbone):
    """A backbone whose weights come from a fine-tune of ``parent`` (a registered name or spec).

    ``build()`` builds the parent and loads the tuned state dict (``weight_files[0]``). The
    lineage travels into the export's manifest; it is not part of the backbone's identity.
    """

    parent: str = ""
    lineage: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    weights_sha256: str = field(default="", compare=False, hash=False, repr=False)

    def build(self) -> Any:

        self.verify()
        module = get_backbone(self.parent).build()
        load_weights(module, self.weight_files[0])
        return module

    def verify(self) -> None:
        """Check the weights file against the sha256 its record names (before it is used).

        Raises:
            ArtifactError: the file is missing or changed since the fine-tune wrote it.
        """

        path = Path(self.weight_files[0])
        if path.is_symlink():
            raise ArtifactError(f"the weights of fine-tuned backbone {self.name!r} ({path}) are a symbolic link; only "
                                "a regular file inside its folder is used: run the fine-tune again")
        if not path.is_file():
            raise ArtifactError(f"the weights of fine-tuned backbone {self.name!r} are missing ({path}); "
                                "run the fine-tune again, or delete the folder to forget it")
        if self.weights_sha256 and sha256_file(path) != self.weights_sha256:
            raise ArtifactError(f"the weights of fine-tuned backbone {self.name!r} ({path}) changed since the "
                                f"fine-tune wrote them (their sha256 is not the {self.weights_sha256[:12]}... its "
                                f"{RECORD} records); run the fine-tune again, or delete the folder {path.parent}")

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "parent": self.parent}


def load_weights(module: Any, path: str | os.PathLike[str]) -> None:
    """Load a safetensors state dict into ``module`` (every key must match, both ways)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidBackboneError("weights", f"{path} does not fit the parent's module: missing {list(missing)[:5]}, "
                                   f"unexpected {list(unexpected)[:5]}")


def save_weights(module: Any, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The module's whole state dict as safetensors at ``path``, atomically (shared tensors copied)."""

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    write_safetensors(path, state, metadata)


def default_name(parent: str, weights: Path) -> str:
    """``<parent>+ft-<first 8 hex digits of the tuned weights' sha256>``."""

    base = parent if NAME_PATTERN.match(parent) else Path(parent).name.lower()
    return f"{base}+ft-{sha256_file(weights)[:8]}"


def persist(root: Path, name: str, parent: Backbone, parent_spec: str, module: Any, lineage: dict[str, Any],
            user_named: bool) -> tuple[TunedBackbone, bool]:
    """Write the tuned weights and record into the store at ``root``; return the backbone and
    whether this call created it (False: the same fine-tune was already there).

    With no user name the name derives from the weights' hash, so the same fine-tune gives the
    same name. A user name already holding another fine-tune is refused; one holding another
    kind of backbone (a registered name) is refused too.

    Raises:
        InvalidBackboneError: ``name`` breaks the naming rule.
        OutputExistsError: ``name`` is taken by a registered backbone or another fine-tune.
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
    if not name:
        name = default_name(parent.name, tmp)
    if not NAME_PATTERN.match(name):
        tmp.unlink(missing_ok=True)
        raise InvalidBackboneError("name", f"name {name!r} must match {NAME_PATTERN.pattern}")
    with locks.held(tmp_dir / "persist.lock", exclusive=True):  # check-then-write, one run at a time
        try:
            created = _claim(root, name, tmp, user_named)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        folder = root / name
        record = {
            "format": FORMAT, "kind": "finetuned-backbone", "name": name, "parent": parent_spec,
            "weights": WEIGHTS, "weights_sha256": sha256_file(folder / WEIGHTS), "spec": _declaration(parent),
            "lineage": lineage,
        }
        write_atomic(folder / RECORD, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    return _backbone(folder, record), created


def check_name(root: Path, name: str) -> None:
    """Refuse ``name`` for a fine-tune in the model store at ``root`` when another kind of backbone
    holds it (checked before training, and again when the weights are claimed).

    Raises:
        OutputExistsError: ``name`` is a registered backbone, or names other artifacts in the store.
    """
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
                raise OutputError(f"cannot keep the fine-tuned backbone in the model store {root}: {folder} is not a "
                                  "folder; give store= another folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                what = "it" if folder == root else str(folder)
                raise OutputError(f"cannot keep the fine-tuned backbone in the model store {root}: {what} is not "
                                  "writable (read-only file system or no permission); give store= a writable folder")
            return


def _claim(root: Path, name: str, tmp: Path, user_named: bool) -> bool:
    """Move the staged weights ``tmp`` to ``<root>/<name>`` if the name is free (or holds these very
    weights); returns whether the name was free. Called with the store's persist lock held.

    Raises:
        OutputExistsError: ``name`` is a registered backbone, other artifacts, or another fine-tune.
    """

    check_name(root, name)
    folder = root / name
    created = not (folder / RECORD).is_file()
    if not created and _read(folder / RECORD).get("weights_sha256") != sha256_file(tmp):
        hint = "" if user_named else " (same name from the same weights hash: delete the folder to redo)"
        raise OutputExistsError(f"a fine-tuned backbone {name!r} with other weights is already in the model store "
                                f"{root}; choose another name{hint}")
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder / WEIGHTS)
    return created


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
    refuses to remove a fine-tune while such a model still exists)."""
    folder = Path(backbone.weight_files[0]).parent
    with locks.held(folder.parent / STAGING / "persist.lock", exclusive=True):
        users = _users(folder)
        path = str(Path(model).absolute())
        if path not in users:
            write_atomic(folder / USERS, json.dumps(users + [path], indent=2).encode())


def _users(folder: Path) -> list[str]:
    try:
        users = json.loads((folder / USERS).read_text())
    except (OSError, ValueError):
        return []
    return [u for u in users if isinstance(u, str)] if isinstance(users, list) else []


def _uses(model: Path, name: str, digests: set[str]) -> bool:
    """Whether the saved model folder ``model`` still exists and names backbone ``name`` or one of ``digests``."""
    try:
        record = json.loads((model / "model.json").read_text()).get("backbone") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return record.get("name") == name or record.get("digest") in digests


@dataclass
class Removed:
    """What :func:`remove` removed: the fine-tune's name, its folder, its exports' and variants' digests."""

    name: str
    folder: Path
    digests: list[str]
    variants: list[str]


def remove(name: str, root: str | os.PathLike[str] | None = None) -> Removed:
    """Remove the fine-tuned backbone ``name`` from the model store at ``root`` (default store):
    its record, weights, exports, and the fp16 / int8 variants made from them.

    Refused while something depends on it: a fine-tune of it, or a model saved on it by
    :func:`embedkit.finetune` (``out=``) whose folder still exists. Only what embedkit made for
    the fine-tune is removed; the folder is first renamed aside in one step, so a crash leaves it
    whole or gone from the store (what is left aside is swept later).

    Raises:
        UsageError: no fine-tune of that name in the store (a registered backbone is not one).
        BackboneInUseError: dependents, each named.
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
        variants = [a for a in inventory if a["name"] != name and a["parent"] in own]
        digests = own | {a["digest"] for a in variants}
        dependents = [f"fine-tune {b.name!r} (fine-tuned from it)" for b in listing(store.root)
                      if b.name != name and (b.parent == name or (b.lineage.get("parent") or {}).get("digest") in own)]
        dependents += [f"saved model {u}" for u in _users(folder) if _uses(Path(u), name, digests)]
        if dependents:
            raise BackboneInUseError(f"fine-tuned backbone {name!r} is used by {'; '.join(dependents)}: remove "
                                     "those first (a saved model: delete its folder), then remove this one",
                                     dependents)
        removed = Removed(name=name, folder=folder, digests=sorted(a["digest"] for a in inventory if a["name"] == name), variants=sorted(a["digest"] for a in variants))
        staging.mkdir(exist_ok=True)
        for path in [folder] + sorted({Path(a["path"]) for a in variants}):
            aside = staging / f"{os.getpid()}-removing-{uuid.uuid4().hex[:8]}"
            os.replace(path, aside)  # one step: gone from the store, whole or not at all
            shutil.rmtree(aside, ignore_errors=True)
        for a in variants:  # a variant's <name> folder, when nothing else is left in it
            try:
                Path(a["path"]).parent.rmdir()
            except OSError:
                pass
    logger.info("removed fine-tuned backbone %s (%s)", name, folder)
    return removed


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


def _declaration(parent: Backbone) -> dict[str, Any]:
    spec = parent.spec()
    return {k: spec[k] for k in ("modality", "dim", "preprocess", "license") if k in spec} | (
        {"blocks": list(getattr(parent, "blocks", ()) or ())})


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidBackboneError("finetuned", f"unreadable fine-tune record {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != "finetuned-backbone":
        raise InvalidBackboneError("finetuned", f"{path} is not a fine-tune record of format {FORMAT}")
    if data.get("weights") != WEIGHTS:  # files named by metadata stay inside their folder: exactly this one
        raise InvalidBackboneError("finetuned", f"{path} names the weights {data.get('weights')!r}; a fine-tune record "
                                   f"names only {WEIGHTS!r} beside it (edited by hand? run the fine-tune again)")
    return data


def _backbone(folder: Path, record: dict[str, Any]) -> TunedBackbone:
    spec = record["spec"]
    lineage = record.get("lineage") or {}
    parent_digest = (lineage.get("parent") or {}).get("digest", "")
    extra = {"blocks": tuple(spec.get("blocks") or ())} if "blocks" in Backbone.__dataclass_fields__ else {}
    return TunedBackbone(
        name=record["name"], modality=spec["modality"], dim=int(spec["dim"]),
        preprocess=preprocess_from_json(spec["preprocess"]), license=spec["license"],
        weights=f"fine-tuned from {record['parent']} ({parent_digest[:12]})",
        weight_files=(str(folder / record["weights"]),),
        description=f"fine-tune of {record['parent']}", parent=record["parent"], lineage=lineage,
        weights_sha256=str(record.get("weights_sha256") or ""), **extra,
    )


def find(name: str, root: str | os.PathLike[str] | None = None) -> TunedBackbone | None:
    """The fine-tuned backbone ``name`` in the model store at ``root`` (default store), or None."""

    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        return None
    folder = Path(root) if root is not None else default_root()
    record = folder / name / RECORD
    if not record.is_file():
        return None
    return _backbone(folder / name, _read(record))


def listing(root: str | os.PathLike[str] | None = None) -> list[TunedBackbone]:
    """Every fine-tuned backbone in the model store at ``root`` (default store), by name."""

    folder = Path(root) if root is not None else default_root()
    found = []
    for record in sorted(folder.glob(f"*/{RECORD}")) if folder.is_dir() else []:
        try:
            found.append(_backbone(record.parent, _read(record)))
        except (InvalidBackboneError, KeyError) as exc:
            logger.warning("skipping fine-tune record %s: %s", record, exc)
    return found


@hookimpl(tryfirst=True)
def resolve_backbone(spec: str) -> Backbone | None:
    """embedkit's own resolver (a default plugin, see :data:`embedkit.backbones.registry.DEFAULT_PLUGINS`):
    a fine-tune kept in the default model store, by its name."""
    found = find(spec)
    if found is not None:
        found.validate()
    return found
