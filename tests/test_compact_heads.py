"""Heads on compact features: trained on Compact.restore(rows), saved with their Compact, and applied
to new items through the very same Compact (calibration included) at predict time; search over a
compact namespace (saved binary and int8 indexes, and straight on a store) from the library and the CLI.

Real feature stores, a tiny random-weight backbone (64-d, the real MiniLM tokenizer), Banking77 texts.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from support import read_banking, run_cli

import embedkit
from embedkit.encoders.compact import Calibration, Compact
from embedkit.heads.compacted import CompactHead

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

CLASSES = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "pin_blocked", "cash_withdrawal_charge"]


@pytest.fixture(scope="module")
def tiny64(model_store):
    from tiny import Pooled, text_backbone

    return embedkit.export(text_backbone("tiny-pooled-64", lambda: Pooled(dim=64), dim=64))


@pytest.fixture(scope="module")
def corpus(tiny64, tmp_path_factory):
    """A labelled table of Banking77 texts of a few classes, extracted into a store with int8 and binary namespaces."""
    texts, labels = read_banking("train")
    rows = [(t, c) for t, c in zip(texts, labels) if c in CLASSES][:600]
    folder = tmp_path_factory.mktemp("compact")
    table = folder / "train.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    store = folder / "fs"
    embedkit.extract(str(table), str(tiny64.path), str(store), column="text")
    embedkit.compact_features(str(store), tiny64.name, precision="int8")
    embedkit.compact_features(str(store), tiny64.name, precision="binary")
    held_out, _ = read_banking("test", 400)
    return {"table": table, "store": store, "folder": folder, "new": held_out[:80]}


def test_compact_head_applies_its_compact_to_new_embeddings_never_the_floats(tiny64):
    from sklearn.linear_model import LogisticRegression

    texts, labels = read_banking("train", 400)
    X = embedkit.embed(texts, backbone=str(tiny64.path)).vectors
    # a deliberately narrow calibration: most values clip, so int8 and float predictions part ways
    narrow = Calibration(np.full(64, -0.05, np.float32), np.full(64, 0.05, np.float32), rows=2)
    compact = Compact(None, "int8", narrow)
    inner = LogisticRegression(max_iter=500).fit(compact.restore(compact.apply(X)), labels)
    head = CompactHead.wrap(inner, compact)
    new = embedkit.embed(read_banking("test", 200)[0], backbone=str(tiny64.path)).vectors
    manual = inner.predict(compact.restore(compact.apply(new)))
    assert head.predict(new).tolist() == manual.tolist()
    assert head.predict(compact.apply(new)).tolist() == manual.tolist()  # int8 rows are restored, not re-quantised
    np.testing.assert_array_equal(head.predict_proba(new), inner.predict_proba(compact.restore(compact.apply(new))))
    assert (inner.predict(new) != manual).any()  # the floats would have given other answers: the test can fail
    refit = CompactHead(LogisticRegression(max_iter=500), compact).fit(X, labels)
    assert refit.predict(new).tolist() == manual.tolist()
    with pytest.raises(ValueError, match="columns"):
        head.predict(compact.apply(new)[:, :10])


def test_a_head_trained_on_int8_features_quantises_new_items_with_the_recorded_calibration(corpus, tiny64, tmp_path):
    store = embedkit.FeatureStore(corpus["store"])
    namespace = store.find(tiny64.name, precision="int8")
    compact = namespace.compact
    report, model_path = embedkit.train_head(corpus["store"], tiny64.name, str(corpus["table"]), head="logreg",
                                             precision="int8", out=tmp_path / "run")
    manifest = json.loads((model_path / "model.json").read_text())
    assert manifest["format"] == 2 and manifest["compact"]["precision"] == "int8"
    assert manifest["compact"]["calibration"]["sha256"] == compact.calibration.digest
    assert json.loads((tmp_path / "run" / "report.json").read_text())["features"]["calibration"] == compact.calibration.digest

    model = embedkit.load(model_path)
    head = model.steps[-1][1]
    assert isinstance(head, CompactHead) and head.compact.calibration.digest == compact.calibration.digest
    # predictions equal the saved head applied to Compact(int8, recorded calibration) of fresh embeddings
    fresh = embedkit.embed(corpus["new"], backbone=str(tiny64.path)).vectors
    manual = head.head_.predict(compact.restore(compact.apply(fresh)))
    assert model.predict(corpus["new"]).tolist() == manual.tolist()
    np.testing.assert_array_equal(model.predict_proba(corpus["new"]),
                                  head.head_.predict_proba(compact.restore(compact.apply(fresh))))
    # the held-out metrics were measured on the restored int8 rows: the same features
    ids, rows = store.load(tiny64.name, precision="int8")
    assert rows.dtype == np.int8 and report.n_train + report.n_test == len(ids)

    # an altered calibration in model.json is refused, not used
    manifest["compact"]["calibration"]["low"][0] -= 0.25
    (model_path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.ArtifactError, match="sha256"):
        embedkit.load(model_path)
    manifest["compact"] = None  # a format-2 model without its compact record: never read as a float head
    (model_path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(embedkit.ArtifactError, match="compact"):
        embedkit.load(model_path)


def test_train_head_and_predict_on_binary_features_from_the_cli(corpus, tiny64, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train-head", str(corpus["store"]), "--backbone", tiny64.name, "--labels", str(corpus["table"]),
                   "--precision", "binary", "--head", "logreg", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "binary features" in done.stdout
    texts = corpus["new"][:12]
    predicted = run_cli("predict", str(out / "model"), *texts, "--json")
    assert predicted.returncode == 0, predicted.stderr
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    model = embedkit.load(out / "model")
    compact = model.steps[-1][1].compact
    assert compact.precision == "binary"
    fresh = embedkit.embed(texts, backbone=str(tiny64.path)).vectors
    assert labels == model.steps[-1][1].head_.predict(compact.restore(compact.apply(fresh))).tolist()
    missing = run_cli("train-head", str(corpus["store"]), "--backbone", tiny64.name, "--labels", str(corpus["table"]),
                      "--precision", "uint8", "--out", str(tmp_path / "none"), "--no-progress")
    assert missing.returncode == 1 and "uint8" in missing.stderr and "Traceback" not in missing.stderr


def test_saved_binary_index_rescores_from_the_float_namespace_and_says_so(corpus, tiny64, tmp_path):
    fs = corpus["store"]
    binary = embedkit.save_index(str(fs), tiny64.name, tmp_path / "bin", precision="binary")
    meta = json.loads((binary / "index.json").read_text())
    assert meta["format"] == 2 and meta["compact"]["precision"] == "binary" and meta["index_kind"] == "flat"
    queries = corpus["new"][:10]
    hits = embedkit.search(binary, queries, k=5)
    assert all(h["rescored"] == "float32" for q in hits for h in q)
    # the same answer as the library's binary head over the store's rows, rescored by the float rows
    from embedkit.heads.binary import BinaryNearestNeighbors

    store = embedkit.FeatureStore(fs)
    ids, bits = store.load(tiny64.name, precision="binary")
    float_ids, X = store.load(tiny64.name)
    assert np.array_equal(ids, float_ids)
    nn = BinaryNearestNeighbors(n_neighbors=5).fit(np.asarray(bits), rescore_vectors=X)
    distances, indices = nn.kneighbors(embedkit.embed(queries, backbone=str(tiny64.path)).vectors)
    assert [[h["id"] for h in q] for q in hits] == [[str(ids[i]) for i in row] for row in indices]
    np.testing.assert_allclose([[h["distance"] for h in q] for q in hits], distances, atol=1e-6)
    # Hamming only, and with the recorded feature store gone: rescored by the bits themselves
    assert all(h["rescored"] is None for q in embedkit.search(binary, queries, k=5, rescore=0) for h in q)
    meta["features"] = str(tmp_path / "gone")
    (binary / "index.json").write_text(json.dumps(meta))
    assert all(h["rescored"] == "bits" for q in embedkit.search(binary, queries, k=5) for h in q)
    # a store named explicitly must serve: a folder that is not one is an error, never the bits
    with pytest.raises(embedkit.StoreError, match="not a feature store"):
        embedkit.search(binary, queries, k=5, features=tmp_path)


def test_int8_index_and_cli_search_of_compact_namespaces(corpus, tiny64, tmp_path):
    fs = corpus["store"]
    built = run_cli("index", str(fs), "--backbone", tiny64.name, "--out", str(tmp_path / "i8"), "--precision", "int8")
    assert built.returncode == 0 and "int8 rows of 64 dimensions" in built.stdout, built.stderr
    queries = corpus["new"][:3]
    found = run_cli("search", str(tmp_path / "i8"), *queries, "-k", "4", "--json")
    assert found.returncode == 0, found.stderr
    from_index = [[h["id"] for h in q["neighbours"]] for q in json.loads(found.stdout)]
    # int8: the float query against Compact.restore of the rows, cosine
    store = embedkit.FeatureStore(fs)
    ns = store.find(tiny64.name, precision="int8")
    ids, rows = ns.load()
    restored = ns.compact.restore(np.asarray(rows)).astype(np.float64)
    q = embedkit.embed(queries, backbone=str(tiny64.path)).vectors.astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (restored / np.linalg.norm(restored, axis=1, keepdims=True)).T
    assert from_index == [[str(ids[i]) for i in np.argsort(-c, kind="stable")[:4]] for c in cos]
    # straight on the store: a binary namespace, Hamming only, scored as Hamming distances
    direct = run_cli("search", str(fs), *queries, "--backbone", tiny64.name, "--precision", "binary", "--rescore", "0",
                     "-k", "4", "--json")
    assert direct.returncode == 0, direct.stderr
    table = json.loads(direct.stdout)
    assert table[0]["score"] == "hamming distance" and not table[0]["higher_is_better"]
    assert all(float(h["distance"]).is_integer() for h in table[0]["neighbours"])
    refused = run_cli("search", str(tmp_path / "i8"), queries[0], "--precision", "binary")
    assert refused.returncode == 1 and "--precision" in refused.stderr
    hnsw = run_cli("index", str(fs), "--backbone", tiny64.name, "--out", str(tmp_path / "h"), "--precision", "binary",
                   "--kind", "hnsw")
    assert hnsw.returncode == 1 and "binary rows take" in hnsw.stderr and not Path(tmp_path / "h").exists()


def test_a_saved_embedder_that_makes_int8_rows_keeps_the_calibration_it_fitted(tiny64, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    texts, labels = read_banking("train", 300)
    embedder = embedkit.Embedder(str(tiny64.path), precision="int8").fit(texts)  # ranges fitted on these texts
    rows = embedder.transform(texts)
    assert rows.dtype == np.int8
    head = LogisticRegression(max_iter=500).fit(rows, labels)
    saved = embedkit.save(Pipeline([("embed", embedder), ("head", head)]), tmp_path / "model")
    manifest = json.loads((saved / "model.json").read_text())
    assert manifest["format"] == 2
    assert manifest["embedder"]["calibration"]["sha256"] == embedder.compact_.calibration.digest
    new = read_banking("test", 60)[0]
    loaded = embedkit.load(saved)
    np.testing.assert_array_equal(loaded.steps[0][1].transform(new), embedder.transform(new))
    assert loaded.predict(new).tolist() == head.predict(embedder.transform(new)).tolist()
    # a CompactHead on other compact rows than its Embedder makes is refused before anything is written
    other = CompactHead.wrap(LogisticRegression(max_iter=500).fit(np.asarray(rows, np.float32), labels), Compact(16))
    with pytest.raises(embedkit.UnsavableHeadError, match="other compact rows"):
        embedkit.save(Pipeline([("embed", embedder), ("head", other)]), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
