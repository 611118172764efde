"""The model store: ``<root>/<name>/<sha256 of model.onnx>/{model.onnx, manifest.json, ...}``.

The digest of the ONNX file is the identity of an exported backbone. Preprocessing is
written into the ONNX file's metadata before hashing, so a change of tokenizer, max length,
pooling or normalisation changes the digest too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones.backbone import Preprocess, preprocess_from_json
from ..errors import ArtifactError
from ..fs.atomic import alive, fsync_files
from ..fs.home import HOME_ENV, default_root
from ..fs.paths import member

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL = "model.onnx"
SCHEMA = 1


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_root(root: str | os.PathLike[str] | None = None) -> str:
    """Where the model store is and why, for ``--help`` and ``embedkit backbones``."""
    if root is not None:
        return f"{Path(root).resolve()} (--models)"
    why = f"${HOME_ENV}" if os.environ.get(HOME_ENV) else f"user cache folder; set ${HOME_ENV} to move it"
    return f"{default_root()} ({why})"


@dataclass(frozen=True)
class Artifact:
    """One exported backbone in the store."""

    path: Path
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def modality(self) -> str:
        return str(self.manifest["modality"])

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing, with file references resolved inside the artifact folder."""
        data = dict(self.manifest["preprocess"])
        if "tokenizer" in data:
            data["tokenizer"] = str(self.path / data["tokenizer"])
        data.pop("tokenizer_sha256", None)
        return preprocess_from_json(data)

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> "Artifact":
        """Open an artifact folder; with ``verify`` the ONNX file's sha256 must match its name."""
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file() or not (folder / MODEL).is_file():
            raise ArtifactError(f"{folder} is not an embedkit artifact (needs {MODEL} and {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"unreadable manifest {manifest_path}: {exc}") from exc
        artifact = cls(folder.resolve(), manifest)
        if verify:
            artifact.verify()
        return artifact

    def verify_once(self) -> None:
        """:meth:`verify`, done once per process for files whose identity (inode, size, mtime)
        has not changed since: reusing an artifact by name must not serve a corrupted graph."""
        try:
            key = tuple((os.stat(p).st_ino, os.stat(p).st_size, os.stat(p).st_mtime_ns)
                        for p in (self.onnx_path, self.path / MANIFEST))
        except OSError:
            key = None
        if key is not None and _VERIFIED.get(str(self.path)) == key:
            return
        self.verify()
        if key is not None:
            _VERIFIED[str(self.path)] = key

    def verify(self) -> None:
        """Check the ONNX file's digest and the side files' digests against the manifest."""
        actual = sha256_file(self.onnx_path)
        if actual != self.digest:
            raise ArtifactError(
                f"{self.onnx_path} is corrupted: sha256 {actual[:12]}... but the manifest says "
                f"{self.digest[:12]}...; delete the folder and export again"
            )

        for rel, expected in self.manifest.get("files", {}).items():
            target = member(self.path, rel, error=ArtifactError)  # inside the folder, a regular file
            if sha256_file(target) != expected:
                raise ArtifactError(f"artifact file {target} is missing or corrupted")


_VERIFIED: dict[str, tuple[Any, ...]] = {}  # artifact folder -> identity of its files when last verified


class ModelStore:
    """The folder of exported artifacts."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).resolve() if root is not None else default_root()

    @classmethod
    def holding(cls, artifact: "Artifact") -> "ModelStore":
        """The store an artifact lives in (``<root>/<name>/<digest>``)."""
        return cls(artifact.path.parents[1])

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def artifacts(self, name: str | None = None) -> list[Artifact]:
        """Every complete artifact (optionally of one backbone), oldest first."""
        found: list[Artifact] = []
        names = [name] if name else sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        for n in names:
            folder = self.root / n
            if not folder.is_dir():
                continue
            for sub in folder.iterdir():
                if sub.name.startswith(".") or not (sub / MANIFEST).is_file():
                    continue
                try:
                    found.append(Artifact.open(sub, verify=False))
                except ArtifactError as exc:
                    logger.warning("skipping unreadable artifact %s: %s", sub, exc)
        return sorted(found, key=lambda a: (a.manifest.get("created", ""), a.digest))

    def by_digest(self, digest: str) -> Artifact | None:
        """The artifact whose full sha256 is ``digest``, whatever its name, or None."""
        for artifact in self.artifacts():
            if artifact.digest == digest:
                return artifact
        return None

    def find(self, name: str, export_key: str) -> Artifact | None:
        """The artifact exported from exactly these inputs, if any."""
        for artifact in self.artifacts(name):
            if artifact.manifest.get("export_key") == export_key:
                return artifact
        return None

    def get(self, ref: str, verify: bool = True) -> Artifact:
        """An artifact by digest (or unique digest prefix of >= 8 hex digits) or by folder path."""
        if Path(ref).is_dir() and (Path(ref) / MANIFEST).is_file():
            return Artifact.open(ref, verify=verify)
        matches = [a for a in self.artifacts() if len(ref) >= 8 and a.digest.startswith(ref)]
        if len({a.digest for a in matches}) == 1:
            # one graph stored under two names (a plugin's backbone and the same file imported as a
            # folder): byte-identical, and its preprocessing is in the graph, so either serves
            matches = matches[:1]
        if len(matches) != 1:
            raise ArtifactError(
                f"no single artifact in {self.root} matches {ref!r} ({len(matches)} found)"
            )
        if verify:
            matches[0].verify()
        return matches[0]

    def inventory(self) -> list[dict[str, Any]]:
        """Every artifact with what it is: ``kind`` is ``export``, ``fp16`` or ``int8-<variant>``;
        a variant names its ``parent`` (digest) and ``parent_name`` (None when the parent is gone)."""
        found = self.artifacts()
        names = {a.digest: a.name for a in found}
        rows = []
        for a in found:
            kind, parent = "export", None
            if "precision" in a.manifest:
                kind, parent = str(a.manifest["precision"].get("dtype", "fp16")), a.manifest["precision"].get("parent")
            elif "quantization" in a.manifest:
                kind = f"int8-{a.manifest['quantization'].get('variant', '?')}"
                parent = a.manifest["quantization"].get("parent")
            rows.append({"name": a.name, "digest": a.digest, "kind": kind, "parent": parent,
                         "parent_name": names.get(parent) if parent else None, "path": str(a.path),
                         "created": a.manifest.get("created")})
        return rows

    def staging(self, name: str) -> Path:
        """A fresh temporary folder beside the final location (same filesystem for rename),
        ``.tmp-<pid>-<random>``. Staging folders of processes that no longer exist (an export
        killed mid-write) are removed first: only ``.tmp-<pid>-<32 hex>`` folders, which this
        method makes, and only when their pid is not alive (a reused pid keeps them: safe)."""
        parent = self.root / name
        try:
            for old in parent.glob(".tmp-*-*"):
                pid, _, tag = old.name[len(".tmp-"):].partition("-")
                if pid.isdigit() and re.fullmatch(r"[0-9a-f]{32}", tag) and old.is_dir() and not alive(int(pid)):
                    logger.info("removing %s: the staging folder of process %s, which no longer exists", old, pid)
                    shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass  # a read-only or missing folder: nothing to sweep
        folder = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    def discard(self, staging: Path) -> None:
        """Remove a staging folder, and its ``<name>`` folder when nothing else is in it (a failed
        first export of a backbone leaves no trace in the store)."""
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()  # only succeeds when empty: another export's files are never touched
        except OSError:
            pass

    def variants(self, name: str, section: str, key: str) -> Artifact | None:
        """A variant already made (int8, fp16): the artifact named ``name`` whose ``section`` has ``key``."""
        for found in self.artifacts(name):
            if found.manifest.get(section, {}).get("key") == key:
                return found
        return None

    def commit_variant(self, base: Artifact, staging: Path, name: str, section: str, info: dict[str, Any]) -> Artifact:
        """Commit ``staging/model.onnx`` (a transform of ``base``'s graph) as an artifact of its own.

        Its manifest is ``base``'s with the new name and digest and ``info`` under ``section``;
        the export key is dropped so it is never mistaken for the plain export, and ``base``'s
        side files (tokenizer) are copied beside it.
        """
        import time

        digest = sha256_file(staging / MODEL)
        manifest = dict(base.manifest)
        manifest.update({
            "name": name,
            "digest": digest,
            section: {**info, "parent": base.digest},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        manifest.pop("export_key", None)
        for rel in base.manifest.get("files", {}):
            shutil.copyfile(base.path / rel, staging / rel)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return self.commit(staging, name, digest)

    def commit(self, staging: Path, name: str, digest: str) -> Artifact:
        """Atomically move a staged artifact to ``<root>/<name>/<digest>``."""
        fsync_files(staging)
        final = self.root / name / digest
        try:
            os.rename(staging, final)
        except OSError:
            # Another process committed the same digest first: identical content, keep theirs.
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        return Artifact.open(final)
