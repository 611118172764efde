"""The feature store: embeddings keyed by (artifact digest, item id), in shards any Arrow reader opens.

Layout::

    STORE/<backbone name>/<artifact digest>[.<variant tag>]/
        namespace.json             digest, backbone, dim, preprocessing, schema version, variant
        shards/<shard>.arrow       Arrow IPC file: id, source, content (strings; content: the fingerprint
                                   beside user ids, schema 2), embedding (fixed_size_list<float32>;
                                   compact variants: <int8 | uint8> of the row width)
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

Variants (:mod:`embedkit.features.variants`): vectors of one artifact made another way (long
texts chunked and pooled; compact int8 / uint8 / binary or truncated vectors) live in a
namespace of their own, ``<digest>.<tag>``, whose ``namespace.json`` records the ``variant``
(for int8 / uint8, the calibration every vector of it was quantised with). Readers choose by
what they ask (:meth:`FeatureStore.find`): a plain request never gets a variant. Per-chunk rows
(``extract(..., long="chunk", chunk_rows=True)``: every window a row, ``<digest>.chunk-o32-m64.rows``)
are read with :meth:`FeatureStore.chunk_rows` (:mod:`embedkit.features.chunk_rows`).

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

from ..errors import EmbedkitError, StoreError, StoreWriteError
from ..fs.atomic import write_atomic
from ..fs.locks import held
from . import chunk_rows as rows_of
from . import variants
from .namespace import LOCK, NAMESPACE, READABLE_SCHEMAS, SCHEMA_VERSION, Namespace
from .verification import Problem

__all__ = ["FeatureStore", "Namespace", "Problem", "SCHEMA_VERSION"]

logger = logging.getLogger(__name__)

_INFO_KEYS = ("schema", "backbone", "digest", "dim", "modality", "preprocess", "created", "variant")


class FeatureStore:
    """A folder of namespaces, one per exported artifact (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.root = Path(path)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def _folder(self, artifact: Any, variant: dict[str, Any]) -> Path:
        """Where the namespace of ``artifact`` made the (normalised) ``variant`` way lives."""
        return self.root / artifact.name / variants.folder_name(artifact.digest, variant)

    def holds(self, artifact: Any, variant: dict[str, Any] | None = None) -> bool:
        """Whether the namespace of ``artifact`` made the ``variant`` way exists (as :meth:`namespaces`
        finds it: a ``namespace.json`` or a ``commits/`` folder), without creating it."""
        folder = self._folder(artifact, variants.normalize(variant))
        return (folder / NAMESPACE).is_file() or (folder / "commits").is_dir()

    def namespace(self, artifact: Any, variant: dict[str, Any] | None = None) -> Namespace:
        """The namespace of an artifact made one way, created on first use (the writer's entry point).

        ``variant`` (see :mod:`embedkit.features.variants`): None or ``{}`` for the plain
        namespace ``<digest>/``, else e.g. ``{"long": "chunk", "chunk_overlap": 32, "max_chunks":
        64}`` and / or ``{"compact": Compact.describe()}``, in ``<digest>.<tag>/``.

        A damaged ``namespace.json`` is rebuilt from the artifact and ``variant``; a schema-1
        namespace is upgraded (its shards stay readable). Raises UsageError for a malformed
        ``variant``, StoreError for a namespace written by a newer embedkit, StoreWriteError
        (an OSError) when the store cannot be written.
        """
        variant = variants.normalize(variant)
        folder = self._folder(artifact, variant)
        info = {
            "schema": SCHEMA_VERSION,
            "backbone": artifact.name,
            "digest": artifact.digest,
            "dim": artifact.dim,
            "modality": artifact.modality,
            "preprocess": artifact.manifest.get("preprocess"),
            "created": time.time(),
            **({"variant": variant} if variant else {}),
        }
        path = folder / NAMESPACE
        if path.is_file():
            existing, why = _read_info(folder)
            if why is None:
                if existing.get("dim") != artifact.dim:
                    raise StoreError(f"{path} records dim {existing.get('dim')}, the artifact has {artifact.dim}")
                if variants.normalize(existing.get("variant")) != variant:
                    raise StoreError(f"{path} records another variant than the one asked for (same tag "
                                     f"{variants.label(variant)}, other calibration ranges?)")
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
                digest, dot, tag = folder.name.partition(".")
                bad.append((f"{folder.parent.name}/{digest[:12]}{dot}{tag}", why))
        return found, bad

    def namespaces(self) -> list[Namespace]:
        found, bad = self._scan()
        for key, why in bad:
            logger.warning("namespace %s is damaged: %s", key, why)
        return found

    def find(self, backbone: str, *, precision: str = "float32", dimensions: int | None = None,
             long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
             chunk_rows: bool = False) -> Namespace:
        """A namespace by backbone name (the newest digest that has the variant asked for), digest or
        digest prefix (>= 8 hex), and variant.

        The variant is what the vectors are: ``precision`` (``float32`` | ``int8`` | ``uint8`` |
        ``binary``), ``dimensions`` (None: all), ``long`` (``truncate`` | ``chunk``; a chunk
        request may name ``chunk_overlap`` / ``max_chunks``; ``chunk_rows=True`` asks for its
        per-chunk rows instead of its pooled vectors). The defaults ask for the plain float32
        namespace, which a compact or chunked namespace never answers, however new; a request for
        pooled vectors is never answered by per-chunk rows, nor the reverse.

        Raises:
            StoreError: no namespace of that backbone and variant (the message lists what is
                present), or two variants of one digest answer (name ``chunk_overlap`` /
                ``max_chunks``).
            UsageError: an unknown precision or long-text policy, bad dimensions, or
                ``chunk_rows`` without ``long="chunk"`` (or with a compact precision / dimensions).
        """
        want = variants.Wanted(precision, dimensions, long, chunk_overlap, max_chunks, chunk_rows)
        spaces, bad = self._scan()
        named = [n for n in spaces if n.name == backbone]
        if not named and len(backbone) >= 8:
            named = [n for n in spaces if n.digest.startswith(backbone)]
            if len({n.digest for n in named}) > 1:
                named = []  # an ambiguous prefix names nothing
        fits = [n for n in named if want.matches(n.variant, n.dim)]
        if fits:
            # the newest namespace; a rebuilt or upgraded namespace.json keeps its creation time
            best = max(fits, key=lambda n: n.info.get("created") or (n.path / NAMESPACE).stat().st_mtime)
            rivals = [n for n in fits if n.digest == best.digest and n.tag != best.tag]
            if rivals:
                raise variants.rivals_error(best, rivals, want)
            return best
        names = sorted({f"{n.name} ({n.digest[:12]}, {variants.label(n.variant)})" for n in (named or spaces)})
        damaged = f"; damaged: {', '.join(f'{k} ({why})' for k, why in bad)}" if bad else ""
        asked = "" if want == variants.Wanted() else f" ({want.describe()})"
        raise StoreError(f"no features for {backbone!r}{asked} in {self.root}; present: "
                         f"{', '.join(names) or 'none'}{damaged}")

    def load(self, backbone: str, *, precision: str = "float32", dimensions: int | None = None,
             long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
             chunk_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)`` of a backbone's features of one variant (see :meth:`find`), every id once.

        X is memory-mapped, ``(N, width)``: float32 ``(N, D)`` (``(N, d)`` with ``dimensions``)
        for float32, int8 / uint8 ``(N, d)``, packed sign bits uint8 ``(N, ceil(d / 8))`` for
        binary (``Namespace.compact.restore`` maps rows back to approximate floats); with
        ``chunk_rows=True`` the per-chunk rows, ids ``<parent>#<chunk>`` (their spans:
        :meth:`chunk_rows`). The first
        load after a commit builds the consolidated cache under ``cache/`` (derived, disposable,
        about the size of the shards again; ``store info`` shows its size). Raises as :meth:`find`.
        """
        return self.find(backbone, precision=precision, dimensions=dimensions, long=long,
                         chunk_overlap=chunk_overlap, max_chunks=max_chunks, chunk_rows=chunk_rows).load()

    def chunk_rows(self, backbone: str, *, chunk_overlap: int | None = None,
                   max_chunks: int | None = None) -> rows_of.ChunkRows:
        """Every per-chunk row of a backbone's chunked texts (made by ``extract(..., long="chunk",
        chunk_rows=True)``), once: ids ``<parent>#<chunk>``, parent ids, float32 ``(M, D)`` vectors
        (memory-mapped), chunk numbers, token and character spans ``(M, 2)`` int64 and sources (see
        :class:`~embedkit.features.chunk_rows.ChunkRows`); ``text[start:end]`` of a row's
        ``char_span`` is its passage.

        Raises:
            StoreError: no per-chunk rows of ``backbone`` (the message lists what is present), two
                chunk settings answer (name ``chunk_overlap`` / ``max_chunks``), a damaged shard.
        """
        return rows_of.load(self.find(backbone, long="chunk", chunk_overlap=chunk_overlap, max_chunks=max_chunks,
                                      chunk_rows=True))

    def failures(self, backbone: str, **variant: Any) -> list[dict[str, Any]]:
        """Failure records of the namespace :meth:`find` gives for ``backbone`` and ``variant``."""
        return self.find(backbone, **variant).failures()

    def info(self) -> list[dict[str, Any]]:
        """One row per namespace: ``rows`` (what ``load`` returns), ``shard_rows`` (rows in
        shards, items written by two writers counted twice), ``damaged`` (shards that do not
        open or belong elsewhere, left out of the counts; ``verify`` names them), ``bytes``
        (everything but the cache) and ``cache_bytes`` (the derived cache, deletable); the
        ``variant`` (its tag, ``""`` when plain; ``precision``, ``dimensions`` kept, ``long``,
        ``chunk_rows``: whether its rows are windows),
        ``vector_bytes`` (one vector's values: 4 d float32, d int8 / uint8, ceil(d / 8) binary)
        and ``bytes_per_row`` (shard bytes per stored row: the vector, its id, source and
        fingerprint strings and Arrow's framing; 0.0 when no rows)."""
        out = []
        for ns in self.namespaces():
            records = ns.commits()
            stored, failed, damaged = ns.served_view()
            cache_bytes = ns.cache_bytes()
            size = sum(p.stat().st_size for p in ns.path.rglob("*") if p.is_file())
            shard_rows = sum(r["rows"] for r in records)
            compact = ns.compact
            out.append({
                "backbone": ns.name, "digest": ns.digest, "dim": ns.dim, "path": str(ns.path),
                "variant": ns.tag, "precision": compact.precision, "dimensions": compact.output_dim(ns.dim),
                "long": ns.variant.get("long", "truncate"), "chunk_rows": bool(ns.variant.get("rows")),
                "shards": sum(1 for r in records if r.get("rows")), "rows": len(stored),
                "shard_rows": shard_rows,
                "failures": len(failed), "damaged": damaged, "bytes": size - cache_bytes, "cache_bytes": cache_bytes,
                "vector_bytes": variants.vector_bytes(compact, ns.dim),
                "bytes_per_row": sum(r["bytes"] for r in records) / shard_rows if shard_rows else 0.0,
            })
        return out

    def verify(self, deep: bool = True) -> dict[str, list[Problem]]:
        """Problems per namespace; a namespace whose metadata cannot be read or rebuilt is one problem."""
        spaces, bad = self._scan()
        out = {ns.key: ns.verify(deep) for ns in spaces}
        for key, why in bad:
            out[key] = [Problem(NAMESPACE, why)]
        return out

    def gc(self) -> dict[str, dict[str, int]]:
        return {ns.key: ns.gc() for ns in self.namespaces()}


def _read_info(folder: Path, name: str = NAMESPACE) -> tuple[dict[str, Any] | None, str | None]:
    """``(info, None)`` or ``(None, why)``: the record must parse and name this folder's digest and
    variant (the folder is ``<digest>`` when plain, ``<digest>.<tag>`` for a variant)."""
    try:
        info = json.loads((folder / name).read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("schema", "backbone", "digest", "dim") if k not in info]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (OSError, ValueError) as exc:
        return None, f"unreadable {name}: {exc}"
    try:
        variant = variants.normalize(info.get("variant"))
    except EmbedkitError as exc:
        return None, f"{name} records a malformed variant: {exc}"
    if variants.folder_name(str(info["digest"]), variant) != folder.name or info["backbone"] != folder.parent.name:
        tag = variants.tag(variant)
        return None, f"{name} names {info['backbone']}/{str(info['digest'])[:12]}{'.' * bool(tag)}{tag}, not this folder"
    if info["schema"] not in READABLE_SCHEMAS:
        return None, (f"schema {info['schema']}: this embedkit reads schemas {READABLE_SCHEMAS}; "
                      "upgrade embedkit, or extract into a new store")
    return info, None
