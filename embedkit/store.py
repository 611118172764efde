"""The feature store: embeddings keyed by (artifact digest, item id), in shards any Arrow reader opens.

Layout::

    STORE/<backbone name>/<artifact digest>/
        namespace.json             digest, backbone, dim, preprocessing, schema version
        shards/<shard>.arrow       Arrow IPC file: id, source (strings), embedding (fixed_size_list<float32>)
        commits/<shard>.json       the commit record: rows, bytes, sha256, failures; written LAST
        manifest.json              summary of all commits (rebuilt after each commit)
        cache/                     consolidated .npy for memory-mapped loading (derived, disposable)

A shard counts only once its commit record exists, and the record is renamed into place only
after the shard file is fsynced and renamed: ``kill -9`` at any moment leaves either a complete
commit or an orphan file that ``gc`` removes and a rerun recomputes. Each writer names its own
shards (time, pid, random), so two processes can write one namespace at once; an item both
computed is read once (the first commit wins). The commit records are the source of truth;
``manifest.json`` is a convenience view for people and tools.

Shards open without embedkit: ``pandas.read_feather``, ``pyarrow.ipc.open_file``,
``polars.read_ipc``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .artifacts import sha256_file
from .atomic import fsync_dir, write_atomic
from .errors import StoreError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NAMESPACE = "namespace.json"


@dataclass
class Problem:
    """A shard or commit record that failed verification."""

    shard: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"shard": self.shard, "reason": self.reason}


@dataclass
class Namespace:
    """The features of one artifact (one backbone at one digest) in a store."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return str(self.info["digest"])

    @property
    def name(self) -> str:
        return str(self.info["backbone"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    # -- reading ----------------------------------------------------------------------------
    def commits(self) -> list[dict[str, Any]]:
        """Readable commit records, oldest first (unreadable ones are reported by :meth:`verify`)."""
        records = []
        folder = self.path / "commits"
        if not folder.is_dir():
            return records
        for path in sorted(folder.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return records

    def _shard_table(self, shard: str) -> Any:
        import pyarrow as pa

        from .paths import member  # the shard name comes from a commit record: keep it inside shards/

        source = pa.memory_map(str(member(self.path / "shards", f"{shard}.arrow", error=StoreError)), "r")
        return pa.ipc.open_file(source).read_all()

    def verify(self, deep: bool = True) -> list[Problem]:
        """Check every commit: its shard exists, has its size, row count and (``deep``) sha256."""
        problems: list[Problem] = []
        folder = self.path / "commits"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            shard = path.stem
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                problems.append(Problem(shard, f"unreadable commit record: {exc}"))
                continue
            if not record.get("rows"):
                continue  # a shard of failures only has no file
            file = self.path / "shards" / f"{shard}.arrow"
            if not file.is_file():
                problems.append(Problem(shard, "shard file missing"))
            elif file.stat().st_size != record["bytes"]:
                problems.append(Problem(shard, f"shard is {file.stat().st_size} bytes, commit says {record['bytes']} (truncated?)"))
            elif deep and sha256_file(file) != record["sha256"]:
                problems.append(Problem(shard, "shard checksum mismatch (corrupted)"))
            else:
                try:
                    rows = self._shard_table(shard).num_rows
                except Exception as exc:  # pyarrow raises several kinds on a damaged file
                    problems.append(Problem(shard, f"shard does not open: {type(exc).__name__}: {exc}"))
                    continue
                if rows != record["rows"]:
                    problems.append(Problem(shard, f"shard has {rows} rows, commit says {record['rows']}"))
        return problems

    def quarantine(self, problems: Sequence[Problem]) -> None:
        """Set bad shards aside (commit record first, so the items count as missing again)."""
        target = self.path / "quarantine"
        target.mkdir(exist_ok=True)
        for p in problems:
            for src in (self.path / "commits" / f"{p.shard}.json", self.path / "shards" / f"{p.shard}.arrow"):
                if src.exists():
                    os.replace(src, target / src.name)
            logger.warning("quarantined shard %s of %s: %s", p.shard, self.name, p.reason)
        if problems:
            fsync_dir(self.path / "commits")
            self.write_manifest()

    def done_ids(self) -> set[str]:
        """Ids with a committed embedding."""
        done: set[str] = set()
        for record in self.commits():
            if record.get("rows"):
                done.update(self._shard_table(record["shard"]).column("id").to_pylist())
        return done

    def failures(self) -> list[dict[str, Any]]:
        """Failure records of items that have no embedding (a later success supersedes a failure)."""
        done = self.done_ids()
        latest: dict[str, dict[str, Any]] = {}
        for record in self.commits():
            for failure in record.get("failures", []):
                latest[failure["id"]] = failure
        return [f for i, f in latest.items() if i not in done]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)``: every committed item once (first commit wins), X memory-mapped float32."""
        ids, X, _ = self.load_with_sources()
        return ids, X

    def load_with_sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, X, sources)``; ``sources`` are the items' locators (paths, ``file:row N``)."""
        records = [r for r in self.commits() if r.get("rows")]
        key = _cache_key(records)
        cache = self.path / "cache"
        ids_path, x_path, src_path = cache / f"{key}.ids.npy", cache / f"{key}.x.npy", cache / f"{key}.src.npy"
        if not (ids_path.is_file() and x_path.is_file() and src_path.is_file()):
            self._consolidate(records, ids_path, x_path, src_path)
        return (np.load(ids_path, allow_pickle=False), np.load(x_path, mmap_mode="r"),
                np.load(src_path, allow_pickle=False))

    def _consolidate(self, records: list[dict[str, Any]], ids_path: Path, x_path: Path, src_path: Path) -> None:
        ids_path.parent.mkdir(exist_ok=True)
        seen: set[str] = set()
        keep: list[tuple[str, np.ndarray]] = []
        total = 0
        for record in records:  # first pass: which rows of which shard survive dedupe
            column = self._shard_table(record["shard"]).column("id").to_pylist()
            mask = np.zeros(len(column), dtype=bool)
            for i, item in enumerate(column):
                if item not in seen:
                    seen.add(item)
                    mask[i] = True
            keep.append((record["shard"], mask))
            total += int(mask.sum())
        tmp = x_path.with_name(f".{x_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        X = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, self.dim))
        ids: list[str] = []
        sources: list[str] = []
        row = 0
        for shard, mask in keep:  # second pass: copy one shard at a time (bounded memory)
            table = self._shard_table(shard)
            vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, self.dim)
            n = int(mask.sum())
            X[row:row + n] = vectors[mask]
            ids.extend(np.asarray(table.column("id").to_pylist(), dtype=object)[mask].tolist())
            if "source" in table.column_names:
                sources.extend(np.asarray(table.column("source").to_pylist(), dtype=object)[mask].tolist())
            else:
                sources.extend([""] * n)
            row += n
        X.flush()
        del X
        os.replace(tmp, x_path)
        write_atomic(src_path, _npy_bytes(np.asarray(sources, dtype=str) if sources else np.empty(0, dtype="<U1")))
        buf = _npy_bytes(np.asarray(ids, dtype=str) if ids else np.empty(0, dtype="<U1"))
        write_atomic(ids_path, buf)  # written last: its presence marks a complete consolidation
        for old in ids_path.parent.iterdir():  # older consolidations are derived data
            if old.name.split(".")[0] != ids_path.name.split(".")[0] and not old.name.startswith("."):
                old.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------------------
    def commit(self, ids: Sequence[str], vectors: np.ndarray, sources: Sequence[str] | None = None,
               failures: Sequence[dict[str, Any]] = (), stats: dict[str, Any] | None = None) -> str:
        """Write one shard (embeddings + failure records) and commit it; returns the shard name."""
        import pyarrow as pa

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise StoreError(f"commit: {len(ids)} ids but vectors of shape {vectors.shape} (dim {self.dim})")
        if len(ids) and not np.isfinite(vectors).all():
            raise StoreError("commit: non-finite embeddings never enter the store")
        shard = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        record: dict[str, Any] = {
            "shard": shard, "rows": len(ids), "bytes": 0, "sha256": None,
            "failures": list(failures), "stats": stats or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if len(ids):
            shards = self.path / "shards"
            shards.mkdir(exist_ok=True)
            columns = {"id": pa.array(list(ids), type=pa.string())}
            if sources is not None:
                columns["source"] = pa.array(list(sources), type=pa.string())
            table = pa.table({
                **columns,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim),
            }).replace_schema_metadata({
                "embedkit.digest": self.digest, "embedkit.backbone": self.name,
                "embedkit.schema": str(SCHEMA_VERSION),
            })
            tmp = shards / f".{shard}.arrow.tmp"
            with pa.OSFile(str(tmp), "wb") as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            final = shards / f"{shard}.arrow"
            os.replace(tmp, final)
            fsync_dir(shards)
            record["bytes"] = final.stat().st_size
            record["sha256"] = sha256_file(final)
        commits = self.path / "commits"
        commits.mkdir(exist_ok=True)
        write_atomic(commits / f"{shard}.json", json.dumps(record).encode())  # the commit point
        self.write_manifest()
        return shard

    def write_manifest(self) -> None:
        records = self.commits()
        manifest = dict(self.info)
        manifest["shards"] = [
            {"shard": r["shard"], "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"],
             "failures": len(r.get("failures", []))}
            for r in records
        ]
        manifest["rows"] = sum(r["rows"] for r in records)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_atomic(self.path / "manifest.json", json.dumps(manifest, indent=2).encode())

    def gc(self) -> dict[str, int]:
        """Remove orphan shards (no commit record), temp files, quarantined shards, stale caches."""
        removed = {"orphan_shards": 0, "temp_files": 0, "quarantined": 0, "cache_files": 0}
        committed = {p.stem for p in (self.path / "commits").glob("*.json")}
        for path in (self.path / "shards").glob("*") if (self.path / "shards").is_dir() else []:
            if path.name.startswith("."):
                path.unlink(missing_ok=True)
                removed["temp_files"] += 1
            elif path.stem not in committed:
                path.unlink(missing_ok=True)
                removed["orphan_shards"] += 1
        for path in self.path.glob("*/.*.tmp"):
            path.unlink(missing_ok=True)
            removed["temp_files"] += 1
        if (self.path / "quarantine").is_dir():
            removed["quarantined"] = len(list((self.path / "quarantine").iterdir()))
            shutil.rmtree(self.path / "quarantine")
        if (self.path / "cache").is_dir():
            current = _cache_key([r for r in self.commits() if r.get("rows")])
            for path in (self.path / "cache").iterdir():
                if not path.name.startswith(current):
                    path.unlink(missing_ok=True)
                    removed["cache_files"] += 1
        return removed


def _cache_key(records: Iterable[dict[str, Any]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['shard']}:{r['sha256']}\n".encode())
    return h.hexdigest()[:16]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class FeatureStore:
    """A folder of namespaces, one per exported artifact (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.root = Path(path)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def namespace(self, artifact: Any) -> Namespace:
        """The namespace of an artifact, created on first use."""
        folder = self.root / artifact.name / artifact.digest
        info = {
            "schema": SCHEMA_VERSION,
            "backbone": artifact.name,
            "digest": artifact.digest,
            "dim": artifact.dim,
            "modality": artifact.modality,
            "preprocess": artifact.manifest.get("preprocess"),
        }
        path = folder / NAMESPACE
        if path.is_file():
            existing = json.loads(path.read_text())
            if existing.get("schema") != SCHEMA_VERSION:
                raise StoreError(f"{folder} has schema {existing.get('schema')}, this embedkit writes {SCHEMA_VERSION}")
            return Namespace(folder, existing)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(info, indent=2).encode())
        return Namespace(folder, info)

    def namespaces(self) -> list[Namespace]:
        found = []
        for path in sorted(self.root.glob(f"*/*/{NAMESPACE}")):
            try:
                found.append(Namespace(path.parent, json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("unreadable namespace %s: %s", path.parent, exc)
        return found

    def find(self, backbone: str) -> Namespace:
        """A namespace by backbone name (the newest digest), digest or digest prefix (>= 8 hex)."""
        spaces = self.namespaces()
        by_name = [n for n in spaces if n.name == backbone]
        if by_name:
            return max(by_name, key=lambda n: (n.path / NAMESPACE).stat().st_mtime)
        by_digest = [n for n in spaces if len(backbone) >= 8 and n.digest.startswith(backbone)]
        if len(by_digest) == 1:
            return by_digest[0]
        names = sorted({f"{n.name} ({n.digest[:12]})" for n in spaces}) or ["none"]
        raise StoreError(f"no features for {backbone!r} in {self.root}; present: {', '.join(names)}")

    def load(self, backbone: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)`` of a backbone's features; X is memory-mapped, every id once."""
        return self.find(backbone).load()

    def failures(self, backbone: str) -> list[dict[str, Any]]:
        return self.find(backbone).failures()

    def info(self) -> list[dict[str, Any]]:
        out = []
        for ns in self.namespaces():
            records = ns.commits()
            size = sum(p.stat().st_size for p in ns.path.rglob("*") if p.is_file())
            out.append({
                "backbone": ns.name, "digest": ns.digest, "dim": ns.dim, "path": str(ns.path),
                "shards": sum(1 for r in records if r.get("rows")), "rows": sum(r["rows"] for r in records),
                "failures": len(ns.failures()), "bytes": size,
            })
        return out

    def verify(self, deep: bool = True) -> dict[str, list[Problem]]:
        return {f"{ns.name}/{ns.digest[:12]}": ns.verify(deep) for ns in self.namespaces()}

    def gc(self) -> dict[str, dict[str, int]]:
        return {f"{ns.name}/{ns.digest[:12]}": ns.gc() for ns in self.namespaces()}

