"""The feature store: embeddings keyed by (artifact digest, item id), in shards any Arrow reader opens.

Layout::

    STORE/<backbone name>/<artifact digest>/
        namespace.json             digest, backbone, dim, preprocessing, schema version
        shards/<shard>.arrow       Arrow IPC file: id, source, content (strings; content: the fingerprint
                                   beside user ids, schema 2), embedding (fixed_size_list<float32>)
        commits/<shard>.json       the commit record: rows, bytes, sha256, failures; written LAST
        manifest.json              summary of all commits (rebuilt after each commit)
        .lock, .lock.gate          advisory locks shared by readers, writers and gc (embedkit.fs.locks)
        cache/                     consolidated .npy for memory-mapped loading (derived, disposable,
                                   checksummed; about the size of the shards again)

A shard counts only once its commit record exists, and the record is renamed into place only
after the shard file is fsynced and renamed: ``kill -9`` at any moment leaves either a complete
commit or an orphan file that ``gc`` removes and a rerun recomputes. Each writer names its own
shards (time, pid, random), so two processes can write one namespace at once; an item both
computed is read once (the latest commit of an id wins, see :mod:`embedkit.features.namespace`). The
commit records are the source of truth; ``manifest.json`` is a convenience view for people and
tools. Readers, writers and ``gc`` share a namespace through a lock (:mod:`embedkit.fs.locks`):
``gc`` removes only what no live process is writing. Reading needs no write access: on a
read-only store the cache is built in a temporary folder. Every read checks that a shard
belongs to the namespace (its metadata names the digest) and the cache against its checksums.

Shards open without embedkit: ``pandas.read_feather``, ``pyarrow.ipc.open_file``,
``polars.read_ipc``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError, StoreWriteError
from ..fs.atomic import write_atomic
from ..fs.locks import held
from .namespace import LOCK, NAMESPACE, READABLE_SCHEMAS, SCHEMA_VERSION, Namespace
from .verification import Problem

__all__ = ["FeatureStore", "Namespace", "Problem", "SCHEMA_VERSION"]

logger = logging.getLogger(__name__)

_INFO_KEYS = ("schema", "backbone", "digest", "dim", "modality", "preprocess", "created")


class FeatureStore:
    """A folder of namespaces, one per exported artifact (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.root = Path(path)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def namespace(self, artifact: Any) -> Namespace:
        """The namespace of an artifact, created on first use (the writer's entry point).

        A damaged ``namespace.json`` is rebuilt from the artifact; a schema-1 namespace is
        upgraded (its shards stay readable). Raises StoreError for a namespace written by a
        newer embedkit, StoreWriteError (an OSError) when the store cannot be written.
        """
        folder = self.root / artifact.name / artifact.digest
        info = {
            "schema": SCHEMA_VERSION,
            "backbone": artifact.name,
            "digest": artifact.digest,
            "dim": artifact.dim,
            "modality": artifact.modality,
            "preprocess": artifact.manifest.get("preprocess"),
            "created": time.time(),
        }
        path = folder / NAMESPACE
        if path.is_file():
            existing, why = _read_info(folder)
            if why is None:
                if existing.get("dim") != artifact.dim:
                    raise StoreError(f"{path} records dim {existing.get('dim')}, the artifact has {artifact.dim}")
                if existing.get("schema") == SCHEMA_VERSION:
                    return Namespace(folder, existing)
                logger.info("upgrading %s from schema %s to %s", path, existing.get("schema"), SCHEMA_VERSION)
                info = {**existing, "schema": SCHEMA_VERSION}
            elif why.startswith("schema"):
                raise StoreError(f"{folder}: {why}")
            else:
                logger.warning("%s was damaged (%s): rebuilt from the artifact", path, why)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with held(folder / LOCK):  # gc never removes the record's temp file mid-write
                write_atomic(path, json.dumps(info, indent=2).encode())
        except OSError as exc:
            raise StoreWriteError(path, exc) from exc
        return Namespace(folder, info)

    def _scan(self) -> tuple[list[Namespace], list[tuple[str, str]]]:
        """Readable namespaces, and (folder, problem) for folders whose metadata is damaged.

        A damaged ``namespace.json`` is rebuilt from ``manifest.json`` when that names the same
        digest (written back when the store is writable).
        """
        found, bad = [], []
        folders = {p.parent for p in self.root.glob(f"*/*/{NAMESPACE}")}
        folders |= {p.parent for p in self.root.glob("*/*/commits")}
        for folder in sorted(folders):
            info, why = _read_info(folder)
            if why is not None and not why.startswith("schema"):
                rebuilt, _ = _read_info(folder, NAMESPACE.replace("namespace", "manifest"))
                if rebuilt is not None:
                    logger.warning("%s: %s; rebuilt from manifest.json", folder / NAMESPACE, why)
                    info, why = {k: rebuilt[k] for k in _INFO_KEYS if k in rebuilt}, None
                    try:
                        with held(folder / LOCK):
                            write_atomic(folder / NAMESPACE, json.dumps(info, indent=2).encode())
                    except OSError:
                        pass  # read-only: the rebuilt record serves this process
            if why is None:
                found.append(Namespace(folder, info))
            else:
                bad.append((f"{folder.parent.name}/{folder.name[:12]}", why))
        return found, bad

    def namespaces(self) -> list[Namespace]:
        found, bad = self._scan()
        for key, why in bad:
            logger.warning("namespace %s is damaged: %s", key, why)
        return found

    def find(self, backbone: str) -> Namespace:
        """A namespace by backbone name (the newest digest), digest or digest prefix (>= 8 hex)."""
        spaces, bad = self._scan()
        by_name = [n for n in spaces if n.name == backbone]
        if by_name:
            # the newest namespace; a rebuilt or upgraded namespace.json keeps its creation time
            return max(by_name, key=lambda n: n.info.get("created") or (n.path / NAMESPACE).stat().st_mtime)
        by_digest = [n for n in spaces if len(backbone) >= 8 and n.digest.startswith(backbone)]
        if len(by_digest) == 1:
            return by_digest[0]
        names = sorted({f"{n.name} ({n.digest[:12]})" for n in spaces}) or ["none"]
        damaged = f"; damaged: {', '.join(f'{k} ({why})' for k, why in bad)}" if bad else ""
        raise StoreError(f"no features for {backbone!r} in {self.root}; present: {', '.join(names)}{damaged}")

    def load(self, backbone: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)`` of a backbone's features; X ``(N, dim)`` float32 memory-mapped, every id once.

        The first load after a commit builds the consolidated cache under ``cache/`` (derived,
        disposable, about the size of the shards again; ``store info`` shows its size).
        """
        return self.find(backbone).load()

    def failures(self, backbone: str) -> list[dict[str, Any]]:
        return self.find(backbone).failures()

    def info(self) -> list[dict[str, Any]]:
        """One row per namespace: ``rows`` (what ``load`` returns), ``shard_rows`` (rows in
        shards, items written by two writers counted twice), ``damaged`` (shards that do not
        open or belong elsewhere, left out of the counts; ``verify`` names them), ``bytes``
        (everything but the cache) and ``cache_bytes`` (the derived cache, deletable)."""
        out = []
        for ns in self.namespaces():
            records = ns.commits()
            stored, failed, damaged = ns.served_view()
            cache_bytes = ns.cache_bytes()
            size = sum(p.stat().st_size for p in ns.path.rglob("*") if p.is_file())
            out.append({
                "backbone": ns.name, "digest": ns.digest, "dim": ns.dim, "path": str(ns.path),
                "shards": sum(1 for r in records if r.get("rows")), "rows": len(stored),
                "shard_rows": sum(r["rows"] for r in records),
                "failures": len(failed), "damaged": damaged, "bytes": size - cache_bytes, "cache_bytes": cache_bytes,
            })
        return out

    def verify(self, deep: bool = True) -> dict[str, list[Problem]]:
        """Problems per namespace; a namespace whose metadata cannot be read or rebuilt is one problem."""
        spaces, bad = self._scan()
        out = {f"{ns.name}/{ns.digest[:12]}": ns.verify(deep) for ns in spaces}
        for key, why in bad:
            out[key] = [Problem(NAMESPACE, why)]
        return out

    def gc(self) -> dict[str, dict[str, int]]:
        return {f"{ns.name}/{ns.digest[:12]}": ns.gc() for ns in self.namespaces()}


def _read_info(folder: Path, name: str = NAMESPACE) -> tuple[dict[str, Any] | None, str | None]:
    """``(info, None)`` or ``(None, why)``: the record must parse and name this folder's digest."""
    try:
        info = json.loads((folder / name).read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("schema", "backbone", "digest", "dim") if k not in info]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (OSError, ValueError) as exc:
        return None, f"unreadable {name}: {exc}"
    if info["digest"] != folder.name or info["backbone"] != folder.parent.name:
        return None, f"{name} names {info['backbone']}/{str(info['digest'])[:12]}, not this folder"
    if info["schema"] not in READABLE_SCHEMAS:
        return None, (f"schema {info['schema']}: this embedkit reads schemas {READABLE_SCHEMAS}; "
                      "upgrade embedkit, or extract into a new store")
    return info, None
