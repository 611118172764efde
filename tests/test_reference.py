"""The issue's must-show numbers on real data: parity with sentence-transformers, accuracy."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.pipeline import Pipeline
from support import read_banking

import embedkit


def test_matches_sentence_transformers_on_1000_banking_texts(minilm):
    from sentence_transformers import SentenceTransformer

    from embedkit_text import minilm_folder

    texts, _ = read_banking("test", 1000)
    ours = embedkit.Embedder("minilm-l6").fit().transform(texts)
    ref = SentenceTransformer(str(minilm_folder()), device="cpu").encode(texts, batch_size=64)
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.99999, cosine.min()


@pytest.fixture(scope="module")
def banking_pipeline(minilm):
    train_x, train_y = read_banking("train")
    test_x, test_y = read_banking("test")
    pipe = Pipeline([("embed", embedkit.Embedder("minilm-l6")), ("head", LogisticRegression(max_iter=1000))])
    pipe.fit(train_x, train_y)
    return pipe, test_x, test_y, train_x, train_y


def test_full_banking77_accuracy(banking_pipeline):
    pipe, test_x, test_y, _, _ = banking_pipeline
    accuracy = accuracy_score(test_y, pipe.predict(test_x))
    print(f"Banking77 full train -> test accuracy: {accuracy:.4f}")
    assert accuracy >= 0.90


def mteb_protocol(x_train, y_train, x_test, y_test, runs=10, per_label=8, seed=42):
    """MTEB's few-shot classification: per run, 8 random examples per label, LogisticRegression."""
    rng = np.random.RandomState(seed)
    y_train = np.asarray(y_train)
    scores = []
    for _ in range(runs):
        order = rng.permutation(len(y_train))
        counts: dict = {}
        picked = []
        for i in order:
            if counts.get(y_train[i], 0) < per_label:
                counts[y_train[i]] = counts.get(y_train[i], 0) + 1
                picked.append(i)
        head = LogisticRegression(max_iter=100).fit(x_train[picked], y_train[picked])
        scores.append(accuracy_score(y_test, head.predict(x_test)))
    return float(np.mean(scores))


def test_mteb_protocol_replay(banking_pipeline):
    pipe, test_x, test_y, train_x, train_y = banking_pipeline
    embedder = pipe.named_steps["embed"]
    score = mteb_protocol(embedder.transform(train_x), train_y, embedder.transform(test_x), test_y)
    print(f"MTEB protocol Banking77 accuracy: {score:.4f} (published 0.8004)")
    assert abs(score - 0.8004) <= 0.01
