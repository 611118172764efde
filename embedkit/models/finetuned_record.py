"""A fine-tune's record in the model store, read: :class:`TunedBackbone`, its weights, :func:`find` and
:func:`listing`. Writing, naming and removing fine-tunes is :mod:`embedkit.models.finetuned`.

A fine-tune keeps its result beside the exports of that name::

    <model store>/<name>/finetuned.json          the record: parent, lineage
    <model store>/<name>/finetuned.safetensors   the tuned module's whole state dict
    <model store>/<name>/<digest>/...            its exports, as for any backbone

The record's ``lineage``: ``parent`` (name, spec, artifact digest), ``data`` (fingerprint of the
training items and labels, item count, and of the given validation items), ``hyperparameters``,
``device``, ``metrics`` (per epoch), ``warnings``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones.backbone import NAME_PATTERN, Backbone, preprocess_from_json
from ..backbones.registry import get_backbone
from ..errors import ArtifactError, BackboneInUseError, InvalidBackboneError
from ..fs.atomic import write_safetensors
from ..fs.home import default_root
from .store import sha256_file

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


def declaration(parent: Backbone) -> dict[str, Any]:
    """What a record keeps of the parent's declaration (modality, dim, preprocessing, license, blocks)."""
    spec = parent.spec()
    return {k: spec[k] for k in ("modality", "dim", "preprocess", "license") if k in spec} | (
        {"blocks": list(getattr(parent, "blocks", ()) or ())})


def read_record(path: Path) -> dict[str, Any]:
    """The fine-tune record at ``path``, checked.

    Raises:
        InvalidBackboneError: unreadable, of another format, or naming weights other than its own.
    """
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


def from_record(folder: Path, record: dict[str, Any]) -> TunedBackbone:
    """The :class:`TunedBackbone` a record (in ``folder``) describes."""
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
    return from_record(folder / name, read_record(record))


def listing(root: str | os.PathLike[str] | None = None) -> list[TunedBackbone]:
    """Every fine-tuned backbone in the model store at ``root`` (default store), by name."""
    folder = Path(root) if root is not None else default_root()
    found = []
    for record in sorted(folder.glob(f"*/{RECORD}")) if folder.is_dir() else []:
        try:
            found.append(from_record(record.parent, read_record(record)))
        except (InvalidBackboneError, KeyError) as exc:
            logger.warning("skipping fine-tune record %s: %s", record, exc)
    return found


def saved_models(folder: Path, strict: bool = False) -> list[str]:
    """The saved-model folders recorded in ``folder``'s :data:`USERS` ([] when there is none).

    Raises:
        BackboneInUseError: (``strict``, for a removal) the record exists but cannot be read: its
            dependents cannot be known, so nothing is removed.
    """
    path = folder / USERS
    try:
        users = json.loads(path.read_text())
        if strict and not (isinstance(users, list) and all(isinstance(u, str) for u in users)):
            raise ValueError("not a list of folders")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        if strict:
            raise BackboneInUseError(
                f"cannot tell what depends on fine-tuned backbone {folder.name!r}: its record of saved models "
                f"{path} cannot be read ({exc}); nothing was removed. Check the saved models made on it, then "
                f"delete or fix {path} (a JSON list of saved-model folders) and remove it again", [str(path)]) from exc
        return []
    return [u for u in users if isinstance(u, str)] if isinstance(users, list) else []
