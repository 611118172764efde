"""Passages in search results: the parent item, chunk and spans of hits on per-chunk rows.

An index over a namespace of per-chunk rows (``extract(..., long="chunk", chunk_rows=True)``, see
:mod:`embedkit.features.chunk_rows`) keeps, beside ``ids.npy`` and ``sources.npy``,
``passages.npy``: (M, 5) int64, per row its chunk number, token start and end, character start
and end (``index.json`` records ``"chunk_rows": true`` and the file's sha256). Each hit of such an
index (saved, or a feature store searched directly) then carries :func:`describe`'s keys:
``parent`` (the item's id), ``chunk``, ``token_span`` and ``char_span`` (``[start, end)``; the
passage is ``text[start:end]`` of the item's text, which the hit's ``source`` locates).

Rows whose ids came from an id column (not the content's hash) keep their content fingerprint
(``content_id`` of the text, 32 hex digits): an index over them saves ``contents.npy`` (``index.json``:
``"contents": true``) and each hit carries ``content``, so a reader can tell that the text at the
hit's source is no longer the one that was embedded (and its spans no longer cut that passage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from ..features.chunk_rows import SPANS, is_rows, parent_of, spans

PASSAGES_FILE = "passages.npy"
CONTENTS_FILE = "contents.npy"


def files(meta: dict[str, Any], base: tuple[str, ...]) -> tuple[str, ...]:
    """The files an index of ``meta`` must name: ``base``, ``passages.npy`` for per-chunk rows,
    ``contents.npy`` for rows keyed by user ids."""
    return (base + ((PASSAGES_FILE,) if meta.get("chunk_rows") else ())
            + ((CONTENTS_FILE,) if meta.get("contents") else ()))


def of_namespace(namespace: Any, ids: np.ndarray) -> np.ndarray | None:
    """(M, 5) int64 spans of ``ids`` in a namespace of per-chunk rows (None for any other namespace)."""
    return spans(namespace, ids) if is_rows(namespace) else None


def save(folder: Path, rows: np.ndarray | None, contents: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``passages.npy`` into ``folder`` when there are per-chunk rows, ``contents.npy`` when
    rows carry content fingerprints (ids from a column); the ``index.json`` keys that say so."""
    keys: dict[str, Any] = {}
    if rows is not None:
        np.save(folder / PASSAGES_FILE, rows, allow_pickle=False)
        keys["chunk_rows"] = True
    if contents is not None and any(str(c) for c in contents):
        np.save(folder / CONTENTS_FILE, np.asarray(contents, dtype=str), allow_pickle=False)
        keys["contents"] = True
    return keys


def load(found: dict[str, Path], rows: int) -> np.ndarray | None:
    """The spans of a saved index (``found``: its checked files), None when it holds no per-chunk rows.
    Raises ArtifactError when they do not fit its ``rows`` ids."""
    if PASSAGES_FILE not in found:
        return None
    out = np.load(found[PASSAGES_FILE], allow_pickle=False)
    if out.dtype != np.int64 or out.shape != (rows, len(SPANS)):
        raise ArtifactError(f"{found[PASSAGES_FILE]}: {out.dtype} {out.shape}, expected int64 ({rows}, {len(SPANS)})")
    return out


def load_contents(found: dict[str, Path], rows: int) -> np.ndarray | None:
    """The content fingerprints of a saved index's rows, None when it keeps none. Raises
    ArtifactError when they do not fit its ``rows`` ids."""
    if CONTENTS_FILE not in found:
        return None
    out = np.load(found[CONTENTS_FILE], allow_pickle=False)
    if out.dtype.kind != "U" or out.shape != (rows,):
        raise ArtifactError(f"{found[CONTENTS_FILE]}: {out.dtype} {out.shape}, expected strings ({rows},)")
    return out


def describe(row_id: str, span: np.ndarray) -> dict[str, Any]:
    """The keys a hit on per-chunk row ``row_id`` gets: ``parent``, ``chunk``, ``token_span``, ``char_span``."""
    chunk, t0, t1, c0, c1 = (int(v) for v in span)
    return {"parent": parent_of(row_id), "chunk": chunk, "token_span": [t0, t1], "char_span": [c0, c1]}
