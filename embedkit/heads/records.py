"""What saved models and saved indexes share: the format, the metadata file read back, the files it
names checked (inside the folder, sha256 as recorded), and the backbone they were made with found
again (:func:`backbone_artifact`).

Format 1 is every saved model and index of embedkit 0.x; format 2 is one that must not be read by
an embedkit that ignores its ``"compact"`` record (a head trained on int8 features, an index of
binary rows): such an embedkit refuses it (format 2 is not 1) instead of feeding it floats.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import (
    ArtifactError,
    BackboneNotAvailableError,
    EmbedkitError,
    UnknownBackboneError,
    UnsafeModelError,
)
from ..fs.paths import member
from ..models.exporter import export
from ..models.store import ModelStore, sha256_file

FORMAT = 1
COMPACT_FORMAT = 2  # a saved model or index that records a Compact
FORMATS = (FORMAT, COMPACT_FORMAT)


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def checked_files(folder: Path, recorded: Any, expected: tuple[str, ...] | None, what: str) -> dict[str, Path]:
    """Each file the metadata names, resolved inside ``folder`` and matching its recorded sha256.

    ``expected`` (when given) is the exact set of names the kind needs, so no file is read
    unchecked and no other file is named.
    """
    if not isinstance(recorded, dict) or not recorded:
        raise UnsafeModelError(f"{folder}: the {what} metadata lists no files")
    files = {name: member(folder, name) for name in recorded}  # before any byte is read
    if expected is not None and set(recorded) != set(expected):
        raise UnsafeModelError(f"{folder}: the {what} metadata names {sorted(recorded)}, expected {sorted(expected)}; refusing it")
    for name, digest in recorded.items():
        if sha256_file(files[name]) != digest:
            raise UnsafeModelError(f"{files[name]} changed since it was saved (sha256 mismatch); refusing it")
    return files


def read_meta(folder: Path, marker: str, what: str) -> dict[str, Any]:
    try:
        meta = json.loads((folder / marker).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder} is not a saved embedkit {what} ({marker}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{folder}: {what} format {found}, this embedkit reads {', '.join(map(str, FORMATS))}")
    return meta


def portable_spec(spec: Any) -> str:
    """The backbone spec as recorded in ``model.json``: a local folder given by a relative path is
    recorded absolute, so the model re-exports it from any working directory."""
    text = str(spec)
    return str(Path(text).resolve()) if not Path(text).is_absolute() and Path(text).exists() else text


def backbone_artifact(record: dict[str, Any], store: str | os.PathLike[str] | None = None,
                      needed_by: str = "") -> Any:
    """The artifact a saved model or index was made with, found from any working directory.

    ``record`` is ``{"digest", "name", "spec"}``. In order: the artifact with that digest in the
    model store (``store``, default ``$EMBEDKIT_HOME`` or the user cache folder); else the recorded
    backbone exported again, kept only if it gives that very digest (exports are deterministic).
    Nothing else is exported or left behind.

    Raises:
        BackboneNotAvailableError: neither works; the message says what is missing and how to get it.
    """

    models = ModelStore(store)
    digest, name = record["digest"], record.get("name")
    found = models.by_digest(digest)
    if found is not None:
        return found  # verified when the embedder opens it
    reasons = []
    for spec in dict.fromkeys(s for s in (record.get("spec"), name) if s):
        if spec == digest or (Path(spec) / "manifest.json").is_file():
            continue  # an artifact reference, not something to export again
        try:
            return export(spec, models, expect=digest)
        except UnknownBackboneError:
            reasons.append(f"{spec!r} is not a backbone here (is its plugin installed?)")
        except EmbedkitError as exc:
            reasons.append(f"re-exporting {spec!r} failed: {exc}")
    raise BackboneNotAvailableError(digest, name, models.root, " ".join(reasons), needed_by)
