"""Heads and indexes on what a store really holds: IVF indexes sized to their rows, too few candidates
refused with a typed error, chunked namespaces trained on, indexed and searched (queries chunked as the
texts were), a ``--features`` store that must serve, options that do not apply refused, and two
namespaces that answer one request told apart.

Real feature stores and FAISS indexes, a tiny random-weight backbone (64-d, the real MiniLM tokenizer,
a 64-token window), Banking77 texts; the CLI in a subprocess (errors are one ``error:`` line, exit 1).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import read_banking, run_cli

import embedkit
from embedkit.heads.binary import BinaryNearestNeighbors
from embedkit.heads.indexes import search_store
from embedkit.heads.knn import FaissNearestNeighbors

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

CHUNKS = {"long": "chunk", "chunk_overlap": 8, "max_chunks": 16}  # the tiny backbone's window is 64 tokens


@pytest.fixture(scope="module")
def tiny64(model_store):
    from tiny import Pooled, text_backbone

    return embedkit.export(text_backbone("tiny-pooled-64", lambda: Pooled(dim=64), dim=64))


def _table(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def stores(tiny64, tmp_path_factory):
    """``small``: 250 texts (float32 + binary); ``mid``: 400 texts (float32); ``long``: 120 texts of 4
    classes, every third one several sentences long (past the window), extracted chunked only."""
    folder = tmp_path_factory.mktemp("options")
    texts, labels = read_banking("train")
    small = _table(folder / "small.csv", list(zip(texts[:250], labels[:250])))
    mid = _table(folder / "mid.csv", list(zip(texts[:400], labels[:400])))
    classes = sorted(set(labels))[:4]
    rows = []
    for c in classes:
        mine = [t for t, lab in zip(texts, labels) if lab == c][:30]
        rows += [(" ".join(mine[i:i + 12]) if i % 3 == 0 else t, c) for i, t in enumerate(mine)]
    long_table = _table(folder / "long.csv", rows)
    out = {"folder": folder, "small_table": small, "long_table": long_table, "long_texts": [t for t, _ in rows]}
    for name, table in (("small", small), ("mid", mid)):
        out[name] = folder / name
        embedkit.extract(str(table), str(tiny64.path), str(out[name]), column="text")
    embedkit.compact_features(str(out["small"]), tiny64.name, precision="binary")
    out["long"] = folder / "long"
    embedkit.extract(str(long_table), str(tiny64.path), str(out["long"]), column="text", **CHUNKS)
    return out


def refused(done, *words: str) -> None:
    """A command refused with one ``error:`` line naming ``words``, exit 1, no traceback."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "error:" in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


# -- 1. IVF indexes sized to their rows -------------------------------------------------------------
def test_ivfpq_on_fewer_rows_than_its_codebook_is_a_typed_error_naming_the_minimum(stores, tiny64, tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(embedkit.UnsupportedInputError, match="at least 256 rows"):
        FaissNearestNeighbors(index="ivfpq").fit(rng.standard_normal((250, 64)).astype(np.float32))
    fitted = FaissNearestNeighbors(index="ivfpq").fit(rng.standard_normal((256, 64)).astype(np.float32))
    assert fitted.index_params_ == {"nlist": 6, "m": 64, "nbits": 8}  # what was chosen, said
    # auto never picks an IVF-PQ it cannot train
    assert FaissNearestNeighbors(exact_below=10, memory_budget_mb=1e-6).fit(
        rng.standard_normal((200, 64)).astype(np.float32)).index_kind_ == "flat"
    # the binary IVF index and HNSW train on any number of rows
    for n in (1, 2, 5, 40):
        X = rng.standard_normal((n, 64)).astype(np.float32)
        assert BinaryNearestNeighbors(index="ivf", n_neighbors=1).fit(X).kneighbors(X)[1].ravel().tolist() == list(range(n))
        assert FaissNearestNeighbors(index="hnsw", n_neighbors=1).fit(X).kneighbors(X)[1].shape == (n, 1)

    done = run_cli("index", str(stores["small"]), "--out", str(tmp_path / "pq"), "--kind", "ivfpq")
    refused(done, "at least 256 rows", "got 250", "flat")
    assert not (tmp_path / "pq").exists()
    done = run_cli("train-head", str(stores["small"]), "--labels", str(stores["small_table"]), "--label-column",
                   "category", "--out", str(tmp_path / "head"), "--head", "faiss-knn", "--param", "index=ivfpq",
                   "--no-progress")
    refused(done, "--param", "at least 256 rows")
    assert not (tmp_path / "head").exists()
    built = run_cli("index", str(stores["mid"]), "--out", str(tmp_path / "pq4"), "--kind", "ivfpq")
    assert built.returncode == 0 and "ivfpq index (nlist 10, m 64, nbits 8)" in built.stdout, built.stderr
    assert json.loads((tmp_path / "pq4" / "index.json").read_text())["ivf"] == {"nlist": 10, "m": 64, "nbits": 8}


# -- 2. too few candidates --------------------------------------------------------------------------
def test_an_ivf_search_with_too_few_candidates_is_a_typed_error_never_a_traceback(stores, tmp_path):
    built = run_cli("index", str(stores["small"]), "--out", str(tmp_path / "bivf"), "--precision", "binary",
                    "--kind", "ivf")
    assert built.returncode == 0 and "ivf index (nlist 6)" in built.stdout, built.stderr
    done = run_cli("search", str(tmp_path / "bivf"), "card", "-k", "100", "--nprobe", "1", "--rescore", "0")
    refused(done, "found only", "-k 100", "--nprobe 6")
    with pytest.raises(embedkit.UnsupportedInputError, match=r"k=100.*nprobe=1"):
        embedkit.search(tmp_path / "bivf", ["card"], k=100, nprobe=1, rescore=0)
    every = run_cli("search", str(tmp_path / "bivf"), "card", "-k", "100", "--nprobe", "6", "--json")
    assert every.returncode == 0 and len(json.loads(every.stdout)[0]["neighbours"]) == 100, every.stderr
    # the float IVF-PQ path, the same
    assert run_cli("index", str(stores["mid"]), "--out", str(tmp_path / "pq"), "--kind", "ivfpq").returncode == 0
    refused(run_cli("search", str(tmp_path / "pq"), "card", "-k", "100", "--nprobe", "1"), "found only", "--nprobe")
    with pytest.raises(embedkit.UnsupportedInputError, match="found only"):
        embedkit.search(tmp_path / "pq", ["card"], k=100, nprobe=1)


# -- 3. chunked namespaces --------------------------------------------------------------------------
def test_a_store_of_chunked_vectors_only_names_them_and_the_flag_that_asks_for_them(stores, tmp_path):
    long_store = str(stores["long"])
    for argv in (["train-head", long_store, "--labels", str(stores["long_table"]), "--label-column", "category",
                  "--out", str(tmp_path / "h"), "--no-progress"],
                 ["index", long_store, "--out", str(tmp_path / "ix")],
                 ["search", long_store, "card"]):
        refused(run_cli(*argv), "chunked vectors only", "chunk-o8-m16", "pass --long chunk")
    refused(run_cli("search", long_store, "card", "--chunk-overlap", "8"), "--long chunk")
    with pytest.raises(embedkit.StoreError, match="long='chunk'"):
        embedkit.train_head(long_store, "tiny-pooled-64", str(stores["long_table"]), label_column="category")


def test_heads_and_indexes_on_chunked_vectors_embed_new_texts_chunked(stores, tiny64, tmp_path):
    long_store, texts = str(stores["long"]), stores["long_texts"]
    out = tmp_path / "run"
    done = run_cli("train-head", long_store, "--labels", str(stores["long_table"]), "--label-column", "category",
                   "--out", str(out), "--long", "chunk", "--no-progress")
    assert done.returncode == 0 and "chunked texts (overlap 8, at most 16 windows" in done.stdout, done.stderr
    assert {k: v for k, v in json.loads((out / "report.json").read_text())["features"].items()
            if k in CHUNKS} == CHUNKS
    manifest = json.loads((out / "model" / "model.json").read_text())
    assert {k: manifest["embedder"][k] for k in CHUNKS} == CHUNKS  # recorded, so load chunks new texts
    model = embedkit.load(out / "model")
    new = [" ".join(texts[i] for i in range(0, 60, 3)), texts[1]]  # a text far past the window, a short one
    chunked = embedkit.embed(new, backbone=str(tiny64.path), **CHUNKS).vectors
    truncated = embedkit.embed(new, backbone=str(tiny64.path)).vectors
    head = model.steps[-1][1]
    np.testing.assert_allclose(model.predict_proba(new), head.predict_proba(chunked), atol=1e-6)
    assert not np.allclose(head.predict_proba(chunked[:1]), head.predict_proba(truncated[:1]))  # the test can fail

    # an index of the chunked namespace records the policy and searches with chunked queries
    built = run_cli("index", long_store, "--out", str(tmp_path / "ix"), "--long", "chunk")
    assert built.returncode == 0 and "chunked texts" in built.stdout, built.stderr
    assert json.loads((tmp_path / "ix" / "index.json").read_text())["long"] == CHUNKS
    ids, X = embedkit.FeatureStore(long_store).load(tiny64.name, long="chunk")
    X = np.asarray(X, np.float64)
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ (chunked[0] / np.linalg.norm(chunked[0]))
    expected = [(str(ids[i]), 1.0 - cos[i]) for i in np.argsort(-cos, kind="stable")[:5]]
    for hits in (embedkit.search(tmp_path / "ix", new[:1], k=5)[0],
                 json.loads(run_cli("search", str(tmp_path / "ix"), new[0], "-k", "5", "--json").stdout)[0]["neighbours"],
                 search_store(long_store, tiny64.name, new[:1], k=5, long="chunk")[0]):
        assert [h["id"] for h in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([h["distance"] for h in hits], [d for _, d in expected], atol=1e-5)
    direct = run_cli("search", long_store, new[0], "-k", "5", "--long", "chunk", "--json")
    assert [h["id"] for h in json.loads(direct.stdout)[0]["neighbours"]] == [i for i, _ in expected], direct.stderr
    refused(run_cli("search", str(tmp_path / "ix"), "card", "--long", "chunk"), "--long", "namespace it was built on")
    path = embedkit.save_index(long_store, tiny64.name, tmp_path / "lib", long="chunk")
    assert json.loads((path / "index.json").read_text())["long"] == CHUNKS


# -- 9. an explicit --features store must serve -----------------------------------------------------
def test_a_features_store_named_explicitly_must_serve_and_the_output_says_how_it_scored(stores, tiny64, tmp_path):
    index = tmp_path / "bin"
    assert run_cli("index", str(stores["small"]), "--out", str(index), "--precision", "binary").returncode == 0
    (tmp_path / "empty").mkdir()
    refused(run_cli("search", str(index), "card", "-k", "2", "--features", str(tmp_path / "empty")),
            "--features", "not a feature store")
    refused(run_cli("search", str(index), "card", "-k", "2", "--features", str(stores["long"])),
            "--features", "holds no float32 rows of the indexed backbone", "chunk-o8-m16")
    few = tmp_path / "few"
    embedkit.extract(read_banking("train", 30)[0], str(tiny64.path), str(few))
    refused(run_cli("search", str(index), "card", "-k", "2", "--features", str(few)), "lacks 220 of the 250")
    with pytest.raises(embedkit.StoreError, match="lacks 220"):
        embedkit.search(index, ["card"], k=2, features=few)
    served = run_cli("search", str(index), "card", "-k", "2", "--features", str(stores["mid"]), "--json")
    assert {h["rescored"] for h in json.loads(served.stdout)[0]["neighbours"]} == {"float32"}, served.stderr
    # the recorded store gone: scored by the bits, and the human-readable output says so
    meta = json.loads((index / "index.json").read_text())
    meta["features"] = str(tmp_path / "gone")
    (index / "index.json").write_text(json.dumps(meta))
    shown = run_cli("search", str(index), "card", "-k", "2")
    assert shown.returncode == 0 and "sign bits as -1/+1, not float32 rows" in shown.stdout, shown.stderr
    hamming = run_cli("search", str(index), "card", "-k", "2", "--rescore", "0")
    assert "Hamming distance between sign bits only" in hamming.stdout, hamming.stderr


# -- 10. options that do not apply are refused ------------------------------------------------------
def test_options_that_do_not_apply_to_the_rows_or_the_index_are_refused(stores, tmp_path):
    small = str(stores["small"])
    refused(run_cli("index", small, "--out", str(tmp_path / "a"), "--precision", "binary", "--kind", "ivfpq"),
            "--kind", "binary rows take", "ivf is their IVF index")
    embedkit.compact_features(small, "tiny-pooled-64", precision="int8")
    refused(run_cli("index", small, "--out", str(tmp_path / "b"), "--precision", "int8", "--rescore", "5"),
            "--rescore", "binary rows")
    refused(run_cli("index", small, "--out", str(tmp_path / "c"), "--kind", "flat", "--nprobe", "3"), "--nprobe")
    refused(run_cli("index", small, "--out", str(tmp_path / "d"), "--kind", "hnsw", "--memory-budget-mb", "5"),
            "--memory-budget-mb")
    assert not any((tmp_path / name).exists() for name in "abcd")
    flat = tmp_path / "flat"
    assert run_cli("index", small, "--out", str(flat), "--kind", "flat").returncode == 0
    for option, value, why in (("--rescore", "5", "binary rows"), ("--nprobe", "3", "no lists to probe"),
                               ("--features", small, "binary rows")):
        refused(run_cli("search", str(flat), "card", option, value), option, why)
    with pytest.raises(embedkit.UsageError, match="rescore"):
        embedkit.search(flat, ["card"], rescore=5)
    refused(run_cli("search", small, "card", "--rescore", "5"), "--rescore")  # a float namespace searched directly


# -- 11. two namespaces answer one request ----------------------------------------------------------
def test_two_namespaces_that_answer_one_request_are_told_apart_by_what_differs(stores, tiny64, tmp_path):
    store = tmp_path / "two"
    shutil.copytree(stores["mid"], store)
    embedkit.compact_features(str(store), tiny64.name, precision="int8")
    other = tmp_path / "other"  # the same backbone's int8 rows calibrated on other vectors, copied in
    embedkit.extract(read_banking("test", 50)[0], str(tiny64.path), str(other))
    made = embedkit.compact_features(str(other), tiny64.name, precision="int8")
    shutil.copytree(made.namespace, store / tiny64.name / Path(made.namespace).name)
    calibrations = {ns.compact.calibration.digest[:16] for ns in embedkit.FeatureStore(store).namespaces()
                    if ns.compact.precision == "int8"}
    assert len(calibrations) == 2
    done = run_cli("search", str(store), "card", "--precision", "int8")
    refused(done, "differ only in their int8 calibration", "move the other folder", *calibrations)
    assert "chunk_overlap" not in done.stderr and "--chunk-overlap" not in done.stderr
    with pytest.raises(embedkit.StoreError, match="calibration"):
        embedkit.save_index(str(store), tiny64.name, tmp_path / "ix", precision="int8")
    # two chunk settings: name the one wanted
    chunked = tmp_path / "chunked"
    shutil.copytree(stores["long"], chunked)
    embedkit.extract(str(stores["long_table"]), str(tiny64.path), str(chunked), column="text", long="chunk",
                     chunk_overlap=4, max_chunks=16)
    refused(run_cli("search", str(chunked), "card", "--long", "chunk"), "chunk-o4-m16", "chunk-o8-m16",
            "--chunk-overlap")
    assert run_cli("search", str(chunked), "card", "--long", "chunk", "--chunk-overlap", "4").returncode == 0
