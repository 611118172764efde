"""FAISS heads: scikit-learn's estimator checks, exact agreement with KNeighborsClassifier, clear errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedkit.heads.knn import FaissKNNClassifier, FaissNearestNeighbors

pytest.importorskip("faiss")


@parametrize_with_checks([FaissKNNClassifier(n_neighbors=3), FaissNearestNeighbors(n_neighbors=3)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def blobs(n=300, d=16, classes=4, seed=0):
    centres = np.random.default_rng(99).normal(size=(classes, d)) * 2  # the same classes for every sample
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), np.asarray([f"c{v}" for v in y])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_exact_index_predicts_like_sklearn(metric, weights):
    X, y = blobs()
    Xq, _ = blobs(n=200, seed=1)
    ours = FaissKNNClassifier(n_neighbors=7, metric=metric, weights=weights, index="flat").fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=7, metric=metric, weights=weights, algorithm="brute").fit(X, y)
    np.testing.assert_array_equal(ours.predict(Xq), ref.predict(Xq))
    np.testing.assert_allclose(ours.predict_proba(Xq), ref.predict_proba(Xq), atol=1e-6)
    d1, i1 = ours.kneighbors(Xq)
    d2, i2 = NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(X).kneighbors(Xq)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-4)


def test_nan_and_inf_are_refused():
    X, y = blobs()
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FaissKNNClassifier().fit(bad, y)
    model = FaissKNNClassifier().fit(X, y)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        model.predict(bad)


def test_wrong_dimension_is_a_clear_error_not_an_assertion():
    X, y = blobs(d=16)
    model = FaissKNNClassifier().fit(X, y)
    with pytest.raises(ValueError, match="16 features"):
        model.predict(np.zeros((2, 8), np.float32))


@pytest.mark.parametrize("index", ["hnsw", "ivfpq"])
def test_approximate_indexes_mostly_agree_and_auto_chooses_by_size_and_budget(index):
    X, y = blobs(n=4000, d=32, classes=5)
    Xq, yq = blobs(n=300, d=32, classes=5, seed=1)
    exact = FaissKNNClassifier(index="flat").fit(X, y).predict(Xq)
    approx = FaissKNNClassifier(index=index).fit(X, y).predict(Xq)
    assert (approx == exact).mean() >= 0.97
    assert (exact == yq).mean() >= 0.9
    assert FaissNearestNeighbors(exact_below=1000).fit(X).index_kind_ == "hnsw"
    assert FaissNearestNeighbors(exact_below=1000, memory_budget_mb=0.1).fit(X).index_kind_ == "ivfpq"
    assert FaissNearestNeighbors().fit(X).index_kind_ == "flat"


def test_pickles_with_its_index():
    X, y = blobs()
    model = FaissKNNClassifier(index="hnsw").fit(X, y)
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict(X[:50]), model.predict(X[:50]))


def _inner_product(a, b):
    return -float(np.dot(a, b))


def _inverse_square(distances):
    return 1.0 / (1.0 + distances) ** 2


def random_vectors(n_train=600, n_fresh=150, d=384, classes=5, seed=0):
    """Random 384-d vectors with random labels; the 300 queries are 150 fitted rows and 150 fresh
    ones, so items are also scored against themselves (distance 0: the case that failed)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train, d)).astype(np.float32)
    y = rng.integers(0, classes, n_train)
    queries = np.concatenate([X[:300 - n_fresh], rng.normal(size=(n_fresh, d)).astype(np.float32)])
    return X, y, queries


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "inner_product"])
@pytest.mark.parametrize("weights", ["uniform", "distance", _inverse_square])
def test_equal_to_sklearn_on_random_384d_vectors_for_every_metric_and_weighting(metric, weights):
    X, y, Q = random_vectors()
    if metric == "inner_product" and weights == "distance":
        with pytest.raises(ValueError, match="inner_product"):  # 1 / negative distance is no weight
            FaissKNNClassifier(metric=metric, weights=weights).fit(X, y)
        return
    sk_metric = _inner_product if metric == "inner_product" else metric
    ours = FaissKNNClassifier(n_neighbors=5, metric=metric, weights=weights, index="flat").fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=5, metric=sk_metric, weights=weights, algorithm="brute").fit(X, y)
    proba = ours.predict_proba(Q)
    assert proba.min() >= 0.0 and proba.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(ours.predict(Q), ref.predict(Q))  # was 48 of 300 different (cosine, distance)
    np.testing.assert_allclose(proba, ref.predict_proba(Q), atol=1e-5)
    d1, i1 = ours.kneighbors(Q)
    d2, i2 = ref.kneighbors(Q)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=2e-6)  # scikit-learn computes in float32 here
    if metric != "inner_product":
        assert d1.min() >= 0.0  # was -6e-8 for cosine: an item scored above 1 against itself
        assert d1[:150, 0].max() < 1e-6 and (i1[:150, 0] == np.arange(150)).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_query_by_the_fitted_rows_themselves_matches_sklearn(metric):
    X, _, _ = random_vectors(n_train=400)
    d1, i1 = FaissNearestNeighbors(n_neighbors=4, metric=metric, index="flat").fit(X).kneighbors()
    d2, i2 = NearestNeighbors(n_neighbors=4, metric=metric, algorithm="brute").fit(X).kneighbors()
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=2e-6)


def test_cosine_distances_stay_in_their_range_on_approximate_indexes():
    X, _, Q = random_vectors(n_train=2000, d=64)
    for index in ("hnsw", "ivfpq"):
        d, _ = FaissNearestNeighbors(n_neighbors=5, metric="cosine", index=index).fit(X).kneighbors(Q)
        assert 0.0 <= d.min() and d.max() <= 2.0


@pytest.mark.parametrize("index", ["flat", "ivfpq"])
def test_memory_mapped_rows_added_in_chunks_give_the_index_of_the_array(tmp_path, monkeypatch, index):
    """Rows are normalised and added a chunk at a time (so a memory-mapped store is never copied
    whole): with chunks far smaller than the set, a memory map gives exactly the neighbours and
    distances of the same rows in memory, and of one chunk holding everything."""
    import embedkit.heads.knn as knn

    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 32)).astype(np.float32)
    path = tmp_path / "rows.f32"
    X.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    Q = rng.normal(size=(20, 32)).astype(np.float32)
    whole = FaissNearestNeighbors(n_neighbors=10, metric="cosine", index=index).fit(X).kneighbors(Q)
    monkeypatch.setattr(knn, "ADD_ROWS", 700)  # 5 chunks, the last one short
    for rows in (X, mapped):
        got = FaissNearestNeighbors(n_neighbors=10, metric="cosine", index=index).fit(rows).kneighbors(Q)
        np.testing.assert_array_equal(got[1], whole[1])
        np.testing.assert_allclose(got[0], whole[0], rtol=0, atol=1e-6)
