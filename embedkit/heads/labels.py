"""Labels for stored items: read from a table (joined on ids or on content) or from image folders."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnsupportedInputError
from ..inputs.sources import iter_items, read_texts

logger = logging.getLogger(__name__)


def is_labelled(y: np.ndarray) -> np.ndarray:
    """A boolean mask of the items of ``y`` (as :func:`labels_for` returns it) that have a label:
    not None, NaN or the empty string."""
    return np.asarray([v is not None and v == v and v != "" for v in y], dtype=bool)


def labels_for(ids: np.ndarray, sources: np.ndarray, labels: str, modality: str, label_column: str = "label",
               id_column: str | None = None, column: str | None = None,
               contents: np.ndarray | None = None) -> np.ndarray:
    """One label per stored item (None where unknown or ambiguous).

    ``labels`` is ``folder`` (the parent folder of each image's path) or a table: with an id
    column (``id_column`` or ``id``) it joins on ids; otherwise it recomputes each row's content
    id from its payload column exactly as extraction did.

    A join on user ids never gives one row's label to another row's vector: when the table
    also has the payload column, a row's label goes only to a stored vector of that row's
    content (``contents``: the stored content fingerprints, as :meth:`Namespace.load_all`
    returns them); an id whose rows carry different labels and cannot be told apart by
    content gets None. Both cases are logged with a count.
    """
    if labels == "folder":
        return np.asarray([Path(s).parent.name if s else None for s in sources], dtype=object)

    path = Path(labels)
    if not path.is_file():
        raise UnsupportedInputError(f"labels: {labels} is not a file (give a labels table, or 'folder' for image "
                                    "class subfolders)")
    values = read_texts(path, label_column)
    try:
        keys = [str(k) for k in read_texts(path, id_column or "id")]
    except UnsupportedInputError:
        if id_column:
            raise
        keys = [item.id for item in iter_items(path, modality, column)]
        # content ids: rows of one id have one content, but may carry different labels
        found: dict[str, dict[str, Any]] = {}
        for key, value in zip(keys, values):
            found.setdefault(key, {})[_label_key(value)] = value
        mapping = {key: next(iter(v.values())) if len(v) == 1 else None for key, v in found.items()}
        ambiguous = sum(1 for i in ids if len(found.get(str(i), ())) > 1)
        if ambiguous:
            logger.warning("labels %s: %d items appear in rows with different labels; they are left unlabelled",
                           path.name, ambiguous)
        return np.asarray([mapping.get(str(i)) for i in ids], dtype=object)
    return _join_user_ids(ids, contents, path, keys, values, modality, column)


def _join_user_ids(ids: np.ndarray, contents: np.ndarray | None, path: Path, keys: list[str], values: list[Any],
                   modality: str, column: str | None) -> np.ndarray:

    try:  # each row's content fingerprint, computed as extraction computed it
        fps: list[str | None] = [item.id for item in iter_items(path, modality, column)]
        if len(fps) != len(keys):
            raise UnsupportedInputError(f"{len(fps)} payloads for {len(keys)} ids")
    except UnsupportedInputError as exc:
        logger.info("labels %s: no payload column to check contents (%s); joining on ids alone", path.name, exc)
        fps = [None] * len(keys)
    rows: dict[str, list[tuple[Any, str | None]]] = {}
    for key, value, fp in zip(keys, values, fps):
        rows.setdefault(key, []).append((value, fp))
    stored = contents if contents is not None else [""] * len(ids)
    out, stale, ambiguous = [], 0, 0
    for item, fp in zip(ids, stored):
        candidates = rows.get(str(item), [])
        if fp and any(f is not None for _, f in candidates):
            matching = [v for v, f in candidates if f == fp]
            if not matching:
                stale += 1  # the table's row for this id has another content than the stored vector
            candidates = [(v, fp) for v in matching]
        found = {_label_key(v) for v, _ in candidates}
        if len(found) > 1:
            ambiguous += 1
        out.append(candidates[0][0] if len(found) == 1 else None)
    if stale:
        logger.warning("labels %s: %d ids have another content in the table than in the store (edited since "
                       "extract?); they are left unlabelled: run extract again", path.name, stale)
    if ambiguous:
        logger.warning("labels %s: %d ids name rows with different labels; they are left unlabelled",
                       path.name, ambiguous)
    return np.asarray(out, dtype=object)


def _label_key(value: Any) -> str:
    """A hashable, comparable form of a label value (NaN equals NaN)."""
    return json.dumps(value, default=str, sort_keys=True)
