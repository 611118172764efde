"""The consolidated cache of a namespace: derived, checksummed, disposable.

``load`` copies the served rows of every shard into one ``.npy`` per array
(``<key>.x.npy`` ``(N, width)`` of the namespace's dtype: float32, or int8 / uint8 for compact
variants; ``<key>.ids.npy``, ``<key>.src.npy``, ``<key>.fp.npy``) so later loads memory-map
them. ``<key>.json`` is written last: it records the namespace digest and variant, the shape,
the dtype and each file's size and CRC-32, and every load checks them (reading the
cache once, about 1.5 GB/s), so a flipped
or truncated cache is rebuilt from the shards, never served. The key hashes the commit records,
so any new commit makes a new cache. The cache roughly doubles the store's size on disk;
``embedkit store gc`` removes caches of older commits, and deleting ``cache/`` loses nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import StoreError
from ..fs.atomic import write_atomic

logger = logging.getLogger(__name__)

PARTS = ("x", "ids", "src", "fp")


def cache_key(records: Iterable[dict[str, Any]]) -> str:
    """A key of the commit records (shard, checksum, failure count): new commits, new key."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['shard']}:{r.get('sha256')}:{len(r.get('failures', []))}\n".encode())
    return h.hexdigest()[:16]


def files(folder: Path, key: str) -> dict[str, Path]:
    return {part: folder / f"{key}.{part}.npy" for part in PARTS}


def problem(folder: Path, key: str, digest: str, variant: str = "") -> str | None:
    """Why the cache ``key`` in ``folder`` cannot be served (None when it is whole and ours);
    ``variant`` is the namespace's variant tag (``""``: plain)."""
    meta_path = folder / f"{key}.json"
    if not meta_path.is_file():
        return "no complete cache"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") != digest:
            return f"cache of digest {str(meta.get('digest'))[:12]}, not {digest[:12]}"
        if meta.get("variant", "") != variant:
            return f"cache of variant {meta.get('variant') or 'plain'}, not {variant or 'plain'}"
        for part, path in files(folder, key).items():
            want = meta["files"][part]
            if not path.is_file():
                return f"{path.name} missing"
            if path.stat().st_size != want["bytes"]:
                return f"{path.name} is {path.stat().st_size} bytes, recorded {want['bytes']} (truncated?)"
            if _crc32(path) != want["crc32"]:
                return f"{path.name} checksum mismatch (corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable cache record: {exc}"
    return None


def read(folder: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, X, sources, fingerprints)`` of a cache that :func:`problem` accepted; X memory-mapped."""
    f = files(folder, key)
    return (np.load(f["ids"], allow_pickle=False), np.load(f["x"], mmap_mode="r"),
            np.load(f["src"], allow_pickle=False), np.load(f["fp"], allow_pickle=False))


def build(folder: Path, key: str, digest: str, dim: int, total: int,
          chunks: Iterator[tuple[np.ndarray, list[str], list[str], list[str]]],
          dtype: Any = np.float32, variant: str = "") -> None:
    """Write the cache ``key`` from ``chunks`` of (vectors, ids, sources, fingerprints): X is
    ``(total, dim)`` of ``dtype`` (``dim``: the row width), ``variant`` the namespace's tag.

    Raises OSError when ``folder`` cannot be written (read-only, full); temporary files are
    removed then, and a cache without its ``.json`` record is never served.
    """
    folder.mkdir(exist_ok=True)
    f = files(folder, key)
    tmp = f["x"].with_name(f".{f['x'].name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        X = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(total, dim))
        ids: list[str] = []
        sources: list[str] = []
        fps: list[str] = []
        row = 0
        for vectors, chunk_ids, chunk_sources, chunk_fps in chunks:  # one shard at a time
            X[row:row + len(vectors)] = vectors
            row += len(vectors)
            ids.extend(chunk_ids)
            sources.extend(chunk_sources)
            fps.extend(chunk_fps)
        X.flush()
        del X
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, f["x"])
    finally:
        tmp.unlink(missing_ok=True)
    meta: dict[str, Any] = {"digest": digest, "rows": total, "dim": dim, "files": {},
                            **({"variant": variant, "dtype": np.dtype(dtype).name} if variant else {})}
    for part, values in (("ids", ids), ("src", sources), ("fp", fps)):
        write_atomic(f[part], _npy_bytes(values))
    for part, path in f.items():
        meta["files"][part] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    write_atomic(folder / f"{key}.json", json.dumps(meta, indent=2).encode())  # last: the cache is whole


def load(ns: Any, records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, X, sources, fingerprints)`` of namespace ``ns`` at commit records ``records``.

    Serves the cache ``key`` when :func:`problem` accepts it; otherwise checks every shard
    (size, sha256, identity: StoreError when one is damaged or foreign) and rebuilds it in
    ``cache/``, or in a temporary folder when that cannot be written (read-only, full), or in
    memory when neither can. The caller holds the namespace lock shared.
    """
    folder = ns.path / "cache"
    why = problem(folder, key, ns.digest, ns.tag)
    if why is None:
        return read(folder, key)
    if why != "no complete cache":
        logger.warning("cache of %s (%s): %s; rebuilding it from the shards", ns.name, folder, why)
    bad = [f"{r['shard']}: {why}" for r in records if (why := ns._check(r["shard"], r, deep=True))]
    if bad:
        raise StoreError(f"{len(bad)} damaged or foreign shard(s) in {ns.path}: {'; '.join(bad[:3])}; "
                         "a rerun of extract sets them aside and recomputes their items")
    served, _ = ns._events(records)
    try:
        build(folder, key, ns.digest, ns.width, len(served), _chunks(ns, records, served), ns.dtype, ns.tag)
        return read(folder, key)
    except OSError as exc:
        logger.info("cannot write the cache %s (%s); caching in a temporary folder", folder, exc.strerror or exc)
    tmp = Path(tempfile.mkdtemp(prefix="embedkit-cache-"))
    try:
        build(tmp, key, ns.digest, ns.width, len(served), _chunks(ns, records, served), ns.dtype, ns.tag)
        return read(tmp, key)  # memory-mapped: the mapping outlives the deleted file
    except OSError as exc:
        logger.info("cannot write a temporary cache (%s); loading into memory", exc.strerror or exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts = list(_chunks(ns, records, served))
    X = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, ns.width), ns.dtype)
    ids, sources, fps = ([v for p in parts for v in p[i]] for i in (1, 2, 3))
    return _strings(ids), X, _strings(sources), _strings(fps)


def _chunks(ns: Any, records: list[dict[str, Any]], served: dict[str, tuple[int, int, str]]) -> Iterator[Any]:
    """(vectors, ids, sources, fingerprints) of the served rows, one shard at a time (bounded memory)."""
    rows_of: dict[int, list[int]] = {}
    for n, row, _ in served.values():
        rows_of.setdefault(n, []).append(row)
    for n, record in enumerate(records):
        if n not in rows_of:
            continue
        rows = np.asarray(sorted(rows_of[n]))
        table = ns._shard_table(record["shard"])
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, ns.width)[rows]
        ids = table.column("id").to_pylist()
        sources = table.column("source").to_pylist() if "source" in table.column_names else [""] * len(ids)
        fps = table.column("content").to_pylist() if "content" in table.column_names else [None] * len(ids)
        yield vectors, [ids[r] for r in rows], [sources[r] or "" for r in rows], [fps[r] or "" for r in rows]


def remove_others(folder: Path, key: str) -> int:
    """Delete caches of other keys (and temp files); returns how many files went."""
    removed = 0
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.name == ".lock":
            continue
        if not path.name.startswith(key + "."):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def size(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when absent)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _crc32(path: Path) -> int:
    """CRC-32 of a file: catches any flipped byte of a derived file at a third of sha256's cost."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            crc = zlib.crc32(block, crc)
    return crc


def _strings(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=str) if values else np.empty(0, dtype="<U1")


def _npy_bytes(values: list[str]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, _strings(values), allow_pickle=False)
    return buf.getvalue()
