"""One namespace of a feature store: the features of one artifact, read and written safely.

Reading rule (every read path: ``load``, ``failures``, what ``extract`` skips): commit records
are taken in commit order; for each id the **latest event wins**: a row in a later shard
replaces an earlier row (an id whose content changed was recomputed), a failure record
after the id's last row means the id has no valid vector (it failed or named two contents).
Every shard read is checked to belong here (its metadata names this digest and variant, its
``embedding`` column has this namespace's dtype and width); building the cache also checks each
shard's size and sha256 against its commit record. Variants (chunked texts, compact vectors:
:mod:`embedkit.features.variants`) store ``embedding`` as ``fixed_size_list<float32 | int8 |
uint8>`` of the row width (:attr:`Namespace.width`).

Concurrency: see :mod:`embedkit.fs.locks`. ``commit`` and every reader hold the namespace lock
shared; ``gc`` and ``quarantine`` hold it exclusive, so maintenance never removes what a live
process is writing or reading. Verification and quarantine are :mod:`embedkit.features.verification`,
``gc`` is :mod:`embedkit.features.garbage`.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..encoders.compact import Compact
from ..errors import StoreError, StoreWriteError
from ..fs.atomic import fsync_dir, write_atomic
from ..fs.locks import held
from ..fs.paths import member
from ..models.store import sha256_file
from . import cache, chunk_rows, garbage, variants, verification
from .garbage import GC_WAIT
from .verification import Problem

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: shards carry a ``content`` fingerprint column beside user ids
READABLE_SCHEMAS = (1, 2)
NAMESPACE = "namespace.json"
LOCK = ".lock"


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
        """The backbone's dimension D (a compact variant's rows may keep fewer: :attr:`width`)."""
        return int(self.info["dim"])

    # The variant (see :mod:`.variants`): ``variant`` is ``{}`` when plain; ``compact`` the Compact of the
    # stored rows (``Compact()``: float32, all dims); ``tag`` the folder suffix; ``key`` how reports name
    # it (``backbone/digest12[.tag]``); ``width`` and ``dtype`` a stored row's columns and dtype.
    @property
    def variant(self) -> dict[str, Any]:
        return variants.normalize(self.info.get("variant"))

    @property
    def compact(self) -> Compact:
        return variants.compact_of(self.variant)

    @property
    def tag(self) -> str:
        return variants.tag(self.variant)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.digest[:12]}" + (f".{self.tag}" if self.tag else "")

    @property
    def width(self) -> int:
        return self.compact.width(self.dim)

    @property
    def dtype(self) -> np.dtype:
        return self.compact.dtype

    def _lock(self, exclusive: bool = False, wait: float | None = None) -> Any:
        return held(self.path / LOCK, exclusive, wait)

    # -- commit records and shards ----------------------------------------------------------
    def commits(self) -> list[dict[str, Any]]:
        """Readable commit records, oldest first (damaged or foreign ones are reported by :meth:`verify`)."""
        return [record for _, record, why in self._scan() if why is None]

    def _scan(self) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """``(shard, record, problem)`` for every commit record, in commit order."""
        folder = self.path / "commits"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or "rows" not in record:
                    raise ValueError("not a commit record")
            except (OSError, ValueError) as exc:
                yield path.stem, {}, f"unreadable commit record: {exc}"
                continue
            if record.get("shard") != path.stem:
                yield path.stem, record, f"commit record names shard {record.get('shard')!r} (copied or renamed?)"
            elif record.get("digest", self.digest) != self.digest:
                yield path.stem, record, f"commit record of digest {str(record['digest'])[:12]}, not this namespace"
            else:
                yield path.stem, record, None

    def _shard_table(self, shard: str, columns: Sequence[str] | None = None) -> Any:
        """The Arrow table of a shard, refused unless its metadata names this digest and variant
        and its rows have this namespace's dtype and width."""
        import pyarrow as pa

        source = pa.memory_map(os.fsencode(member(self.path / "shards", f"{shard}.arrow", error=StoreError)), "r")
        reader = pa.ipc.open_file(source)
        meta = reader.schema.metadata or {}
        digest = meta.get(b"embedkit.digest", b"").decode()
        if digest != self.digest:
            raise StoreError(f"shard {shard} in {self.path} belongs to digest {digest[:12] or '(none)'}, not "
                             f"{self.digest[:12]} (copied from another namespace?); `embedkit store verify` lists "
                             "it and a rerun of extract sets it aside")
        variant = meta.get(b"embedkit.variant", b"").decode()
        if variant != self.tag:
            raise StoreError(f"shard {shard} in {self.path} holds vectors of variant {variant or 'plain'}, not "
                             f"{self.tag or 'plain'} (copied from another namespace?)")
        kind = reader.schema.field("embedding").type
        width, values = kind.list_size, np.dtype(kind.value_type.to_pandas_dtype())
        if width != self.width or values != self.dtype:
            raise StoreError(f"shard {shard} has {width} x {values} embeddings, namespace holds {self.width} x "
                             f"{self.dtype}")
        table = reader.read_all()
        return table.select(list(columns)) if columns else table

    def _check(self, shard: str, record: dict[str, Any], deep: bool) -> str | None:
        """Why a committed shard cannot be served (None when whole and ours)."""
        if not record.get("rows"):
            return None  # a shard of failures only has no file
        file = self.path / "shards" / f"{shard}.arrow"
        if not file.is_file():
            return "shard file missing"
        if file.stat().st_size != record["bytes"]:
            return f"shard is {file.stat().st_size} bytes, commit says {record['bytes']} (truncated?)"
        if deep and sha256_file(file) != record["sha256"]:
            return "shard checksum mismatch (corrupted)"
        try:
            rows = self._shard_table(shard, ["id"]).num_rows
        except StoreError as exc:
            return str(exc)
        except Exception as exc:  # pyarrow raises several kinds on a damaged file
            return f"shard does not open: {type(exc).__name__}: {exc}"
        if rows != record["rows"]:
            return f"shard has {rows} rows, commit says {record['rows']}"
        return None

    def verify(self, deep: bool = True) -> list[Problem]:
        """Check every commit (its shard exists, belongs here, has its size, rows and, ``deep``,
        sha256) and the consolidated cache of the current commits, if one was built."""
        return verification.verify(self, deep)

    def quarantine(self, problems: Sequence[Problem]) -> None:
        """Set bad shards aside (commit record first, so the items count as missing again);
        a damaged cache is deleted (it is rebuilt from the shards)."""
        verification.quarantine(self, problems)

    # -- the served view ----------------------------------------------------------------------
    def _events(self, records: Sequence[dict[str, Any]], skip_bad: list[str] | None = None,
                ) -> tuple[dict[str, tuple[int, int, str]], dict[str, dict]]:
        """``(served, failed)``: id -> (record index, row, fingerprint) of its latest row, and
        id -> failure record for ids whose latest event is a failure. A shard that does not
        open or belongs elsewhere raises StoreError, or with ``skip_bad`` is left out and named there."""
        served: dict[str, tuple[int, int, str]] = {}
        failed: dict[str, dict[str, Any]] = {}
        for n, record in enumerate(records):
            if record.get("rows"):
                try:
                    table = self._shard_table(record["shard"])  # memory-mapped: only what is read is paged in
                except StoreError:
                    if skip_bad is None:
                        raise
                    skip_bad.append(record["shard"])
                    continue
                except Exception as exc:  # pyarrow raises several kinds on a damaged file
                    if skip_bad is None:
                        raise StoreError(f"shard {record['shard']} of {self.path} does not open: {exc}; "
                                         "a rerun of extract sets it aside and recomputes its items") from exc
                    skip_bad.append(record["shard"])
                    continue
                ids = table.column("id").to_pylist()
                fps = table.column("content").to_pylist() if "content" in table.column_names else [None] * len(ids)
                for row, (item, fp) in enumerate(zip(ids, fps)):
                    served[item] = (n, row, fp or "")
                    failed.pop(item, None)
            for failure in record.get("failures", []):
                served.pop(failure["id"], None)
                failed[failure["id"]] = failure
        return (chunk_rows.by_parent(records, served) if self.variant.get("rows") else served), failed

    def served_view(self) -> tuple[dict[str, str], list[dict[str, Any]], int]:
        """``(served ids -> fingerprint, failure records, damaged shards)``, leaving damaged
        shards out instead of raising (for ``store info``)."""
        bad: list[str] = []
        with self._lock():
            served, failed = self._events(self.commits(), skip_bad=bad)
        return {item: fp for item, (_, _, fp) in served.items()}, list(failed.values()), len(bad)

    def stored(self) -> dict[str, str]:
        """Served ids -> content fingerprint ("" when unknown: content ids, schema-1 shards)."""
        with self._lock():
            served, _ = self._events(self.commits())
        return {item: fp for item, (_, _, fp) in served.items()}

    def done_ids(self) -> set[str]:
        """Ids with a served embedding."""
        return set(self.stored())

    def failures(self) -> list[dict[str, Any]]:
        """Failure records of ids without a served embedding (the latest event of an id wins)."""
        with self._lock():
            _, failed = self._events(self.commits())
        return list(failed.values())

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)``: every served item once, X ``(N, width)`` memory-mapped: float32 ``(N, D)``
        when plain, int8 / uint8 ``(N, d)`` or packed bits uint8 ``(N, ceil(d / 8))`` when compact."""
        ids, X, _, _ = self.load_all()
        return ids, X

    def load_with_sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, X, sources)``; ``sources`` are the items' locators (paths, ``file:row N``)."""
        ids, X, sources, _ = self.load_all()
        return ids, X, sources

    def load_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, X, sources, fingerprints)`` from the checksummed cache, built when missing or damaged.

        The cache (see :mod:`embedkit.features.cache`) is derived and disposable. On a read-only or full
        store it is built in a temporary folder instead (and in memory if that fails too).
        Raises StoreError when a committed shard is damaged or foreign (``extract`` sets such
        shards aside and recomputes their items).
        """
        with self._lock():
            records = self._records_or_raise()
            key = cache.cache_key(records)
            arrays = cache.load(self, records, key)
        self._prune(key)
        return arrays

    def _records_or_raise(self) -> list[dict[str, Any]]:
        records, bad = [], []
        for shard, record, why in self._scan():
            if why:
                bad.append(f"{shard}: {why}")
            else:
                records.append(record)
        if bad:
            raise StoreError(f"{len(bad)} damaged or foreign commit record(s) in {self.path}: {'; '.join(bad[:3])}; "
                             "a rerun of extract sets them aside and recomputes their items")
        return records

    def _prune(self, key: str) -> None:
        """Remove caches of older commits when no other process reads or writes (never waits)."""
        folder = self.path / "cache"
        try:
            if any(not p.name.startswith(key + ".") for p in folder.iterdir()):
                with self._lock(exclusive=True, wait=0) as got:
                    if got:
                        cache.remove_others(folder, key)
        except OSError:
            pass  # read-only store or no cache folder: nothing to prune

    # -- writing ----------------------------------------------------------------------------
    def commit(self, ids: Sequence[str], vectors: np.ndarray, sources: Sequence[str] | None = None,
               failures: Sequence[dict[str, Any]] = (), stats: dict[str, Any] | None = None,
               contents: Sequence[str | None] | None = None, extra_columns: dict[str, Any] | None = None) -> str:
        """Write one shard (embeddings + failure records) and commit it; returns the shard name.

        ``vectors`` are ``(len(ids), width)`` of :attr:`dtype`: float (cast to float32) in a float
        namespace, exactly int8 / uint8 in a compact one. ``contents`` are the items' content
        fingerprints (given when ids are user ids), so a later run can tell that an id's content
        changed; ``extra_columns`` (name -> a value per id) are stored beside (chunk rows' spans).
        Raises StoreError on a wrong dtype or shape or non-finite vectors, StoreWriteError (an
        OSError) when the store cannot be written; then nothing of this shard is left behind.
        """
        import pyarrow as pa

        vectors = variants.commit_rows(self.key, self.compact, self.dim, len(ids), vectors)
        if contents is not None and len(contents) != len(ids):
            raise StoreError(f"commit: {len(ids)} ids but {len(contents)} content fingerprints")
        shard = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        record: dict[str, Any] = {
            "shard": shard, "digest": self.digest, "rows": len(ids), "bytes": 0, "sha256": None,
            "failures": list(failures), "stats": stats or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        target = shards = self.path / "shards"
        tmp, final = shards / f".{shard}.arrow.tmp", shards / f"{shard}.arrow"
        with self._lock():
            try:
                if len(ids):
                    shards.mkdir(exist_ok=True)
                    columns = {"id": pa.array(list(ids), type=pa.string())}
                    if sources is not None:
                        columns["source"] = pa.array(list(sources), type=pa.string())
                    if contents is not None:
                        columns["content"] = pa.array([c or None for c in contents], type=pa.string())
                    columns.update({k: pa.array(np.asarray(v).tolist()) for k, v in (extra_columns or {}).items()})
                    table = pa.table({
                        **columns,
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.width),
                    }).replace_schema_metadata({
                        "embedkit.digest": self.digest, "embedkit.backbone": self.name,
                        "embedkit.schema": str(SCHEMA_VERSION),
                        **({"embedkit.variant": self.tag} if self.tag else {}),
                    })
                    target = tmp
                    with pa.OSFile(os.fsencode(tmp), "wb") as sink:
                        with pa.ipc.new_file(sink, table.schema) as writer:
                            writer.write_table(table)
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    os.replace(tmp, final)
                    fsync_dir(shards)
                    record["bytes"] = final.stat().st_size
                    record["sha256"] = sha256_file(final)
                commits = self.path / "commits"
                target = commits
                commits.mkdir(exist_ok=True)
                target = commits / f"{shard}.json"
                write_atomic(target, json.dumps(record).encode())  # the commit point
            except OSError as exc:
                leftovers = [tmp, final, *(self.path / "commits").glob(f".{shard}.json.*.tmp")]
                for left in leftovers:  # never committed: ours to remove
                    _discard(left)
                raise StoreWriteError(target, exc) from exc
            try:
                self.write_manifest()
            except OSError as exc:  # committed already; the manifest is a view rebuilt by the next commit
                logger.warning("could not update %s: %s", self.path / "manifest.json", exc)
        return shard

    def check_writable(self) -> None:
        """Raise StoreWriteError now when the namespace cannot be written (before any compute)."""
        probe = self.path / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            probe.write_bytes(b"")
        except OSError as exc:
            raise StoreWriteError(self.path, exc) from exc
        finally:
            _discard(probe)

    def write_manifest(self) -> None:
        """Rewrite ``manifest.json`` from the commit records (again if another writer committed meanwhile)."""
        for _ in range(5):
            names = sorted((self.path / "commits").glob("*.json"))
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
            if sorted((self.path / "commits").glob("*.json")) == names:
                return  # no commit landed meanwhile: the view is current

    def cache_bytes(self) -> int:
        return cache.size(self.path / "cache")

    def gc(self, wait: float = GC_WAIT) -> dict[str, int]:
        """Remove orphan shards (no commit record), temp files, quarantined shards, stale caches.

        Runs only while no other process reads or writes this namespace (the lock held
        exclusive, waiting up to ``wait`` seconds); otherwise removes nothing and reports
        ``busy: 1`` (run it again later). Raises StoreWriteError when something to remove
        cannot be removed (read-only store).
        """
        return garbage.collect(self, wait)


def _discard(path: Path) -> None:
    """Remove a file of ours if it is there and can be removed (a read-only store keeps none)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
