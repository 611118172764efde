"""Saved search indexes over a feature store namespace (``save_index``, ``search``), float or compact.

An index folder holds ``index.json`` (format, backbone, metric, kind, rows, files with sha256),
``index.faiss``, ``ids.npy`` and ``sources.npy``. Over a compact namespace (``precision`` /
``dimensions``, see :mod:`embedkit.encoders.compact`) it also records the namespace's Compact
(``"compact"``: precision, dimensions, calibration with its sha256; format 2):

==================  ===============================================================================
namespace           index and queries
==================  ===============================================================================
float32             :class:`~embedkit.heads.knn.FaissNearestNeighbors` over the rows; queries as
                    embedded (truncated and renormalised first when ``dimensions`` is set)
int8 / uint8        the same over ``Compact.restore(rows)`` (float32 in memory: 4 bytes a
                    dimension while the index is built and searched); the float query is not
                    quantised (float query x int8 documents, as sentence-transformers rescores)
binary              :class:`~embedkit.heads.binary.BinaryNearestNeighbors` (Hamming distance), the
                    top ``rescore`` candidates rescored by the float query against the float32
                    rows of the same store's float namespace when it holds every indexed id,
                    else against the candidates' bits as -1 / +1
==================  ===============================================================================

Each hit of :func:`search` on a binary index says what ranked it (``"rescored"``: ``float32`` |
``bits`` | None for Hamming distance only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..encoder import encoder_for
from ..encoders.compact import Compact
from ..errors import ArtifactError, StoreError, UsageError
from ..features.store import FeatureStore
from ..fs.atomic import current, staged_folder
from ..fs.outputs import check_output, replaceable, stamp
from ..models.store import sha256_file
from .binary import RESCORE, BinaryNearestNeighbors
from .knn import FaissNearestNeighbors
from .records import COMPACT_FORMAT, FORMAT, backbone_artifact, checked_files, read_meta, version_of

INDEX_FILE = "index.json"
INDEX_FILES = ("index.faiss", "ids.npy", "sources.npy")
BINARY_KINDS = {"auto": "auto", "flat": "flat", "ivf": "ivf", "ivfpq": "ivf"}


def _find(store: Any, backbone: str, precision: str, dimensions: int | None) -> Any:
    """The namespace of ``backbone`` at ``precision`` / ``dimensions`` (a namespace given is taken as is)."""
    if hasattr(store, "load_with_sources"):
        return store
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    return fs.find(backbone, precision=precision, dimensions=dimensions)


def _compact_of(namespace: Any, precision: str, dimensions: int | None) -> Compact:
    compact = namespace.compact
    if compact.precision != precision or compact.dimensions != dimensions:
        raise StoreError(f"{namespace.path} holds {compact.precision} vectors of dimensions={compact.dimensions}, "
                         f"not the {precision} / dimensions={dimensions} asked for")
    return compact


def build(namespace: Any, compact: Compact, metric: str = "cosine", index: str = "auto",
          memory_budget_mb: float | None = None, rescore: int = RESCORE, nprobe: int = 16) -> tuple[Any, Any, Any]:
    """``(estimator, ids, sources)`` over a namespace's rows made by ``compact``.

    Raises:
        StoreError: the namespace holds no rows.
        UsageError: an index kind the rows cannot take (``hnsw`` for binary rows).
    """
    ids, X, sources = namespace.load_with_sources()
    if len(ids) == 0:  # every item of the extraction failed: nothing to search
        raise StoreError(f"{namespace.path} holds no vectors (0 rows; see `embedkit store failures`): "
                         "nothing to index")
    if compact.precision == "binary":
        if index not in BINARY_KINDS:
            raise UsageError(f"index: binary rows take a flat or IVF binary index (auto, flat, ivf), not {index!r}")
        nn = BinaryNearestNeighbors(metric=metric, index=BINARY_KINDS[index], rescore=rescore, nprobe=nprobe,
                                    dimensions=compact.dimensions).fit(np.asarray(X))
    else:
        rows = compact.restore(np.asarray(X)) if compact.precision != "float32" else np.asarray(X)
        nn = FaissNearestNeighbors(metric=metric, index="ivfpq" if index == "ivf" else index,
                                   memory_budget_mb=memory_budget_mb, nprobe=nprobe).fit(rows)
    return nn, ids, sources


def save_index(store: Any, backbone: str, path: str | os.PathLike[str], metric: str = "cosine",
               index: str = "auto", memory_budget_mb: float | None = None, precision: str = "float32",
               dimensions: int | None = None, rescore: int = RESCORE, nprobe: int = 16) -> Path:
    """A nearest-neighbour index over a feature store namespace, saved with ids and sources.

    ``precision`` / ``dimensions`` choose a compact namespace of ``backbone`` (see the module
    table); ``rescore`` (binary: Hamming candidates rescored, 0: none) and ``nprobe`` (IVF lists
    searched) are recorded as the defaults of :func:`search`. ``path`` is checked before any work
    (its folder must exist; it must not be or lie inside the feature store; it must be new, an
    empty folder or an earlier index); an earlier index there is replaced crash-safely.

    Raises:
        OutputError: ``path`` is refused (see :func:`embedkit.fs.outputs.check_output`).
        StoreError: no features for ``backbone`` (at that precision) in ``store``, or no rows.
    """
    import faiss

    is_namespace = hasattr(store, "load_with_sources")
    # (a pathlib.Path has a .root too: "/", which made every output "lie inside the input /")
    folder = store.path if is_namespace else store.root if isinstance(store, FeatureStore) else store
    final = check_output(path, "index", inputs=[folder])
    namespace = _find(store, backbone, precision, dimensions)
    compact = _compact_of(namespace, precision, dimensions)
    nn, ids, sources = build(namespace, compact, metric, index, memory_budget_mb, rescore, nprobe)
    binary = compact.precision == "binary"
    dim = nn.n_bits_ if binary else nn.n_features_in_
    with staged_folder(final, replaceable("index")) as staging:
        (faiss.write_index_binary if binary else faiss.write_index)(nn._index, str(staging / "index.faiss"))
        np.save(staging / "ids.npy", ids, allow_pickle=False)
        np.save(staging / "sources.npy", sources, allow_pickle=False)
        meta = {
            **stamp("index"),
            "format": FORMAT if compact.is_float else COMPACT_FORMAT,
            "backbone": {"name": namespace.name, "digest": namespace.digest,
                         "spec": namespace.info.get("spec") or namespace.name},
            "metric": metric, "index_kind": nn.index_kind_, "rows": int(len(ids)), "dim": int(dim),
            "nprobe": nprobe, "files": {f: sha256_file(staging / f) for f in INDEX_FILES},
            "versions": {d: version_of(d) for d in ("embedkit", "faiss-cpu")},
        }
        if not compact.is_float:
            meta.update(compact=compact.describe(), rescore=rescore,
                        features=None if is_namespace else str(Path(folder).resolve()))
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=2))
    return final


def float_rows(features: Any, digest: str, ids: np.ndarray) -> tuple[Any, np.ndarray | None] | None:
    """``(X, rows)``: the float32 rows of ``digest`` in the feature store ``features`` and, when
    their order differs, where each of ``ids`` lies in them; None when the store, the namespace
    or one of the ids is missing."""
    if features is None:
        return None
    try:
        float_ids, X = FeatureStore(features).find(digest).load()
    except (StoreError, OSError, ValueError):
        return None
    if len(float_ids) == len(ids) and np.array_equal(float_ids, ids):
        return X, None
    order = np.argsort(float_ids, kind="stable")
    pos = np.searchsorted(float_ids[order], ids)
    pos = np.minimum(pos, len(order) - 1)
    if len(order) == 0 or not np.array_equal(float_ids[order][pos], ids):
        return None
    return X, order[pos]


def query(nn: Any, compact: Compact, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)`` of float32 query embeddings ``(n, D)`` on an index :func:`build` made."""
    if compact.precision == "binary":
        return nn.kneighbors(vectors, n_neighbors=k)
    return nn.kneighbors(compact.truncate(vectors), n_neighbors=k)


def _attach_rescoring(nn: Any, features: Any, digest: str, ids: np.ndarray) -> str | None:
    """Give a binary index the float rows of ``digest`` in ``features`` when they cover ``ids``;
    what its candidates are rescored against (``float32`` | ``bits``), None when not rescored."""
    found = float_rows(features, digest, ids) if nn.rescore else None
    if found is not None:
        nn.set_rescore(found[0], rows=found[1])
    return nn.rescore_source_ if nn.rescore else None


def _hits(nn: Any, compact: Compact, artifact: Any, ids: np.ndarray, sources: np.ndarray, queries: list[Any],
          k: int, rescored: str | None) -> list[list[dict[str, Any]]]:
    options = {"empty": "error"} if artifact.modality == "text" else {}  # an empty query has no neighbours
    result = encoder_for(artifact, **options).encode(queries)
    out: list[list[dict[str, Any]]] = [[] for _ in queries]
    good = np.flatnonzero(result.ok)
    if len(good):
        distances, indices = query(nn, compact, result.vectors[good], min(k, len(ids)))
        for row, dist, idx in zip(good, distances, indices):
            out[row] = [{"id": str(ids[i]), "source": str(sources[i]), "distance": float(d)} for d, i in zip(dist, idx)]
            if compact.precision == "binary":
                for hit in out[row]:
                    hit["rescored"] = rescored
    for error in result.errors:
        out[error.index] = [{"error": error.code, "message": error.message}]
    return out


def search(path: str | os.PathLike[str], queries: list[Any], k: int = 10, store: str | None = None,
           rescore: int | None = None, nprobe: int | None = None,
           features: str | os.PathLike[str] | None = None) -> list[list[dict[str, Any]]]:
    """The ``k`` nearest stored items (id, source, distance) for each raw query, nearest first.

    ``rescore`` and ``nprobe`` override what the index recorded; ``features`` is the feature
    store whose float rows rescore a binary index (default: the one it was built from).

    Raises:
        UnsafeModelError: a file ``index.json`` names is not one of the index's files, lies
            outside the folder, is not a regular file, or changed since it was saved.
        ArtifactError: not a saved index, or it does not match its ids, its backbone or its
            compact record.
    """
    import faiss

    folder = current(Path(path), INDEX_FILE)
    meta = read_meta(folder, INDEX_FILE, "index")
    files = checked_files(folder, meta.get("files"), INDEX_FILES, "index")
    artifact = backbone_artifact(meta["backbone"], store, needed_by=str(folder))
    try:
        compact = Compact.from_record(meta["compact"]) if "compact" in meta else Compact()
        dims_ok = compact.output_dim(artifact.dim) == meta["dim"]
    except UsageError as exc:
        raise ArtifactError(f"{folder}: its compact record does not fit its backbone: {exc}") from None
    binary = compact.precision == "binary"
    ids = np.load(files["ids.npy"], allow_pickle=False)
    sources = np.load(files["sources.npy"], allow_pickle=False)
    index = (faiss.read_index_binary if binary else faiss.read_index)(str(files["index.faiss"]))
    width = (meta["dim"] + 7) // 8 if binary else meta["dim"]
    if (index.code_size if binary else index.d) != width or index.ntotal != len(ids) or not dims_ok:
        raise ArtifactError(f"{folder}: the index does not match its ids or its backbone (dimension or rows)")
    nprobe = nprobe or meta.get("nprobe", 16)
    rescored: str | None = None
    if binary:
        nn = BinaryNearestNeighbors.from_index(index, n_bits=meta["dim"], metric=meta["metric"], nprobe=nprobe,
                                               rescore=meta.get("rescore", RESCORE) if rescore is None else rescore)
        rescored = _attach_rescoring(nn, features or meta.get("features"), meta["backbone"]["digest"], ids)
    else:
        nn = FaissNearestNeighbors.from_index(index, metric=meta["metric"], nprobe=nprobe)
    return _hits(nn, compact, artifact, ids, sources, queries, k, rescored)


def search_store(features: str | os.PathLike[str], backbone: str, queries: list[Any], k: int = 10,
                 precision: str = "float32", dimensions: int | None = None, metric: str = "cosine",
                 rescore: int = RESCORE, store: str | None = None) -> list[list[dict[str, Any]]]:
    """:func:`search` straight on a feature store's namespace, through an exact index built in
    memory (flat; binary rows: flat Hamming, rescored by the float rows of the same store when
    they cover every id). ``store`` is the model store the backbone is found in.

    Raises:
        StoreError: no namespace of ``backbone`` at that precision / dimensions, or no rows.
        BackboneNotAvailableError: the namespace's artifact is in no model store here.
    """
    namespace = _find(features, backbone, precision, dimensions)
    compact = _compact_of(namespace, precision, dimensions)
    nn, ids, sources = build(namespace, compact, metric, "flat", rescore=rescore)
    record = {"digest": namespace.digest, "name": namespace.name, "spec": namespace.info.get("spec")}
    artifact = backbone_artifact(record, store, needed_by=str(namespace.path))
    rescored = _attach_rescoring(nn, features, namespace.digest, ids) if compact.precision == "binary" else None
    return _hits(nn, compact, artifact, ids, sources, queries, k, rescored)
