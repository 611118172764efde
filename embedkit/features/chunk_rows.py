"""Per-chunk rows: every window of a chunked text stored as a row of its own, so search can return the passage.

``extract(..., long="chunk", chunk_rows=True)`` stores, beside the pooled vectors of the chunk
variant (``<digest>.chunk-o32-m64``), one row per window in the variant
``<digest>.chunk-o32-m64.rows`` (its record ``{"long": "chunk", "chunk_overlap": 32,
"max_chunks": 64, "rows": true}``, :mod:`embedkit.features.variants`): a request for pooled
vectors never gets these rows, nor a request for rows the pooled vectors.

A row is what :meth:`TextEncoder.encode(..., chunk_rows=True) <embedkit.encoders.text.TextEncoder.encode>`
gives for one window (:class:`~embedkit.inputs.windows.Chunks`), bit for bit. Its shard holds, beside
``id`` (``<parent id>#<chunk>``: unique, stable, and the parent is everything before the last
``#``), ``source`` (the parent's locator), ``content`` (the parent's fingerprint, with user ids)
and ``embedding`` (float32 of the backbone's width), the columns :data:`COLUMNS`: ``parent``
(string), ``chunk``, ``token_start``, ``token_end`` (the window's content tokens among the
parent's), ``char_start``, ``char_end`` (int64; ``text[char_start:char_end]`` is the passage).

Reading rule (beside :mod:`embedkit.features.namespace`'s "latest event of an id wins"): a parent's
rows are served from the **latest commit that names the parent** only. Each commit records in
``stats.parents`` every parent its job computed (embedded, failed or in an id conflict), so a text
recomputed into fewer windows leaves no stale window behind, and one that now fails (or conflicts)
serves no passage. Failure records stay with the pooled vectors' namespace.

Exactly once, with the shard and commit mechanism of every extraction: the shard worker
(:func:`embedkit.features.shards.compute_shard`) commits a job's rows *before* its pooled
vectors, and ``extract`` skips an item only when both namespaces serve it (with its content), so
``kill -9`` between the two commits recomputes the job and the rule above serves each row once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import StoreError

COLUMNS = ("parent", "chunk", "token_start", "token_end", "char_start", "char_end")
SPANS = COLUMNS[1:]  # int64 columns, in the order of :attr:`ChunkRows.spans`


def row_id(parent: str, chunk: int) -> str:
    """The id of window ``chunk`` of item ``parent``: ``<parent>#<chunk>``."""
    return f"{parent}#{int(chunk)}"


def parent_of(row: str) -> str:
    """The parent id of a row id (everything before its last ``#``)."""
    return row.rpartition("#")[0]


@dataclass
class ChunkRows:
    """The per-chunk rows of a namespace, every served row once (M rows, D the backbone's width).

    Attributes:
        ids: (M,) str, ``<parent>#<chunk>``.
        parent: (M,) str, the id of the item the window belongs to.
        vectors: (M, D) float32, memory-mapped: each window's vector as the model returned it.
        chunk: (M,) int64, the window's number within its item, from 0.
        token_span: (M, 2) int64, ``[start, end)`` of its content tokens among the item's.
        char_span: (M, 2) int64, ``[start, end)`` of its characters in the item's text (of a
            ``bytes`` item: in its UTF-8 decoding): ``text[start:end]`` is the passage.
        sources: (M,) str, the item's locator (``file.csv:row 3``, ``item 4``...).
    """

    ids: np.ndarray
    parent: np.ndarray
    vectors: np.ndarray
    chunk: np.ndarray
    token_span: np.ndarray
    char_span: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def is_rows(namespace: Any) -> bool:
    """Whether ``namespace`` holds per-chunk rows."""
    return bool(namespace.variant.get("rows"))


def by_parent(records: Sequence[dict[str, Any]], served: dict[str, tuple[int, int, str]]) -> dict[str, tuple[int, int, str]]:
    """``served`` (row id -> (record index, row, fingerprint)) less the rows of a parent that a later
    commit names (see the module): each parent's rows come from its latest commit only."""
    latest: dict[str, int] = {}
    for n, record in enumerate(records):
        for parent in (record.get("stats") or {}).get("parents") or ():
            latest[parent] = n
    return {row: where for row, where in served.items() if latest.get(parent_of(row), where[0]) == where[0]}


def commit(namespace: Any, job: Any, result: Any) -> int:
    """Commit the per-chunk rows of a shard job's encoding (``result.chunks``; None when the job had no
    items to encode) into the rows namespace, with every parent of the job named; returns the rows.

    Raises StoreError / StoreWriteError as :meth:`Namespace.commit` does (nothing is committed then).
    """
    items = job.items
    parents = [item.id for item in items] + [str(record.get("id")) for record in job.extra]
    chunks = result.chunks if result is not None else None
    if chunks is None or len(chunks) == 0:
        namespace.commit([], np.empty((0, namespace.dim), np.float32), [], (),
                         {"key": job.key, "rows": 0, "parents": parents}, contents=[] if job.user_ids else None)
        return 0
    which = [int(i) for i in chunks.item]
    ids = [row_id(items[i].id, c) for i, c in zip(which, chunks.chunk)]
    columns = {"parent": [items[i].id for i in which], "chunk": chunks.chunk,
               "token_start": chunks.token_span[:, 0], "token_end": chunks.token_span[:, 1],
               "char_start": chunks.char_span[:, 0], "char_end": chunks.char_span[:, 1]}
    namespace.commit(ids, chunks.vectors, [items[i].source for i in which], (),
                     {"key": job.key, "rows": len(ids), "parents": parents},
                     contents=[job.contents[i] for i in which] if job.user_ids else None, extra_columns=columns)
    return len(ids)


def stored_parents(namespace: Any) -> dict[str, str]:
    """Parent ids with served rows -> their content fingerprint (``""`` with content ids)."""
    return {parent_of(row): fp for row, fp in namespace.stored().items()}


def spans(namespace: Any, ids: np.ndarray) -> np.ndarray:
    """(M, 5) int64 of the served rows ``ids`` (as :meth:`Namespace.load` gives them): the columns
    :data:`SPANS` (chunk, token start, token end, char start, char end), row for row.

    Raises StoreError: not a namespace of per-chunk rows, a shard without the span columns, or an
    id no longer served (the namespace was committed to meanwhile: read it again).
    """
    if not is_rows(namespace):
        raise StoreError(f"{namespace.key} holds {'pooled' if namespace.variant.get('long') else 'plain'} vectors, "
                         "not per-chunk rows (extract with long='chunk', chunk_rows=True)")
    with namespace._lock():
        records = namespace._records_or_raise()
        served, _ = namespace._events(records)
    where = {item: k for k, item in enumerate(np.asarray(ids).tolist())}
    out = np.full((len(where), len(SPANS)), -1, np.int64)
    found = np.zeros(len(where), bool)
    rows_of: dict[int, list[tuple[int, int]]] = {}
    for item, (n, row, _) in served.items():
        if item in where:
            rows_of.setdefault(n, []).append((row, where[item]))
    for n, pairs in rows_of.items():
        try:
            table = namespace._shard_table(records[n]["shard"], SPANS)
        except KeyError as exc:
            raise StoreError(f"shard {records[n]['shard']} of {namespace.path} has no span columns ({exc})") from None
        rows, at = (np.asarray(v, np.int64) for v in zip(*pairs))
        out[at] = np.stack([table.column(c).to_numpy() for c in SPANS], axis=1)[rows]
        found[at] = True
    if not found.all():
        raise StoreError(f"{int((~found).sum())} of the {len(found)} rows asked for are not served by "
                         f"{namespace.path} (committed to meanwhile? read it again)")
    return out


def load(namespace: Any) -> ChunkRows:
    """Every served per-chunk row of ``namespace`` with its parent and spans (see :class:`ChunkRows`).

    Raises StoreError as :meth:`Namespace.load` and :func:`spans` do.
    """
    ids, X, sources, _ = namespace.load_all()
    s = spans(namespace, ids)
    parents = np.asarray([parent_of(i) for i in ids.tolist()], dtype=str) if len(ids) else np.empty(0, "<U1")
    return ChunkRows(ids, parents, X, s[:, 0], s[:, 1:3], s[:, 3:5], sources)
