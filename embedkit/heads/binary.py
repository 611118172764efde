"""FAISS binary heads: nearest neighbours and kNN classification over packed-bit rows, with float rescoring.

The rows are :class:`~embedkit.encoders.compact.Compact` ``binary`` rows: uint8 ``(N, ceil(d / 8))``,
one sign bit per dimension (``> 0`` -> 1), packed big-endian (``np.packbits``): the layout FAISS
binary indexes take. Distances between rows are Hamming distances (differing bits, 0..d).

=========================  ================================================================
``index``                  what is built
=========================  ================================================================
``flat`` (exact)           ``IndexBinaryFlat``: every row's Hamming distance
``ivf``                    ``IndexBinaryIVF``: ``nlist = 4 sqrt(N)`` lists (at most N / 39, so
                           each list has 39 training rows, FAISS' minimum), trained on a
                           seeded sample of ``256 nlist`` rows; ``nprobe`` lists per query
``auto`` (default)         flat below ``exact_below`` rows (1,000,000: a flat Hamming scan
                           reads ``d / 8`` bytes a row, 1/32 of a float32 scan), else IVF
=========================  ================================================================

**Rescoring.** Hamming distance ranks coarsely (ties are common at small ``d``). The recipe of
Yamada et al. 2021 (*Efficient Passage Retrieval with Hashing for Open-domain Question
Answering*), as sentence-transformers applies it (``semantic_search_faiss(rescore=True,
rescore_multiplier=...)`` in ``sentence_transformers/quantization.py``; the guide
https://sbert.net/examples/applications/embedding-quantization/README.html): retrieve
``rescore`` candidates by Hamming distance with the query's bits, then rank only those by the
float query against the candidates' vectors. Default 100 candidates (the figure issue 25 asks to
measure; at ``k=10`` it is sentence-transformers' ``rescore_multiplier=10``). The candidates'
vectors are, in order of preference:

1. float vectors given to ``fit`` (``rescore_vectors``: an array or memory-mapped store rows),
2. compact rows given with the :class:`Compact` that restores them (``rescore_compact``, e.g.
   int8 rows: :meth:`Compact.restore`, 4x smaller than float32),
3. none given: the candidates' own bits as -1 / +1 per dimension (sentence-transformers' own
   rescoring: the float query against the binary document vectors).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ..encoders.compact import Compact
from .knn import METRICS, _faiss, too_few, votes

BINARY_INDEXES = ("auto", "flat", "ivf")
RESCORE = 100  # Hamming candidates rescored by default


def _bits(X: Any, dimensions: int | None, what: str = "X") -> tuple[np.ndarray, int, np.ndarray | None]:
    """``(packed rows, bits per row, float rows or None)`` of packed uint8 rows or float embeddings."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (packed uint8 bits or float embeddings), "
                         f"got shape {X.shape}")
    if X.dtype == np.uint8:
        d = dimensions or 8 * X.shape[1]
        if (d + 7) // 8 != X.shape[1]:
            raise ValueError(f"{what} has {X.shape[1]} bytes a row: packed bits of {8 * X.shape[1] - 7}.."
                             f"{8 * X.shape[1]} dimensions, not dimensions={d}")
        return np.ascontiguousarray(X), d, None
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{what} must be packed bits (uint8) or float embeddings, got dtype {X.dtype}")
    if not np.isfinite(X).all():
        raise ValueError(f"{what} contains NaN or infinity")
    d = dimensions or X.shape[1]
    if d > X.shape[1]:
        raise ValueError(f"{what} has {X.shape[1]} dimensions, fewer than dimensions={d}")
    return np.ascontiguousarray(np.packbits(X[:, :d] > 0, axis=1)), d, X


class BinaryNearestNeighbors(BaseEstimator):
    """Nearest neighbours by Hamming distance over a FAISS binary index, with float rescoring.

    Args:
        n_neighbors: default k for :meth:`kneighbors`.
        metric: how rescored candidates are ranked: ``cosine`` (distance 1 - cosine similarity),
            ``inner_product`` (distance -<q, v>) or ``euclidean``.
        index: ``auto`` | ``flat`` | ``ivf`` (see the module's table).
        exact_below: ``auto`` uses a flat index below this many rows.
        nprobe: IVF lists searched per query.
        rescore: Hamming candidates ranked again by the float query (0: Hamming distance only).
        dimensions: bits per row ``d`` (None: 8 x the row bytes for packed rows, the columns of
            float rows). Float inputs keep their first ``d`` dimensions' signs.
        random_state: seed of the IVF training sample.

    ``fit(X, rescore_vectors=None, rescore_compact=None, rescore_rows=None)``: ``X`` packed
    uint8 ``(N, ceil(d / 8))`` or float embeddings ``(N, >= d)`` (binarised here).
    ``rescore_vectors``: float32 ``(N, D')`` (or compact rows that ``rescore_compact`` restores);
    row ``i`` of the index is ``rescore_vectors[rescore_rows[i]]`` when ``rescore_rows`` (int64
    ``(N,)``) is given, else ``rescore_vectors[i]``. Nothing is copied: a memory-mapped array is
    read only at the candidates' rows. It is pickled by reference (its file, which must hold the
    same bytes when unpickled: size and modification time are checked at query time).
    """

    def __init__(self, n_neighbors: int = 5, metric: str = "cosine", index: str = "auto",
                 exact_below: int = 1_000_000, nprobe: int = 16, rescore: int = RESCORE,
                 dimensions: int | None = None, random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.index = index
        self.exact_below = exact_below
        self.nprobe = nprobe
        self.rescore = rescore
        self.dimensions = dimensions
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.index not in BINARY_INDEXES:
            raise ValueError(f"index must be one of {', '.join(BINARY_INDEXES)}, got {self.index!r}")
        for name in ("n_neighbors", "nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.rescore, bool) or not isinstance(self.rescore, (int, np.integer)) or self.rescore < 0:
            raise ValueError(f"rescore must be an int >= 0 (0: Hamming distance only), got {self.rescore!r}")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
            raise ValueError(f"dimensions must be a positive int or None, got {d!r}")

    def _build(self, bits: np.ndarray) -> Any:
        faiss = _faiss()
        n, width = bits.shape
        kind = self.index if self.index != "auto" else ("flat" if n < self.exact_below else "ivf")
        if kind == "flat":
            index = faiss.IndexBinaryFlat(8 * width)
        else:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(8 * width), 8 * width, nlist)
            rng = np.random.default_rng(self.random_state)
            sample = bits if n <= 256 * nlist else bits[np.sort(rng.choice(n, size=256 * nlist, replace=False))]
            index.train(np.ascontiguousarray(sample))
        index.add(bits)
        if kind == "ivf":
            index.make_direct_map()  # the candidates' bits are read back for rescoring without vectors
        self.index_kind_ = kind
        return index

    def fit(self, X: Any, y: Any = None, rescore_vectors: Any = None, rescore_compact: Compact | None = None,
            rescore_rows: Any = None) -> "BinaryNearestNeighbors":
        """Build the index over ``X`` (see the class docstring for the arguments).

        Raises:
            ValueError: a bad parameter, ``X`` not packed uint8 bits of ``dimensions`` nor finite
                floats, or rescoring vectors that do not cover the rows.
        """
        self._check_params()
        bits, d, _ = _bits(X, self.dimensions)
        self._index = self._build(bits)
        self.n_samples_fit_, self.n_bits_, self.n_features_in_ = len(bits), d, bits.shape[1]
        self.set_rescore(rescore_vectors, rescore_compact, rescore_rows)
        return self

    def set_rescore(self, vectors: Any = None, compact: Compact | None = None, rows: Any = None) -> "BinaryNearestNeighbors":
        """Attach (or, with None, drop) the vectors that rescore candidates; see the class docstring."""
        check_is_fitted(self, "n_samples_fit_")
        self._rescore_vectors, self._rescore_compact, self._rescore_rows = None, None, None
        self._reference = None
        self.rescore_source_ = "bits"
        if vectors is None:
            if compact is not None or rows is not None:
                raise ValueError("rescore_compact and rescore_rows go with rescore_vectors")
            return self
        if not hasattr(vectors, "shape") or len(vectors.shape) != 2:
            raise ValueError(f"rescore_vectors must be a 2-D array, got {type(vectors).__name__}")
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.shape != (self.n_samples_fit_,) or (len(rows) and (rows.min() < 0 or rows.max() >= len(vectors))):
                raise ValueError(f"rescore_rows must be {self.n_samples_fit_} row numbers of rescore_vectors "
                                 f"(0..{len(vectors) - 1})")
        elif len(vectors) != self.n_samples_fit_:
            raise ValueError(f"rescore_vectors has {len(vectors)} rows, the index {self.n_samples_fit_}; "
                             "give rescore_rows to map index rows to vector rows")
        if compact is not None:
            if not isinstance(compact, Compact) or compact.precision not in ("int8", "uint8", "float32"):
                raise ValueError("rescore_compact must be the int8, uint8 or float32 Compact that made rescore_vectors")
            if np.dtype(vectors.dtype) != compact.dtype:
                raise ValueError(f"rescore_vectors are {vectors.dtype}, rescore_compact makes {compact.dtype}")
        elif not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(f"rescore_vectors must be float (or give rescore_compact), got dtype {vectors.dtype}")
        self._rescore_vectors, self._rescore_compact, self._rescore_rows = vectors, compact, rows
        self.rescore_source_ = compact.precision if compact is not None else "float32"
        return self

    # -- querying -----------------------------------------------------------------------------
    def kneighbors(self, X: Any, n_neighbors: int | None = None, return_distance: bool = True) -> Any:
        """Indices (and distances) of the nearest fitted rows, nearest first.

        ``X``: float query embeddings ``(n, D)`` (their first ``d`` signs are the query bits;
        with ``rescore`` > 0 the top ``rescore`` Hamming candidates are ranked by the float
        query under ``metric``), or packed uint8 queries ``(n, ceil(d / 8))`` (Hamming only:
        packed queries have no floats to rescore with).

        Returns ``(distances, indices)``, both ``(n, k)``: float64 distances, as
        :meth:`FaissNearestNeighbors.kneighbors` gives them for ``metric`` when rescored (cosine
        in [0, 2]), else Hamming distances (bits, 0..d); int64 row indices. Ties are ordered by
        row index.

        Raises:
            ValueError: k larger than the rows, queries of another width, non-finite queries,
                float queries shorter than the rescoring vectors need.
            UnsupportedInputError: the IVF lists searched hold fewer than k rows (raise ``nprobe``).
        """
        check_is_fitted(self, "n_samples_fit_")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_neighbors must be a positive int, got {k!r}")
        if k > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                             f"n_samples_fit = {self.n_samples_fit_}")
        bits, _, floats = _bits(X, self.n_bits_, "the queries")
        rescoring = floats is not None and self.rescore > 0
        m = min(self.n_samples_fit_, max(k, self.rescore)) if rescoring else k
        if self.index_kind_ == "ivf":
            self._index.nprobe = min(self.nprobe, self._index.nlist)
        hamming, indices = self._index.search(bits, m)
        indices = indices.astype(np.int64)
        found = int((indices >= 0).sum(axis=1).min())
        if found < k:  # the nprobe lists searched hold too few rows: refused, never padded
            raise too_few(found, k, "binary IVF", self.nprobe, getattr(self._index, "nlist", None))
        if rescoring:
            distances = self.rescored(floats, indices)
        else:
            distances = np.where(indices >= 0, hamming, np.iinfo(np.int32).max).astype(np.float64)
        order = np.lexsort((indices, distances), axis=1)[:, :k]  # by distance, then by row
        indices, distances = np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)
        return (distances, indices) if return_distance else indices

    def _candidates(self, ids: np.ndarray, q_dim: int) -> tuple[np.ndarray, int]:
        """float32 rows of the candidates ``ids`` (flat) and the query dimensions they compare with."""
        self._check_reference()  # a memory map pickled by reference: still there, unchanged
        vectors = self._rescore_vectors
        if vectors is None:
            return Compact(self.n_bits_, "binary").restore(self._codes(ids)), self.n_bits_
        where = ids if self._rescore_rows is None else self._rescore_rows[ids]
        order = np.argsort(where, kind="stable")  # ascending reads: sequential pages of a memory map
        rows = np.empty((len(where), vectors.shape[1]), dtype=vectors.dtype)
        rows[order] = vectors[where[order]]
        if self._rescore_compact is not None:
            rows = self._rescore_compact.restore(rows)
        return np.asarray(rows, dtype=np.float32), rows.shape[1]

    def _codes(self, ids: np.ndarray) -> np.ndarray:
        """The packed rows ``ids`` read back from the index."""
        if self.index_kind_ == "flat":
            size = self._index.ntotal * self._index.code_size
            view = np.asarray(_faiss().rev_swig_ptr(self._index.xb.data(), size)).reshape(-1, self._index.code_size)
            return view[ids]
        unique, inverse = np.unique(ids, return_inverse=True)
        codes = np.stack([self._index.reconstruct(int(i)) for i in unique])
        return codes[inverse]

    def rescored(self, queries: np.ndarray, indices: np.ndarray, chunk: int = 256) -> np.ndarray:
        """float64 distances (under ``metric``) of float queries ``(n, D)`` to candidate rows
        ``indices`` ``(n, m)`` (-1: none, distance +inf)."""
        check_is_fitted(self, "n_samples_fit_")
        out = np.full(indices.shape, np.inf)
        for start in range(0, len(indices), chunk):
            cand = indices[start:start + chunk]
            valid = cand >= 0
            rows, dim = self._candidates(cand[valid], queries.shape[1])
            q = np.asarray(queries[start:start + chunk], dtype=np.float64)
            if dim > q.shape[1]:
                raise ValueError(f"the queries have {q.shape[1]} dimensions; the rescoring vectors {dim}")
            if dim < q.shape[1]:  # truncated rows: the query truncated (and renormalised) as they were
                q = Compact(dim).truncate(q).astype(np.float64)
            v = rows.astype(np.float64)
            if self.metric == "cosine":
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
                v = v / np.where((n := np.linalg.norm(v, axis=1, keepdims=True)) > 0, n, 1.0)
            qi = np.repeat(np.arange(len(cand)), valid.sum(axis=1))
            if self.metric == "euclidean":
                d = np.sqrt(((q[qi] - v) ** 2).sum(-1))
            else:
                ip = (q[qi] * v).sum(-1)
                d = np.clip(1.0 - ip, 0.0, 2.0) if self.metric == "cosine" else -ip
            block = out[start:start + chunk]
            block[valid] = d
        return out

    # -- persistence --------------------------------------------------------------------------
    def _check_reference(self) -> None:
        ref = getattr(self, "_reference", None)
        if ref is None:
            return
        try:
            st = os.stat(ref["filename"])
        except OSError as exc:
            raise ValueError(f"the rescoring vectors' file {ref['filename']} is gone ({exc}); "
                             "attach them again with set_rescore") from None
        if (st.st_size, st.st_mtime_ns) != (ref["size"], ref["mtime_ns"]):
            raise ValueError(f"the rescoring vectors' file {ref['filename']} changed since this head was "
                             "pickled; attach the current rows with set_rescore")

    @classmethod
    def from_index(cls, faiss_index: Any, /, n_bits: int | None = None, **params: Any) -> "BinaryNearestNeighbors":
        """A fitted instance around a FAISS binary index read back from disk (no rows re-added)."""
        faiss = _faiss()
        self = cls(**params)
        self._index = faiss_index
        self.index_kind_ = "ivf" if isinstance(faiss_index, faiss.IndexBinaryIVF) else "flat"
        if self.index_kind_ == "ivf" and faiss_index.direct_map.no():
            faiss_index.make_direct_map()  # the candidates' bits are read back for rescoring without vectors
        self.n_samples_fit_ = int(faiss_index.ntotal)
        self.n_features_in_ = int(faiss_index.code_size)
        self.n_bits_ = int(n_bits or params.get("dimensions") or 8 * faiss_index.code_size)
        self.set_rescore(None)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        index = state.pop("_index", None)
        if index is not None:
            state["_index_bytes"] = _faiss().serialize_index_binary(index)
        vectors = state.get("_rescore_vectors")
        if isinstance(vectors, np.memmap) and vectors.filename:
            st = os.stat(vectors.filename)
            state["_rescore_vectors"] = None
            state["_reference"] = {"filename": str(vectors.filename), "offset": int(vectors.offset),
                                   "dtype": vectors.dtype.str, "shape": tuple(vectors.shape),
                                   "order": "F" if vectors.flags.f_contiguous and not vectors.flags.c_contiguous else "C",
                                   "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        data = state.pop("_index_bytes", None)
        self.__dict__.update(state)
        if data is not None:
            self._index = _faiss().deserialize_index_binary(data)
        ref = state.get("_reference")
        if ref is not None and os.path.isfile(ref["filename"]):
            self._rescore_vectors = np.memmap(ref["filename"], dtype=np.dtype(ref["dtype"]), mode="r",
                                              offset=ref["offset"], shape=tuple(ref["shape"]), order=ref["order"])


class BinaryKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classification over :class:`BinaryNearestNeighbors`.

    ``fit(X, y, **rescoring)`` and ``predict(X)`` take float embeddings (binarised here) or
    packed uint8 rows, as :meth:`BinaryNearestNeighbors.fit` and ``kneighbors``; ``weights`` as
    :class:`~embedkit.heads.knn.FaissKNNClassifier`'s (``uniform``, ``distance``, a callable).
    """

    def __init__(self, n_neighbors: int = 5, weights: str = "uniform", metric: str = "cosine", index: str = "auto",
                 exact_below: int = 1_000_000, nprobe: int = 16, rescore: int = RESCORE,
                 dimensions: int | None = None, random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.metric = metric
        self.index = index
        self.exact_below = exact_below
        self.nprobe = nprobe
        self.rescore = rescore
        self.dimensions = dimensions
        self.random_state = random_state

    def neighbor_params(self) -> dict[str, Any]:
        """The parameters this classifier passes on to its :class:`BinaryNearestNeighbors`."""
        return {k: v for k, v in self.get_params().items() if k != "weights"}

    def fit(self, X: Any, y: Any, **rescoring: Any) -> "BinaryKNNClassifier":
        if not callable(self.weights) and self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform', 'distance' or a callable, got {self.weights!r}")
        if self.weights == "distance" and self.metric == "inner_product" and self.rescore:
            raise ValueError("weights='distance' needs distances >= 0, and inner_product distances (-<x, y>) "
                             "can be negative: use metric='cosine' or weights='uniform'")
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must be one label per row of X ({len(X)}), got shape {y.shape}")
        check_classification_targets(y)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self.nn_ = BinaryNearestNeighbors(**self.neighbor_params()).fit(X, **rescoring)
        self.n_features_in_ = self.nn_.n_features_in_
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "nn_")
        distances, indices = self.nn_.kneighbors(X)
        return votes(distances, self._y[indices], len(self.classes_), self.weights)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def kneighbors(self, X: Any, n_neighbors: int | None = None, return_distance: bool = True) -> Any:
        check_is_fitted(self, "nn_")
        return self.nn_.kneighbors(X, n_neighbors, return_distance)
