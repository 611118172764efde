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
``bits`` | None for Hamming distance only). A ``features`` store named to :func:`search` must
serve: one that is not a feature store, holds another backbone or lacks an indexed id is a
:class:`StoreError`, never a quiet fall back to the bits (only the store recorded at indexing
time, when gone, falls back to them).

Over a namespace of chunked texts (``long="chunk"``) the index records its long-text policy
(``"long"``: ``long``, ``chunk_overlap``, ``max_chunks``) and :func:`search` embeds the queries
with it, as the indexed items were; over its per-chunk rows (``chunk_rows=True``) the index also
keeps each row's chunk and spans and every hit names its parent item, chunk and passage span
(:mod:`embedkit.heads.passages`). Options that do not apply to the index are refused
(:class:`UsageError`), not ignored: ``rescore`` and ``features`` on anything but binary rows,
``nprobe`` on an index without IVF lists, ``memory_budget_mb`` but for a float ``auto`` index,
``ivfpq`` (product quantisation of floats) for binary rows.
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
from ..features.variants import label
from ..fs.atomic import current, staged_folder
from ..fs.outputs import check_output, replaceable, stamp
from ..models.store import sha256_file
from . import passages
from .binary import RESCORE, BinaryNearestNeighbors
from .knn import FaissNearestNeighbors
from .namespaces import find, long_of
from .records import COMPACT_FORMAT, FORMAT, backbone_artifact, checked_files, read_meta, version_of

INDEX_FILE = "index.json"
INDEX_FILES = ("index.faiss", "ids.npy", "sources.npy")
BINARY_KINDS = ("auto", "flat", "ivf")
NPROBE = 16  # IVF lists searched per query by default


def _find(store: Any, backbone: str, precision: str, dimensions: int | None, **long: Any) -> Any:
    """The namespace of ``backbone`` at ``precision`` / ``dimensions`` / ``long`` (a namespace given
    is taken as is)."""
    if hasattr(store, "load_with_sources"):
        return store
    return find(store, backbone, precision=precision, dimensions=dimensions, **long)


def check_options(precision: str, index: str, rescore: int | None, nprobe: int | None,
                  memory_budget_mb: float | None = None) -> None:
    """Refuse index options that do not apply to ``precision`` rows in an ``index`` index (UsageError)."""
    binary = precision == "binary"
    if binary and index not in BINARY_KINDS:
        why = (" (ivfpq compresses float rows by product quantisation; binary rows are 1 bit a dimension "
               "already: ivf is their IVF index)" if index == "ivfpq" else "")
        raise UsageError(f"index: binary rows take a flat or IVF binary index (auto, flat, ivf), not {index!r}{why}")
    if rescore is not None and not binary:
        raise UsageError(f"rescore: applies to binary rows (their Hamming candidates ranked again by float rows); "
                         f"{precision} rows are ranked by the float query directly")
    if nprobe is not None and index in ("flat", "hnsw"):
        raise UsageError(f"nprobe: applies to an IVF index (ivf, ivfpq, or auto when it builds one); a {index} index "
                         "has no lists to probe")
    if memory_budget_mb is not None and (binary or index != "auto"):
        raise UsageError("memory_budget_mb: chooses between HNSW and IVF-PQ when index='auto' builds a float index "
                         f"of 50,000 rows or more; it does not apply to {precision} rows in a {index!r} index")


def _compact_of(namespace: Any, precision: str, dimensions: int | None) -> Compact:
    compact = namespace.compact
    if compact.precision != precision or compact.dimensions != dimensions:
        raise StoreError(f"{namespace.path} holds {compact.precision} vectors of dimensions={compact.dimensions}, "
                         f"not the {precision} / dimensions={dimensions} asked for")
    return compact


def build(namespace: Any, compact: Compact, metric: str = "cosine", index: str = "auto",
          memory_budget_mb: float | None = None, rescore: int = RESCORE, nprobe: int = NPROBE) -> tuple[Any, ...]:
    """``(estimator, ids, sources, contents)`` over a namespace's rows made by ``compact`` (``contents``:
    each row's content fingerprint, ``""`` where its id is the content's own hash).

    Raises:
        StoreError: the namespace holds no rows.
        UsageError: an index kind the rows cannot take (``hnsw`` or ``ivfpq`` for binary rows).
        UnsupportedInputError: too few rows for the index (``ivfpq``: 256 at least).
    """
    check_options(compact.precision, index, None, None)
    ids, X, sources, contents = namespace.load_all()
    if len(ids) == 0:  # every item of the extraction failed: nothing to search
        raise StoreError(f"{namespace.path} holds no vectors (0 rows; see `embedkit store failures`): "
                         "nothing to index")
    if compact.precision == "binary":
        nn = BinaryNearestNeighbors(metric=metric, index=index, rescore=rescore, nprobe=nprobe,
                                    dimensions=compact.dimensions).fit(np.asarray(X))
    else:
        rows = compact.restore(np.asarray(X)) if compact.precision != "float32" else np.asarray(X)
        nn = FaissNearestNeighbors(metric=metric, index="ivfpq" if index == "ivf" else index,
                                   memory_budget_mb=memory_budget_mb, nprobe=nprobe).fit(rows)
    return nn, ids, sources, contents


def save_index(store: Any, backbone: str, path: str | os.PathLike[str], metric: str = "cosine",
               index: str = "auto", memory_budget_mb: float | None = None, precision: str = "float32",
               dimensions: int | None = None, rescore: int | None = None, nprobe: int | None = None,
               long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
               chunk_rows: bool = False) -> Path:
    """A nearest-neighbour index over a feature store namespace, saved with ids and sources.

    ``precision`` / ``dimensions`` choose a compact namespace of ``backbone`` and ``long`` (with
    ``chunk_overlap`` / ``max_chunks`` when several answer) a namespace of chunked texts (see the
    module table and :meth:`FeatureStore.find`; ``chunk_rows=True``: its per-chunk rows, each hit
    then naming its passage); ``rescore`` (binary rows only: Hamming candidates
    rescored, 0: none; default 100) and ``nprobe`` (IVF lists searched; default 16) are recorded as
    the defaults of :func:`search`. ``path`` is checked before any work (its folder must exist; it
    must not be or lie inside the feature store; it must be new, an empty folder or an earlier
    index); an earlier index there is replaced crash-safely.

    Raises:
        OutputError: ``path`` is refused (see :func:`embedkit.fs.outputs.check_output`).
        StoreError: no features for ``backbone`` (of that variant) in ``store``, or no rows.
        UsageError: an option that does not apply to these rows or this index (see the module).
        UnsupportedInputError: too few rows for the index (``ivfpq``: 256 at least).
    """
    import faiss

    check_options(precision, index, rescore, nprobe, memory_budget_mb)
    is_namespace = hasattr(store, "load_with_sources")
    # (a pathlib.Path has a .root too: "/", which made every output "lie inside the input /")
    folder = store.path if is_namespace else store.root if isinstance(store, FeatureStore) else store
    final = check_output(path, "index", inputs=[folder])
    namespace = _find(store, backbone, precision, dimensions, long=long, chunk_overlap=chunk_overlap,
                      max_chunks=max_chunks, chunk_rows=chunk_rows)
    compact = _compact_of(namespace, precision, dimensions)
    rescore = RESCORE if rescore is None else rescore
    nprobe = NPROBE if nprobe is None else nprobe
    nn, ids, sources, contents = build(namespace, compact, metric, index, memory_budget_mb, rescore, nprobe)
    binary = compact.precision == "binary"
    dim = nn.n_bits_ if binary else nn.n_features_in_
    made = getattr(nn, "index_params_", None) or ({"nlist": int(nn._index.nlist)} if nn.index_kind_ == "ivf" else {})
    with staged_folder(final, replaceable("index")) as staging:
        (faiss.write_index_binary if binary else faiss.write_index)(nn._index, str(staging / "index.faiss"))
        np.save(staging / "ids.npy", ids, allow_pickle=False)
        np.save(staging / "sources.npy", sources, allow_pickle=False)
        chunked = passages.save(staging, passages.of_namespace(namespace, ids), contents)
        meta = {
            **stamp("index"),
            "format": FORMAT if compact.is_float else COMPACT_FORMAT,
            "backbone": {"name": namespace.name, "digest": namespace.digest,
                         "spec": namespace.info.get("spec") or namespace.name},
            "metric": metric, "index_kind": nn.index_kind_, "rows": int(len(ids)), "dim": int(dim),
            "nprobe": nprobe, "files": {f: sha256_file(staging / f) for f in passages.files(chunked, INDEX_FILES)},
            "versions": {d: version_of(d) for d in ("embedkit", "faiss-cpu")},
            **({"ivf": made} if made else {}), **({"long": long_of(namespace.variant)} if namespace.variant.get("long") else {}),
            **chunked,
        }
        if not compact.is_float:
            meta.update(compact=compact.describe(), rescore=rescore,
                        features=None if is_namespace else str(Path(folder).resolve()))
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=2))
    return final


def float_rows(features: Any, digest: str, ids: np.ndarray, long: dict[str, Any] | None = None,
               ) -> tuple[Any, np.ndarray | None]:
    """``(X, rows)``: the float32 rows of ``digest`` (texts chunked as ``long`` says) in the feature
    store ``features`` and, when their order differs, where each of ``ids`` lies in them.

    Raises:
        StoreError: why they cannot serve: not a feature store, no float32 namespace of that
            backbone (and long-text policy), or some of ``ids`` missing from it.
    """
    store = FeatureStore(features)
    try:
        if not store.namespaces():
            raise StoreError(f"{features} is not a feature store (no namespace in it)")
        try:
            namespace = store.find(digest, **(long or {}))
        except StoreError:
            present = ", ".join(sorted(f"{n.name} ({n.digest[:12]}, {label(n.variant)})" for n in store.namespaces()))
            chunked = f", texts chunked {label(long)}" if long else ""
            raise StoreError(f"{features} holds no float32 rows of the indexed backbone ({digest[:12]}{chunked}); "
                             f"present: {present}") from None
        float_ids, X = namespace.load()
    except (OSError, ValueError) as exc:  # a damaged namespace
        raise StoreError(f"{features}: its float32 rows cannot be read: {exc}") from None
    if len(float_ids) == len(ids) and np.array_equal(float_ids, ids):
        return X, None
    order = np.argsort(float_ids, kind="stable")
    pos = np.minimum(np.searchsorted(float_ids[order], ids), max(len(order) - 1, 0))
    found = np.zeros(len(ids), bool) if len(order) == 0 else float_ids[order][pos] == ids
    if not found.all():
        raise StoreError(f"{features} lacks {int((~found).sum())} of the {len(ids)} indexed ids (first: "
                         f"{ids[np.flatnonzero(~found)[0]]}): it is not the store this index was built from")
    return X, order[pos]


def query(nn: Any, compact: Compact, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)`` of float32 query embeddings ``(n, D)`` on an index :func:`build` made."""
    if compact.precision == "binary":
        return nn.kneighbors(vectors, n_neighbors=k)
    return nn.kneighbors(compact.truncate(vectors), n_neighbors=k)


def _attach_rescoring(nn: Any, features: Any, digest: str, ids: np.ndarray, long: dict[str, Any] | None = None,
                      strict: bool = False) -> str | None:
    """Give a binary index the float rows of ``digest`` in ``features`` when they cover ``ids``;
    what its candidates are rescored against (``float32`` | ``bits``), None when not rescored.
    ``strict``: a ``features`` store that cannot serve is a StoreError instead of the bits."""
    if not nn.rescore:
        return None
    if features is not None:
        try:
            found = float_rows(features, digest, ids, long)
        except StoreError as exc:
            if strict:
                raise StoreError(f"features: {exc}") from None
        else:
            nn.set_rescore(found[0], rows=found[1])
    return nn.rescore_source_


def _hits(nn: Any, compact: Compact, artifact: Any, ids: np.ndarray, sources: np.ndarray, queries: list[Any],
          k: int, rescored: str | None, long: dict[str, Any] | None = None,
          spans: np.ndarray | None = None, contents: np.ndarray | None = None) -> list[list[dict[str, Any]]]:
    # an empty query has no neighbours; queries are embedded as the indexed texts were (long-text policy)
    options = {"empty": "error", **(long or {})} if artifact.modality == "text" else {}
    result = encoder_for(artifact, **options).encode(queries)
    out: list[list[dict[str, Any]]] = [[] for _ in queries]
    good = np.flatnonzero(result.ok)
    if len(good):
        distances, indices = query(nn, compact, result.vectors[good], min(k, len(ids)))
        for row, dist, idx in zip(good, distances, indices):
            out[row] = [{"id": str(ids[i]), "source": str(sources[i]), "distance": float(d),
                         **(passages.describe(str(ids[i]), spans[i]) if spans is not None else {}),
                         **({"content": str(contents[i])} if contents is not None and contents[i] else {})}
                        for d, i in zip(dist, idx)]
            if compact.precision == "binary":
                for hit in out[row]:
                    hit["rescored"] = rescored
    for error in result.errors:
        out[error.index] = [{"error": error.code, "message": error.message}]
    return out


def _refuse(folder: Path, meta: dict[str, Any], binary: bool, rescore: int | None, nprobe: int | None,
            features: Any) -> None:
    """Refuse the :func:`search` options that do not apply to this index (UsageError), never ignore them."""
    kind = meta.get("index_kind")
    what = f"{folder} is a {kind} index of {'binary' if binary else (meta.get('compact') or {}).get('precision', 'float32')} rows"
    if rescore is not None and not binary:
        raise UsageError(f"rescore: applies to an index of binary rows (Hamming candidates ranked again); {what}")
    if nprobe is not None and kind not in ("ivf", "ivfpq"):
        raise UsageError(f"nprobe: applies to an IVF index (ivf, ivfpq); {what}, which has no lists to probe")
    if features is not None and not binary:
        raise UsageError(f"features: the float32 rows of a feature store rescore an index of binary rows; {what}")
    if features is not None and (meta.get("rescore", RESCORE) if rescore is None else rescore) == 0:
        raise UsageError("features: with rescore=0 (given, or as indexed) the index ranks by Hamming distance only: "
                         "no float32 rows are read")


def search(path: str | os.PathLike[str], queries: list[Any], k: int = 10, store: str | None = None,
           rescore: int | None = None, nprobe: int | None = None,
           features: str | os.PathLike[str] | None = None) -> list[list[dict[str, Any]]]:
    """The ``k`` nearest stored items (id, source, distance) for each raw query, nearest first; on
    per-chunk rows also ``parent``, ``chunk``, ``token_span`` and ``char_span`` (:mod:`.passages`).

    ``rescore`` (binary rows) and ``nprobe`` (IVF indexes) override what the index recorded;
    ``features`` (binary rows) is the feature store whose float32 rows rescore the candidates
    (default: the one it was built from, when it still holds every indexed id; else the bits).
    Queries are embedded with the long-text policy the index records (``"long"``).

    Raises:
        UnsafeModelError: a file ``index.json`` names is not one of the index's files, lies
            outside the folder, is not a regular file, or changed since it was saved.
        ArtifactError: not a saved index, or it does not match its ids, its backbone or its
            compact record.
        UsageError: an option that does not apply to this index (``rescore`` or ``features``
            but on binary rows, ``nprobe`` but on an IVF index, ``features`` with ``rescore=0``).
        StoreError: ``features`` is not a feature store, holds another backbone, or lacks ids.
        UnsupportedInputError: the IVF lists searched hold fewer than ``k`` rows (raise ``nprobe``).
    """
    import faiss

    folder = current(Path(path), INDEX_FILE)
    meta = read_meta(folder, INDEX_FILE, "index")
    files = checked_files(folder, meta.get("files"), passages.files(meta, INDEX_FILES), "index")
    try:
        compact = Compact.from_record(meta["compact"]) if "compact" in meta else Compact()
    except UsageError as exc:
        raise ArtifactError(f"{folder}: its compact record cannot be used: {exc}") from None
    binary = compact.precision == "binary"
    _refuse(folder, meta, binary, rescore, nprobe, features)
    artifact = backbone_artifact(meta["backbone"], store, needed_by=str(folder))
    try:
        dims_ok = compact.output_dim(artifact.dim) == meta["dim"]
    except UsageError as exc:
        raise ArtifactError(f"{folder}: its compact record does not fit its backbone: {exc}") from None
    long = meta.get("long") or None
    ids = np.load(files["ids.npy"], allow_pickle=False)
    sources = np.load(files["sources.npy"], allow_pickle=False)
    index = (faiss.read_index_binary if binary else faiss.read_index)(str(files["index.faiss"]))
    width = (meta["dim"] + 7) // 8 if binary else meta["dim"]
    if (index.code_size if binary else index.d) != width or index.ntotal != len(ids) or not dims_ok:
        raise ArtifactError(f"{folder}: the index does not match its ids or its backbone (dimension or rows)")
    spans = passages.load(files, len(ids))
    contents = passages.load_contents(files, len(ids))
    nprobe = nprobe or meta.get("nprobe", NPROBE)
    rescored: str | None = None
    if binary:
        nn = BinaryNearestNeighbors.from_index(index, n_bits=meta["dim"], metric=meta["metric"], nprobe=nprobe,
                                               rescore=meta.get("rescore", RESCORE) if rescore is None else rescore)
        rescored = _attach_rescoring(nn, features or meta.get("features"), meta["backbone"]["digest"], ids, long,
                                     strict=features is not None)
    else:
        nn = FaissNearestNeighbors.from_index(index, metric=meta["metric"], nprobe=nprobe)
    return _hits(nn, compact, artifact, ids, sources, queries, k, rescored, long, spans, contents)


def search_store(features: str | os.PathLike[str], backbone: str, queries: list[Any], k: int = 10,
                 precision: str = "float32", dimensions: int | None = None, metric: str = "cosine",
                 rescore: int | None = None, store: str | None = None, long: str = "truncate",
                 chunk_overlap: int | None = None, max_chunks: int | None = None,
                 chunk_rows: bool = False) -> list[list[dict[str, Any]]]:
    """:func:`search` straight on a feature store's namespace, through an exact index built in
    memory (flat; binary rows: flat Hamming, the top ``rescore`` (default 100) candidates rescored
    by the float rows of the same store when they cover every id). ``long`` (with
    ``chunk_overlap`` / ``max_chunks``) chooses a namespace of chunked texts, and the queries are
    embedded the same way; ``chunk_rows=True`` searches its per-chunk rows (hits name their passage).
    ``store`` is the model store the backbone is found in.

    Raises:
        StoreError: no namespace of ``backbone`` of that variant, or no rows.
        UsageError: ``rescore`` for rows other than binary.
        BackboneNotAvailableError: the namespace's artifact is in no model store here.
    """
    check_options(precision, "flat", rescore, None)
    namespace = _find(features, backbone, precision, dimensions, long=long, chunk_overlap=chunk_overlap,
                      max_chunks=max_chunks, chunk_rows=chunk_rows)
    compact = _compact_of(namespace, precision, dimensions)
    nn, ids, sources, contents = build(namespace, compact, metric, "flat", rescore=RESCORE if rescore is None else rescore)
    spans = passages.of_namespace(namespace, ids)
    record = {"digest": namespace.digest, "name": namespace.name, "spec": namespace.info.get("spec")}
    artifact = backbone_artifact(record, store, needed_by=str(namespace.path))
    chunked = long_of(namespace.variant) or None
    rescored = _attach_rescoring(nn, features, namespace.digest, ids, chunked) if compact.precision == "binary" else None
    return _hits(nn, compact, artifact, ids, sources, queries, k, rescored, chunked, spans, contents)
