"""Embedder as a scikit-learn transformer: conventions, pickling, pipelines, parallel search."""
import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from support import read_banking

import embedkit


@pytest.fixture(scope="module")
def fitted(minilm):
    return embedkit.Embedder("minilm-l6").fit()


def test_init_stores_parameters_verbatim_and_loads_nothing():
    emb = embedkit.Embedder("does-not-exist", device="gpu", threads=-3)
    assert emb.get_params()["backbone"] == "does-not-exist" and emb.get_params()["device"] == "gpu"
    with pytest.raises(embedkit.UnknownBackboneError):
        emb.fit()


def test_transform_before_fit_is_refused():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        embedkit.Embedder().transform(["x"])


def test_shapes_and_empty_input(fitted, minilm):
    assert fitted.transform(["hello", "world"]).shape == (2, 384)
    assert fitted.transform([]).shape == (0, 384)
    assert fitted.digest_ == minilm.digest and fitted.n_features_out_ == 384
    names = fitted.get_feature_names_out()
    assert len(names) == 384 and names[0] == "minilm_l6_0"


def test_accepts_series_arrays_and_one_column_frames(fitted):
    texts = ["card not working", "exchange rate"]
    ref = fitted.transform(texts)
    for X in (pd.Series(texts), np.array(texts, dtype=object), pd.DataFrame({"t": texts}), tuple(texts)):
        np.testing.assert_array_equal(fitted.transform(X), ref)
    with pytest.raises(TypeError, match="single string"):
        fitted.transform("one string")
    with pytest.raises(ValueError, match="single column"):
        fitted.transform(pd.DataFrame({"a": texts, "b": texts}))


def test_bad_items_raise_a_typed_error_listing_them(fitted):
    with pytest.raises(embedkit.InvalidInputError) as info:
        fitted.transform(["fine", None, b"\xff"])
    assert [(e.index, e.code) for e in info.value.errors] == [(1, "not_text"), (2, "invalid_utf8")]
    assert isinstance(info.value, ValueError)


def test_set_output_pandas(fitted):
    emb = clone(fitted).set_output(transform="pandas").fit()
    frame = emb.transform(pd.Series(["a", "b"], index=[10, 11]))
    assert isinstance(frame, pd.DataFrame) and frame.shape == (2, 384)
    assert list(frame.columns[:2]) == ["minilm_l6_0", "minilm_l6_1"]


def test_clone_and_pickle(fitted):
    fitted.transform(["warm the session up"])
    blob = pickle.dumps(fitted)
    assert len(blob) < 100_000  # the ONNX session and weights are not inside
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(restored.transform(["same output"]), fitted.transform(["same output"]))
    cloned = clone(fitted)
    assert not hasattr(cloned, "digest_") and cloned.get_params() == fitted.get_params()


def test_pipeline_and_parallel_grid_search(minilm):
    texts, labels = read_banking("train", 600)
    keep = [i for i, y in enumerate(labels) if y in set(sorted(set(labels))[:6])]
    X = [texts[i] for i in keep]
    y = [labels[i] for i in keep]
    pipe = Pipeline([("embed", embedkit.Embedder("minilm-l6", threads=1)), ("head", LogisticRegression(max_iter=1000))])
    search = GridSearchCV(pipe, {"head__C": [0.5, 5.0]}, cv=2, n_jobs=2)
    search.fit(X, y)
    assert search.best_score_ > 0.5
    assert search.predict(X[:3]).shape == (3,)
