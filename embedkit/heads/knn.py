"""FAISS heads as scikit-learn estimators: ``FaissNearestNeighbors`` and ``FaissKNNClassifier``.

FAISS itself accepts NaN silently and raises a bare ``AssertionError`` on a wrong dimension;
these estimators validate like scikit-learn does (``ValueError`` naming the problem) before any
vector reaches an index. The index is chosen from the data size and a memory budget:

=========================  ================================================================
``index``                  what is built
=========================  ================================================================
``flat`` (exact)           ``IndexFlatIP`` (cosine, inner product) or ``IndexFlatL2``
``hnsw``                   ``IndexHNSWFlat`` (M=32): fast, approximate, full vectors in RAM
``ivfpq``                  ``IndexIVFPQ``: compressed codes for sets beyond the memory budget:
                           ``nlist = 4 sqrt(N)`` lists (at most N / 39), ``m`` sub-quantizers
                           of 8 bits, the largest of 64, 48, 32, ... dividing ``d``, trained
                           on a seeded sample of ``64 nlist`` rows (at least 9,984 = 39 x 256,
                           FAISS' minimum for the 256 codes of a sub-quantizer; at most all);
                           ``nprobe`` lists per query.
                           At least 256 rows (:data:`IVFPQ_MIN_ROWS`): each sub-quantizer learns
                           2^8 codes by k-means, which needs a training row per code (FAISS
                           recommends 39 per code); fewer is refused as an
                           :class:`~embedkit.errors.UnsupportedInputError` naming the minimum
``auto`` (default)         flat below ``exact_below`` rows (50,000); above it HNSW when the
                           vectors (plus graph) fit ``memory_budget_mb``, else IVF-PQ (flat
                           below 256 rows, where IVF-PQ cannot train)
=========================  ================================================================

``index_params_`` (after ``fit``) says what was built: ``{"nlist", "m", "nbits"}`` for IVF-PQ.
A query whose IVF lists searched (``nprobe``) or HNSW search (``ef_search``) yield fewer than
the ``k`` neighbours asked for is an :class:`~embedkit.errors.UnsupportedInputError` naming how
many were found and what to raise, never a short or padded answer.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import MissingDependencyError, UnsupportedInputError

METRICS = ("euclidean", "cosine", "inner_product")
INDEXES = ("auto", "flat", "hnsw", "ivfpq")
PQ_BITS = 8  # bits of each IVF-PQ sub-quantizer code: 2^8 centroids, learnt by k-means
IVFPQ_MIN_ROWS = 2 ** PQ_BITS  # k-means of 2^8 centroids needs at least as many training rows (FAISS refuses fewer)
TRAIN_PER_LIST = 64  # IVF-PQ training rows per list: FAISS warns below 39 and samples down to 256 itself
ADD_ROWS = 65536  # rows prepared and added to an index at a time (cosine: normalised copies of this many)


def ivf_lists(n: int) -> int:
    """IVF lists for ``n`` rows: ``4 sqrt(n)``, at most ``n / 39`` (FAISS' rows per centroid), at least 1."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def check_ivfpq_rows(n: int) -> None:
    """Refuse IVF-PQ on fewer rows than its product quantizer can train on.

    Raises:
        UnsupportedInputError: ``n`` < :data:`IVFPQ_MIN_ROWS` (the message names the minimum).
    """
    if n < IVFPQ_MIN_ROWS:
        raise UnsupportedInputError(
            f"index 'ivfpq' needs at least {IVFPQ_MIN_ROWS} rows to train, got {n}: each of its sub-quantizers learns "
            f"2^{PQ_BITS} = {IVFPQ_MIN_ROWS} codes by k-means, one training row per code at least (FAISS recommends "
            f"{39 * IVFPQ_MIN_ROWS:,}); at this size use index 'flat' (exact) or 'hnsw'")


def too_few(found: int, k: int, kind: str, nprobe: int | None = None, nlist: int | None = None,
            ef_search: int | None = None) -> UnsupportedInputError:
    """The error of a search that found ``found`` < ``k`` neighbours for some query."""
    if nlist is not None:
        how = (f"in the {min(nprobe or 1, nlist)} of its {nlist} lists searched (nprobe={nprobe}): raise nprobe "
               f"(nprobe={nlist} searches every list) or ask for fewer neighbours")
    elif ef_search is not None:
        how = f"with ef_search={ef_search}: raise ef_search or ask for fewer neighbours"
    else:
        how = "ask for fewer neighbours"
    return UnsupportedInputError(f"the {kind} index found only {found} neighbours for a query asking for k={k}, {how}")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError("faiss-cpu", "heads", "FAISS heads") from exc
    return faiss


def votes(distances: np.ndarray, labels: np.ndarray, n_classes: int, weights: Any) -> np.ndarray:
    """Class probabilities ``(n, n_classes)`` from the neighbours' distances and class numbers
    (both ``(n, k)``), weighted as scikit-learn's ``KNeighborsClassifier`` weights them."""
    if callable(weights):
        w = np.asarray(weights(distances), dtype=np.float64)
        if (~w.any(axis=1)).any():
            raise ValueError("every neighbour of some query got weight 0 from the weights callable")
    elif weights == "uniform":
        w = np.ones_like(distances)
    else:
        with np.errstate(divide="ignore"):
            w = 1.0 / distances
        exact = np.isinf(w)
        rows = exact.any(axis=1)
        w[rows] = exact[rows].astype(float)  # exact matches take the vote, as in scikit-learn
    proba = np.zeros((len(labels), n_classes))
    np.add.at(proba, (np.repeat(np.arange(len(labels)), labels.shape[1]), labels.ravel()), w.ravel())
    total = proba.sum(axis=1, keepdims=True)
    return proba / np.where(total > 0, total, 1.0)


class FaissNearestNeighbors(BaseEstimator):
    """Nearest neighbours over a FAISS index, with scikit-learn's API and input checks.

    Args:
        n_neighbors: default k for :meth:`kneighbors`.
        metric: ``euclidean`` (distances as scikit-learn's), ``cosine`` (1 - cosine
            similarity) or ``inner_product`` (distance = -<x, y>).
        index: ``auto`` | ``flat`` | ``hnsw`` | ``ivfpq`` (see the module's table).
        exact_below: ``auto`` uses an exact index below this many rows.
        memory_budget_mb: ``auto`` uses IVF-PQ when HNSW would not fit (None: no limit).
        nprobe: IVF lists searched per query; ``ef_search``: HNSW search breadth.
        random_state: seed for IVF training.
    """

    def __init__(self, n_neighbors: int = 5, metric: str = "euclidean", index: str = "auto",
                 exact_below: int = 50_000, memory_budget_mb: float | None = None, nprobe: int = 16,
                 ef_search: int = 128, random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.index = index
        self.exact_below = exact_below
        self.memory_budget_mb = memory_budget_mb
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------
    def _prepare(self, X: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """``X`` as the index sees it (unit rows for cosine; zero rows stay zero, as in scikit-learn)."""
        X = np.asarray(X, dtype=dtype)
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            X = X / np.where(norms > 0, norms, 1.0)
        return np.ascontiguousarray(X, dtype=dtype)

    def _choose(self, n: int, d: int) -> str:
        if self.index != "auto":
            return self.index
        if n < self.exact_below:
            return "flat"
        hnsw_mb = n * (d * 4 + 32 * 2 * 4) / 2**20
        if self.memory_budget_mb is None or hnsw_mb <= self.memory_budget_mb:
            return "hnsw"
        return "ivfpq" if n >= IVFPQ_MIN_ROWS else "flat"

    def _build(self, X: np.ndarray) -> Any:
        faiss = _faiss()
        n, d = X.shape
        kind = self._choose(n, d)
        ip = self.metric in ("cosine", "inner_product")
        self.index_params_: dict[str, int] = {}
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if kind == "flat":
            index = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, metric)
            index.hnsw.efSearch = self.ef_search
        else:
            check_ivfpq_rows(n)
            nlist = ivf_lists(n)
            m = next(m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d % m == 0 and m <= d)
            quantizer = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, PQ_BITS, metric)
            self.index_params_ = {"nlist": nlist, "m": m, "nbits": PQ_BITS}
            rng = np.random.default_rng(self.random_state)
            size = min(n, max(TRAIN_PER_LIST * nlist, 39 * IVFPQ_MIN_ROWS))
            rows = np.arange(n) if size == n else np.sort(rng.choice(n, size=size, replace=False))
            index.train(self._prepare(X[rows]))
            index.nprobe = min(self.nprobe, nlist)
        for start in range(0, n, ADD_ROWS):  # a chunk at a time: memory-mapped rows are never copied whole
            index.add(self._prepare(X[start:start + ADD_ROWS]))
        self.index_kind_ = kind
        return index

    def fit(self, X: Any, y: Any = None) -> "FaissNearestNeighbors":
        """Build the index over X (finite, 2-D numbers)."""
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, got {self.index!r}")
        if not isinstance(self.n_neighbors, (int, np.integer)) or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive int, got {self.n_neighbors!r}")
        X = validate_data(self, X, dtype=[np.float32, np.float64], ensure_min_samples=1)
        self._index = self._build(X)
        self.n_samples_fit_ = X.shape[0]
        return self

    # -- querying -----------------------------------------------------------------------------
    def kneighbors(self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True) -> Any:
        """Indices (and distances) of the nearest fitted rows, nearest first.

        Returns ``(distances, indices)``, both (n_queries, k): float64 distances as
        scikit-learn's ``NearestNeighbors(metric=...)`` gives them (euclidean and cosine never
        below 0, cosine at most 2) and int64 row indices. FAISS finds candidates in float32;
        on indexes that keep the vectors (flat, hnsw) the candidates' distances are computed
        again in float64 and ranked on those, so an item scores exactly 0 against itself and
        near ties are ordered as scikit-learn orders them. With ``X=None`` the fitted rows
        query themselves, each excluded from its own result, as in scikit-learn.
        """
        check_is_fitted(self, "n_samples_fit_")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_neighbors must be a positive int, got {k!r}")
        query_is_train = X is None
        keeps_vectors = self.index_kind_ != "ivfpq"
        if query_is_train:
            if not keeps_vectors:
                raise ValueError("kneighbors(X=None) needs an index that keeps the vectors (flat or hnsw)")
            queries = self._prepare(self._index.reconstruct_n(0, self.n_samples_fit_), np.float64)
            wanted = k + 1
        else:
            X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
            queries = self._prepare(X, np.float64)
            wanted = k
        if wanted > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                             f"n_samples_fit = {self.n_samples_fit_}, n_samples = {len(queries)}")
        # Extra candidates let the float64 distances reorder what float32 ranked as near ties.
        m = min(self.n_samples_fit_, wanted + k) if keeps_vectors else wanted
        self._search_params()
        scores, indices = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), m)
        found = int((indices >= 0).sum(axis=1).min()) if len(indices) else wanted
        if found < wanted:  # IVF lists or an HNSW search that hold too few rows: refused, never padded
            ivf = _faiss().extract_index_ivf(self._index) if self.index_kind_ == "ivfpq" else None
            raise too_few(found - (wanted - k), k, self.index_kind_, self.nprobe, ivf.nlist if ivf else None,
                          self.ef_search)
        missing = indices < 0  # past the k wanted, among the extra candidates: ranked last
        distances = self._exact(queries, np.where(missing, 0, indices)) if keeps_vectors else self._from_scores(scores)
        distances[missing] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")
        indices, distances = np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)
        if query_is_train:
            keep = indices != np.arange(len(indices))[:, None]
            keep &= np.cumsum(keep, axis=1) <= k  # the first k that are not the row itself
        else:
            keep = np.arange(indices.shape[1])[None, :] < k
            keep = np.broadcast_to(keep, indices.shape)
        indices = indices[keep].reshape(len(indices), k).astype(np.int64)
        if not return_distance:
            return indices
        return distances[keep].reshape(len(indices), k), indices

    def _search_params(self) -> None:
        """``nprobe`` / ``ef_search`` as set now (also on an index read back from disk)."""
        if self.index_kind_ == "ivfpq":
            ivf = _faiss().extract_index_ivf(self._index)
            ivf.nprobe = min(self.nprobe, ivf.nlist)
        elif self.index_kind_ == "hnsw":
            self._index.hnsw.efSearch = self.ef_search

    def _from_scores(self, scores: np.ndarray) -> np.ndarray:
        """Distances from FAISS scores (squared L2 or inner products), clipped to their range."""
        scores = scores.astype(np.float64)
        if self.metric == "euclidean":
            return np.sqrt(np.maximum(scores, 0.0))
        if self.metric == "cosine":
            return np.clip(1.0 - scores, 0.0, 2.0)
        return -scores

    def _exact(self, queries: np.ndarray, indices: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """float64 distances between each query and its candidate rows (rows read back from the index)."""
        out = np.empty(indices.shape, dtype=np.float64)
        for start in range(0, len(indices), chunk):
            cand = indices[start:start + chunk]
            rows = self._index.reconstruct_batch(cand.ravel()).reshape(*cand.shape, -1)
            rows = self._prepare(rows.reshape(-1, rows.shape[-1]), np.float64).reshape(rows.shape)
            q = queries[start:start + chunk, None, :]
            if self.metric == "euclidean":
                out[start:start + chunk] = np.sqrt(((q - rows) ** 2).sum(-1))
            elif self.metric == "cosine":
                out[start:start + chunk] = np.clip(1.0 - (q * rows).sum(-1), 0.0, 2.0)
            else:
                out[start:start + chunk] = -(q * rows).sum(-1)
        return out

    # -- persistence --------------------------------------------------------------------------
    @classmethod
    def from_index(cls, faiss_index: Any, /, **params: Any) -> "FaissNearestNeighbors":
        """A fitted instance around a FAISS index read back from disk (no vectors re-added)."""
        faiss = _faiss()
        index = faiss_index
        self = cls(**params)
        self._index = index
        self.n_features_in_ = int(index.d)
        self.n_samples_fit_ = int(index.ntotal)
        self.index_kind_ = ("flat" if isinstance(index, (faiss.IndexFlatIP, faiss.IndexFlatL2))
                            else "hnsw" if isinstance(index, faiss.IndexHNSWFlat) else "ivfpq")
        self.index_params_ = {}
        if self.index_kind_ == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            pq = getattr(faiss.downcast_index(ivf), "pq", None)
            self.index_params_ = {"nlist": int(ivf.nlist), **({"m": int(pq.M), "nbits": int(pq.nbits)} if pq else {})}
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        index = state.pop("_index", None)
        if index is not None:
            state["_index_bytes"] = _faiss().serialize_index(index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        data = state.pop("_index_bytes", None)
        self.__dict__.update(state)
        if data is not None:
            self._index = _faiss().deserialize_index(data)


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classification over :class:`FaissNearestNeighbors`.

    ``weights`` as in scikit-learn's ``KNeighborsClassifier``: ``uniform`` (majority vote; ties
    go to the first class in ``classes_``), ``distance`` (votes weighted by 1 / distance; when
    a query is at distance exactly 0 from some rows, those rows alone vote, equally) or a
    callable mapping the (n_queries, k) distance array to weights of the same shape. On an
    exact index it predicts as ``KNeighborsClassifier(algorithm="brute")`` with the same
    metric and weights. ``metric="inner_product"`` distances (-<x, y>) can be negative, so it
    takes ``uniform`` or callable weights only (``ValueError`` in ``fit`` otherwise).
    """

    def __init__(self, n_neighbors: int = 5, weights: str = "uniform", metric: str = "euclidean",
                 index: str = "auto", exact_below: int = 50_000, memory_budget_mb: float | None = None,
                 nprobe: int = 16, ef_search: int = 128, random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.metric = metric
        self.index = index
        self.exact_below = exact_below
        self.memory_budget_mb = memory_budget_mb
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> "FaissKNNClassifier":
        if not callable(self.weights) and self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform', 'distance' or a callable, got {self.weights!r}")
        if self.weights == "distance" and self.metric == "inner_product":
            raise ValueError("weights='distance' needs distances >= 0, and inner_product distances (-<x, y>) "
                             "can be negative: use metric='cosine' (normalised inner product) or weights='uniform'")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self.nn_ = FaissNearestNeighbors(**self.neighbor_params()).fit(X)
        return self

    def neighbor_params(self) -> dict[str, Any]:
        """The parameters this classifier passes on to its :class:`FaissNearestNeighbors`."""
        return {k: v for k, v in self.get_params().items() if k != "weights"}

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "nn_")
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        distances, indices = self.nn_.kneighbors(X)
        return votes(distances, self._y[indices], len(self.classes_), self.weights)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted before classes_ is touched
        return self.classes_[np.argmax(proba, axis=1)]

    def kneighbors(self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True) -> Any:
        check_is_fitted(self, "nn_")
        return self.nn_.kneighbors(X, n_neighbors, return_distance)
