"""Compact vectors on Banking77: accuracy and retrieval recall@10 for float32, int8 (calibrated),
uint8, binary and truncated dimensions, with bytes per vector, beside sentence-transformers'
``quantize_embeddings`` (the anchor) on the very same float vectors (issue 25).

all-MiniLM-L6-v2 (embedkit's ``minilm-l6``) embeds Banking77 train (10,003) and test (3,080) from
../shared/data once. Then, per variant:

- accuracy: LogisticRegression (max_iter 2000) trained on the train vectors of that variant and
  scored on the test vectors (compact rows go in as :meth:`Compact.restore` gives them: int8 /
  uint8 at the middle of their step, binary as +-1; embedkit's heads do the same);
- recall@10: each test sentence is a query against the train sentences; the reference is exact
  float32 cosine search; a variant's top 10 (cosine on its truncated vectors, dot product on the
  restored int8 / uint8 rows, Hamming distance on the binary rows, and binary with float rescoring
  of the top 100, the recipe sentence-transformers recommends in its embedding quantization guide,
  through embedkit's :class:`~embedkit.heads.binary.BinaryNearestNeighbors`) against the reference's;
- bytes per vector as stored (the row width times the dtype size; no index overhead).

int8 / uint8 calibration ranges are fitted on the train vectors only (the user's own stored
vectors; the test vectors are "later" vectors quantised with the recorded ranges).
Targets: int8 accuracy within 0.5 points of float32; binary + rescoring recall@10 >= 0.95.

    .venv/bin/python benchmarks/compact.py
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77"
CACHE = ROOT / ".bench" / "compact-banking77.npz"
K = 10


def read(name: str) -> tuple[list[str], list[str]]:
    with open(DATA / name, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def vectors() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    train_x, train_y = read("train.csv")
    test_x, test_y = read("test.csv")
    if CACHE.exists():
        data = np.load(CACHE)
        return data["train"], train_y, data["test"], test_y
    import embedkit

    start = time.perf_counter()
    train = embedkit.embed(train_x, "minilm-l6").vectors
    test = embedkit.embed(test_x, "minilm-l6").vectors
    print(f"embedded {len(train_x) + len(test_x):,} sentences in {time.perf_counter() - start:.0f} s")
    CACHE.parent.mkdir(exist_ok=True)
    np.savez(CACHE, train=train, test=test)
    return train, train_y, test, test_y


def top_k(scores: np.ndarray, k: int = K) -> np.ndarray:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist())]))


def accuracy(train: np.ndarray, train_y: list[str], test: np.ndarray, test_y: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(train, train_y)
    return float(clf.score(test, test_y)) * 100


def main() -> int:
    from embedkit.encoders.compact import Compact
    from embedkit.heads.binary import BinaryNearestNeighbors

    print(f"CPU: {cpu()}")
    train, train_y, test, test_y = vectors()
    d = train.shape[1]
    exact = top_k(test @ train.T)
    rows: list[tuple[str, float, float, float, str]] = []

    def add(name: str, tr: np.ndarray, te: np.ndarray, found: np.ndarray, nbytes: float, note: str = "") -> None:
        rows.append((name, accuracy(tr, train_y, te, test_y), recall(found, exact), nbytes, note))

    add("float32", train, test, exact, 4 * d)
    for dims in (256, 128):
        c = Compact(dims)
        tr, te = c.apply(train), c.apply(test)
        add(f"dimensions {dims}", tr, te, top_k(te @ tr.T), 4 * dims, "truncated + renormalised; MiniLM is not Matryoshka-trained")
    for precision in ("int8", "uint8"):
        c = Compact.fitted(train, precision=precision, source="banking77 train")
        tr, te = c.restore(c.apply(train)), c.restore(c.apply(test))
        add(precision, tr, te, top_k(te @ tr.T), d, "calibrated on the train vectors")
    c = Compact.fitted(train, 256, "int8", source="banking77 train")
    tr, te = c.restore(c.apply(train)), c.restore(c.apply(test))
    add("dimensions 256 + int8", tr, te, top_k(te @ tr.T), 256)
    b = Compact(None, "binary")
    btr, bte = b.apply(train), b.apply(test)
    hamming = BinaryNearestNeighbors(n_neighbors=K, rescore=0).fit(btr)
    found = hamming.kneighbors(bte, return_distance=False)
    add("binary (Hamming)", b.restore(btr), b.restore(bte), found, d / 8)
    rescored = BinaryNearestNeighbors(n_neighbors=K, rescore=100).fit(btr, rescore_vectors=train)
    found = rescored.kneighbors(test, return_distance=False)
    add("binary + float rescoring of top 100", b.restore(btr), b.restore(bte), found, d / 8,
        "the float vectors are read for 100 candidates per query")
    try:
        from sentence_transformers.quantization import quantize_embeddings

        q_tr = quantize_embeddings(train, "int8", calibration_embeddings=train).astype(np.float32)
        q_te = quantize_embeddings(test, "int8", calibration_embeddings=train).astype(np.float32)
        add("anchor: sentence-transformers int8", q_tr, q_te, top_k(q_te @ q_tr.T), d,
            "quantize_embeddings, same calibration vectors; raw int8 codes as features")
        u_tr = np.unpackbits(quantize_embeddings(train, "ubinary"), axis=1).astype(np.float32) * 2 - 1
        u_te = np.unpackbits(quantize_embeddings(test, "ubinary"), axis=1).astype(np.float32) * 2 - 1
        add("anchor: sentence-transformers ubinary", u_tr, u_te, top_k(u_te @ u_tr.T), d / 8, "Hamming order via +-1 dot product")
    except ImportError as exc:
        print(f"sentence-transformers anchor: not run: {exc}")
    base = rows[0][1]
    print(f"\nBanking77: train {len(train_y):,} / test {len(test_y):,}, {d} dimensions; recall@{K} vs exact float32 search")
    print(f"{'variant':<40} {'accuracy':>9} {'vs fp32':>8} {'recall@10':>10} {'bytes/vec':>10}  note")
    for name, acc, rec, nbytes, note in rows:
        print(f"{name:<40} {acc:>8.2f}% {acc - base:>+8.2f} {rec:>10.3f} {nbytes:>10.0f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
