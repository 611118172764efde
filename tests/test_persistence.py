"""Saved models: predict from raw inputs, refuse another backbone, never run a file's code unasked."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from support import read_banking

import embedkit
from embedkit import Embedder
from embedkit.heads.knn import FaissKNNClassifier
from embedkit.heads.training import make_head


@pytest.fixture(scope="module")
def data(minilm):
    texts, labels = read_banking("train")
    return texts[::25], labels[::25]  # the file is sorted by intent: every 25th row spans them all


@pytest.mark.parametrize("head", [
    LogisticRegression(max_iter=1000), FaissKNNClassifier(n_neighbors=5, metric="cosine"),
    make_head("mlp", {"max_iter": 50}), make_head("knn"), make_head("linear-svm"), make_head("ridge"),
])
def test_save_load_predicts_the_same_from_raw_inputs(data, tmp_path, head):
    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", head)]).fit(texts[:300], labels[:300])
    path = embedkit.save(pipe, tmp_path / "model")
    manifest = json.loads((path / "model.json").read_text())
    assert manifest["backbone"]["digest"] == pipe[0].digest_
    assert manifest["versions"]["scikit-learn"] and all(len(v) == 64 for v in manifest["head"]["files"].values())
    loaded = embedkit.load(path)
    np.testing.assert_array_equal(loaded.predict(texts[300:]), pipe.predict(texts[300:]))


def test_another_backbone_is_refused_naming_both(data, tmp_path):
    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=500))]).fit(texts[:100], labels[:100])
    path = embedkit.save(pipe, tmp_path / "model")
    manifest = json.loads((path / "model.json").read_text())
    manifest["backbone"]["digest"] = "0" * 64  # trained on features of some other export
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.ArtifactError) as info:
        embedkit.load(path)
    assert "000000000000" in str(info.value) and pipe[0].digest_[:12] in str(info.value)


def test_changed_head_file_is_refused(data, tmp_path):
    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=500))]).fit(texts[:100], labels[:100])
    path = embedkit.save(pipe, tmp_path / "model")
    with open(path / "head.skops", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(embedkit.UnsafeModelError, match="sha256"):
        embedkit.load(path)


class Payload:
    """Unpickling this writes a marker file: proof that a pickle ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _crafted(tmp_path, data, kind: str, name: str):
    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=500))]).fit(texts[:100], labels[:100])
    path = embedkit.save(pipe, tmp_path / "model")
    marker = tmp_path / "code-ran"
    blob = pickle.dumps(Payload(str(marker)))
    (path / "head.skops").unlink()
    (path / name).write_bytes(blob)
    manifest = json.loads((path / "model.json").read_text())
    manifest["head"] = {"kind": kind, "class": "x", "files": {name: embedkit.models.store.sha256_file(path / name)}}
    (path / "model.json").write_text(json.dumps(manifest))
    return path, marker


def test_crafted_pickle_head_is_refused_and_runs_no_code(data, tmp_path):
    path, marker = _crafted(tmp_path, data, "pickle", "head.pkl")
    with pytest.raises(embedkit.UnsafeModelError, match="trust_pickle"):
        embedkit.load(path)
    assert not marker.exists()  # nothing was unpickled
    embedkit.load(path, trust_pickle=True)  # the caller vouched for it: it is unpickled ...
    assert marker.read_text() == "pwned"  # ... which is exactly why it needs the flag


def test_pickle_disguised_as_skops_is_refused(data, tmp_path):
    path, marker = _crafted(tmp_path, data, "skops", "head.skops")
    with pytest.raises(embedkit.UnsafeModelError, match="not a skops file"):
        embedkit.load(path, trust_pickle=True)
    assert not marker.exists()


def test_skops_head_with_an_untrusted_type_is_refused(data, tmp_path):
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=500))]).fit(texts[:100], labels[:100])
    path = embedkit.save(pipe, tmp_path / "model")
    sio.dump(FunctionTransformer(os.system).fit(np.zeros((2, 2))), path / "head.skops")
    manifest = json.loads((path / "model.json").read_text())
    manifest["head"]["files"]["head.skops"] = embedkit.models.store.sha256_file(path / "head.skops")
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.UnsafeModelError, match="system"):
        embedkit.load(path)


@pytest.fixture(scope="module")
def features(minilm):
    """160 training texts of 4 intents (40 each, interleaved) and their vectors; 40 more texts after them."""
    texts, labels = read_banking("train")
    kept = sorted(set(labels))[:4]
    groups = [[(t, c) for t, c in zip(texts, labels) if c == k][:50] for k in kept]
    rows = [group[i] for i in range(50) for group in groups]
    texts, labels = [t for t, _ in rows], [c for _, c in rows]
    X = Embedder("minilm-l6").fit().transform(texts[:160])
    return texts, np.asarray(labels[:160]), X


def _heads_skops_lists_as_untrusted():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.svm import LinearSVC

    return [
        RandomForestClassifier(n_estimators=10, random_state=0),
        GradientBoostingClassifier(n_estimators=5, max_depth=2, random_state=0),
        HistGradientBoostingClassifier(max_iter=10, random_state=0),
        CalibratedClassifierCV(LinearSVC(), cv=2),
        CalibratedClassifierCV(LogisticRegression(max_iter=500), method="isotonic", cv=2),
    ]


@pytest.mark.parametrize("head", _heads_skops_lists_as_untrusted(), ids=lambda h: type(h).__name__)
def test_forest_boosting_and_calibrated_heads_load_back_and_predict_the_same(features, tmp_path, head):
    texts, labels, X = features
    head.fit(X, labels)
    embedder = Embedder("minilm-l6").fit()
    path = embedkit.save((embedder, head), tmp_path / "model")  # load refused these before
    loaded = embedkit.load(path)
    np.testing.assert_array_equal(loaded.predict(texts[160:200]), head.predict(embedder.transform(texts[160:200])))
    np.testing.assert_allclose(loaded[1].predict_proba(X[:20]), head.predict_proba(X[:20]))


class Shout(ClassifierMixin, BaseEstimator):
    """A class of the user's own: skops cannot prove loading it runs no code."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.repeat(self.classes_[0], len(X))


def double(X):
    return 2 * X


def test_a_head_load_would_refuse_is_refused_by_save_up_front(features, tmp_path):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    texts, labels, X = features
    embedder = Embedder("minilm-l6").fit()
    for head in (Shout().fit(X, labels),
                 make_pipeline(FunctionTransformer(double), LogisticRegression()).fit(X, labels),
                 FaissKNNClassifier(weights=lambda d: 1 / (1 + d)).fit(X, labels)):
        with pytest.raises(embedkit.UnsavableHeadError):
            embedkit.save((embedder, head), tmp_path / "model")
        assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == []


def _saved(tmp_path, data):
    texts, labels = data
    pipe = Pipeline([("embed", Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=500))]).fit(texts[:60], labels[:60])
    return embedkit.save(pipe, tmp_path / "model")


def _rename_files(path, files):
    manifest = json.loads((path / "model.json").read_text())
    manifest["head"]["files"] = files
    (path / "model.json").write_text(json.dumps(manifest))


def test_files_named_by_model_json_stay_inside_the_folder(data, tmp_path):
    from embedkit.models.store import sha256_file

    path = _saved(tmp_path, data)
    outside = tmp_path / "secret.txt"
    outside.write_text("not the model's")
    for files in ({"../secret.txt": sha256_file(outside)}, {str(outside): sha256_file(outside)}):
        _rename_files(path, files)
        with pytest.raises(embedkit.UnsafeModelError, match="expected|outside|relative"):
            embedkit.load(path)
    # a pickle head naming a file outside, with the right sha256, is refused even when trusted
    manifest = json.loads((path / "model.json").read_text())
    manifest["head"] = {"kind": "pickle", "class": "x", "files": {"../secret.txt": sha256_file(outside)}}
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.UnsafeModelError, match="outside"):
        embedkit.load(path, trust_pickle=True)
    # a symlink inside the folder pointing out, and a FIFO that would hang the hash
    (path / "link.pkl").symlink_to(outside)
    manifest["head"]["files"] = {"link.pkl": sha256_file(outside)}
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.UnsafeModelError, match="outside"):
        embedkit.load(path, trust_pickle=True)
    os.mkfifo(path / "fifo.pkl")
    manifest["head"]["files"] = {"fifo.pkl": "0" * 64}
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.UnsafeModelError, match="not a regular file"):
        embedkit.load(path, trust_pickle=True)


def test_a_head_file_model_json_does_not_list_is_never_read_unchecked(data, tmp_path):
    path = _saved(tmp_path, data)
    (path / "other.txt").write_text("x")
    _rename_files(path, {"other.txt": embedkit.models.store.sha256_file(path / "other.txt")})  # head.skops now unchecked
    with pytest.raises(embedkit.UnsafeModelError, match="expected"):
        embedkit.load(path)
