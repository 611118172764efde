"""Saved models: predict from raw inputs, refuse another backbone, never run a file's code unasked."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

import embedkit
from embedkit import Embedder
from embedkit.heads import FaissKNNClassifier
from embedkit.training import make_head
from support import read_banking


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
    manifest["head"] = {"kind": kind, "class": "x", "files": {name: embedkit.artifacts.sha256_file(path / name)}}
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
    manifest["head"]["files"]["head.skops"] = embedkit.artifacts.sha256_file(path / "head.skops")
    (path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.UnsafeModelError, match="system"):
        embedkit.load(path)
