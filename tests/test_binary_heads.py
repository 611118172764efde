"""FAISS binary heads: Hamming search over packed-bit rows, float rescoring, IVF, kNN, pickling, saving.

Real vectors: Banking77 sentences embedded by a tiny random-weight backbone (the real MiniLM
tokenizer, 64-d mean of token embeddings: texts that share words lie close), real FAISS indexes.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from support import read_banking

import embedkit
from embedkit.encoders.compact import Compact
from embedkit.heads.binary import BinaryKNNClassifier, BinaryNearestNeighbors

pytest.importorskip("faiss")
torch = pytest.importorskip("torch")

K = 10


@pytest.fixture(scope="module")
def vectors(model_store):
    from tiny import Pooled, text_backbone

    artifact = embedkit.export(text_backbone("tiny-pooled-64", lambda: Pooled(dim=64), dim=64))
    corpus, labels = read_banking("train", 4000)
    queries, _ = read_banking("test", 120)
    X = embedkit.embed(corpus, backbone=str(artifact.path)).vectors
    Q = embedkit.embed(queries, backbone=str(artifact.path)).vectors
    return {"X": X, "Q": Q, "labels": np.asarray(labels), "artifact": artifact, "queries": queries}


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def exact_top(X, Q, k=K):
    return np.argsort(-(unit(Q) @ unit(X).T), axis=1, kind="stable")[:, :k]


def recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def hamming(bits_q, bits_x):
    return np.unpackbits(bits_q[:, None, :] ^ bits_x[None, :, :], axis=2).sum(axis=2)


def test_hamming_distances_are_the_bits_that_differ_and_the_candidates_are_a_true_top(vectors):
    X, Q = vectors["X"], vectors["Q"][:20]
    bits = Compact(precision="binary").apply(X)
    nn = BinaryNearestNeighbors(n_neighbors=K, rescore=0).fit(bits)
    distances, indices = nn.kneighbors(Q)
    full = hamming(Compact(precision="binary").apply(Q), bits)
    np.testing.assert_array_equal(distances, np.take_along_axis(full, indices, 1))
    # a true top k: no row outside it is nearer than the farthest inside
    for row, found in zip(full, indices):
        outside = np.delete(row, found)
        assert outside.min() >= row[found].max()
    assert (np.diff(distances, axis=1) >= 0).all()
    # packed queries give the same Hamming answer as float queries
    d2, i2 = nn.kneighbors(Compact(precision="binary").apply(Q))
    np.testing.assert_array_equal(i2, indices)


def test_rescoring_improves_recall_and_ranks_the_candidates_exactly_by_float_cosine(vectors):
    X, Q = vectors["X"], vectors["Q"]
    truth = exact_top(X, Q)
    bits = Compact(precision="binary").apply(X)
    hamming_only = BinaryNearestNeighbors(n_neighbors=K, rescore=0).fit(bits)
    rescored = BinaryNearestNeighbors(n_neighbors=K, rescore=100).fit(bits, rescore_vectors=X)
    r_hamming = recall(hamming_only.kneighbors(Q)[1], truth)
    distances, indices = rescored.kneighbors(Q)
    r_rescored = recall(indices, truth)
    print(f"recall@{K}: hamming {r_hamming:.3f}, rescored {r_rescored:.3f}")
    assert r_rescored >= r_hamming and r_rescored > r_hamming + 0.1, (r_hamming, r_rescored)
    # within the 100 Hamming candidates, the order is exactly the float cosine order
    candidates = hamming_only.kneighbors(Q, n_neighbors=100)[1]
    cos = np.einsum("qd,qcd->qc", unit(Q.astype(np.float64)), unit(X.astype(np.float64))[candidates])
    order = np.lexsort((candidates, -cos), axis=1)[:, :K]
    np.testing.assert_array_equal(indices, np.take_along_axis(candidates, order, 1))
    np.testing.assert_allclose(distances, 1.0 - np.take_along_axis(cos, order, 1), atol=1e-9)


def test_rescoring_against_restored_int8_rows_or_the_bits_alone(vectors):
    X, Q = vectors["X"], vectors["Q"]
    truth = exact_top(X, Q)
    bits = Compact(precision="binary").apply(X)
    int8 = Compact.fitted(X, precision="int8")
    with_int8 = BinaryNearestNeighbors(n_neighbors=K).fit(bits, rescore_vectors=int8.apply(X), rescore_compact=int8)
    with_bits = BinaryNearestNeighbors(n_neighbors=K).fit(bits)
    hamming_only = BinaryNearestNeighbors(n_neighbors=K, rescore=0).fit(bits)
    assert with_int8.rescore_source_ == "int8" and with_bits.rescore_source_ == "bits"
    with_floats = BinaryNearestNeighbors(n_neighbors=K).fit(bits, rescore_vectors=X)
    r_float, r_int8 = recall(with_floats.kneighbors(Q)[1], truth), recall(with_int8.kneighbors(Q)[1], truth)
    r_bits, r_hamming = recall(with_bits.kneighbors(Q)[1], truth), recall(hamming_only.kneighbors(Q)[1], truth)
    # int8 rows rescore about as well as float32 ones; the bits alone (float query x -1/+1) still beat Hamming
    assert r_int8 >= r_float - 0.03 and r_bits > r_hamming and r_int8 > r_bits, (r_float, r_int8, r_bits, r_hamming)
    # the int8 rescoring is the float query against Compact.restore of the candidates' rows
    candidates = hamming_only.kneighbors(Q[:5], n_neighbors=100)[1]
    restored = int8.restore(int8.apply(X)).astype(np.float64)
    cos = np.einsum("qd,qcd->qc", unit(Q[:5].astype(np.float64)), unit(restored)[candidates])
    order = np.lexsort((candidates, -cos), axis=1)[:, :K]
    np.testing.assert_array_equal(with_int8.kneighbors(Q[:5])[1], np.take_along_axis(candidates, order, 1))


def test_truncated_binary_rows_rescore_with_truncated_queries(vectors):
    X, Q = vectors["X"], vectors["Q"]
    compact = Compact(32, "binary")
    bits = compact.apply(X)
    assert bits.shape == (len(X), 4)
    truncated = Compact(32).apply(X)
    nn = BinaryNearestNeighbors(n_neighbors=K, dimensions=32).fit(bits, rescore_vectors=truncated)
    _, indices = nn.kneighbors(Q)  # queries of 64 dimensions: truncated and renormalised as the rows were
    candidates = BinaryNearestNeighbors(dimensions=32, rescore=0).fit(bits).kneighbors(Q, n_neighbors=100)[1]
    cos = np.einsum("qd,qcd->qc", unit(Q[:, :32].astype(np.float64)), unit(truncated.astype(np.float64))[candidates])
    order = np.lexsort((candidates, -cos), axis=1)[:, :K]
    np.testing.assert_array_equal(indices, np.take_along_axis(candidates, order, 1))
    truth = exact_top(truncated, Compact(32).apply(Q))
    assert recall(indices, truth) > recall(nn.kneighbors(Compact(32, "binary").apply(Q))[1], truth)  # vs Hamming only
    with pytest.raises(ValueError, match="dimensions=33"):
        BinaryNearestNeighbors(dimensions=33).fit(bits)


def test_ivf_index_at_scale_parameters_finds_what_flat_finds(vectors):
    X, Q = vectors["X"], vectors["Q"]
    bits = Compact(precision="binary").apply(X)
    flat = BinaryNearestNeighbors(n_neighbors=K).fit(bits, rescore_vectors=X)
    ivf = BinaryNearestNeighbors(n_neighbors=K, index="ivf", nprobe=64).fit(bits, rescore_vectors=X)
    auto = BinaryNearestNeighbors(exact_below=1000).fit(bits)
    assert flat.index_kind_ == "flat" and ivf.index_kind_ == auto.index_kind_ == "ivf"
    assert ivf._index.nlist == min(int(4 * np.sqrt(len(X))), len(X) // 39)
    truth = exact_top(X, Q)
    assert recall(ivf.kneighbors(Q)[1], truth) >= recall(flat.kneighbors(Q)[1], truth) - 0.05
    narrow = BinaryNearestNeighbors(n_neighbors=K, index="ivf", nprobe=1).fit(bits, rescore_vectors=X)
    assert recall(narrow.kneighbors(Q)[1], truth) < recall(ivf.kneighbors(Q)[1], truth)


def test_float_ivfpq_index_takes_scale_parameters_and_nprobe(vectors):
    from embedkit.heads.knn import FaissNearestNeighbors

    faiss = pytest.importorskip("faiss")
    X, Q = vectors["X"][:2500, :48], vectors["Q"][:, :48]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # PQ training's k-means: 4x slower with 2 OpenMP threads on a shared 2-core box
    try:
        nn = FaissNearestNeighbors(n_neighbors=K, metric="cosine", index="ivfpq", nprobe=1).fit(X)
    finally:
        faiss.omp_set_num_threads(threads)
    ivf = nn._index  # an IndexIVFPQ
    assert ivf.nlist == min(int(4 * np.sqrt(len(X))), len(X) // 39) and ivf.pq.M == 48 and X.shape[1] % ivf.pq.M == 0
    narrow = recall(nn.kneighbors(Q)[1], exact_top(X, Q))
    nn.set_params(nprobe=ivf.nlist)  # applied at query time, also to an index read back from disk
    wide = recall(nn.kneighbors(Q)[1], exact_top(X, Q))
    assert ivf.nprobe == ivf.nlist and wide > narrow


def test_pickles_with_its_index_and_a_memory_map_by_reference(vectors, tmp_path):
    X, Q = vectors["X"], vectors["Q"]
    np.save(tmp_path / "x.npy", X)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    bits = Compact(precision="binary").apply(X)
    for index in ("flat", "ivf"):
        nn = BinaryNearestNeighbors(n_neighbors=K, index=index).fit(bits, rescore_vectors=mapped)
        blob = pickle.dumps(nn)
        assert len(blob) < X.nbytes / 4  # the float rows are not copied into the pickle
        back = pickle.loads(blob)
        assert isinstance(back._rescore_vectors, np.memmap)
        for a, b in zip(back.kneighbors(Q), nn.kneighbors(Q)):
            np.testing.assert_array_equal(a, b)
    np.save(tmp_path / "x.npy", X[::-1].copy())  # the file changed under the pickled reference
    stale = pickle.loads(blob)
    with pytest.raises(ValueError, match="changed"):
        stale.kneighbors(Q)
    (tmp_path / "x.npy").unlink()  # gone: an error, never a quiet fall-back to the bits
    gone = pickle.loads(blob)
    with pytest.raises(ValueError, match="gone"):
        gone.kneighbors(Q)
    assert gone.set_rescore(X).kneighbors(Q)[1].shape == (len(Q), K)  # attached again


def test_bad_inputs_are_clear_errors(vectors):
    bits = Compact(precision="binary").apply(vectors["X"][:50])
    nn = BinaryNearestNeighbors(n_neighbors=3).fit(bits)
    with pytest.raises(ValueError, match="NaN"):
        nn.kneighbors(np.full((1, 64), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="bytes a row"):
        nn.kneighbors(np.zeros((1, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="n_neighbors"):
        nn.kneighbors(vectors["Q"][:1], n_neighbors=51)
    with pytest.raises(ValueError, match="rows"):
        BinaryNearestNeighbors().fit(bits, rescore_vectors=vectors["X"][:10])
    with pytest.raises(ValueError, match="dtype int32"):
        BinaryNearestNeighbors().fit(bits.astype(np.int32))
    with pytest.raises(ValueError, match="index must be"):
        BinaryNearestNeighbors(index="hnsw").fit(bits)


def test_knn_classifier_votes_like_a_brute_force_vote_and_saves_without_pickle(vectors, tmp_path):
    from sklearn.pipeline import Pipeline

    X, Q, labels = vectors["X"], vectors["Q"], vectors["labels"]
    clf = BinaryKNNClassifier(n_neighbors=7).fit(X, labels, rescore_vectors=X)
    _, idx = clf.kneighbors(Q)
    expected = [max(sorted(set(labels[row])), key=lambda c: (labels[row] == c).sum()) for row in idx]
    assert clf.predict(Q).tolist() == expected
    embedder = embedkit.Embedder(str(vectors["artifact"].path)).fit()
    saved = embedkit.save(Pipeline([("embed", embedder), ("head", clf)]), tmp_path / "model")
    assert sorted(p.name for p in saved.iterdir()) == ["head.json", "head.npz", "index.faiss", "model.json"]
    loaded = embedkit.load(saved)
    texts = vectors["queries"][:30]
    assert loaded.predict(texts).tolist() == clf.predict(embedder.transform(texts)).tolist()
    np.testing.assert_array_equal(loaded.predict_proba(texts), clf.predict_proba(embedder.transform(texts)))
