"""FAISS heads: scikit-learn's estimator checks, exact agreement with KNeighborsClassifier, clear errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedkit.heads import FaissKNNClassifier, FaissNearestNeighbors

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
