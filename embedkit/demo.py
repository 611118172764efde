"""The built-in demo: real MiniLM weights on a shipped Banking77 sample."""
from __future__ import annotations

import time
from typing import Any, TextIO

from .embedder import Embedder
from .inputs.samples import load_split


def run(out: TextIO, backbone: str = "minilm-l6", store: str | None = None) -> dict[str, Any]:
    """Embed, train LogisticRegression on the train sample, score the test sample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    print(f"Banking77 sample (CC BY 4.0): {len(train_x)} train / {len(test_x)} test texts, "
          f"{len(set(train_y))} intents", file=out)
    started = time.perf_counter()
    embedder = Embedder(backbone, store=store).fit()
    print(f"backbone {embedder.backbone_name_}: artifact {embedder.digest_[:16]} "
          f"({time.perf_counter() - started:.1f}s to export or load)", file=out)
    started = time.perf_counter()
    x_train = embedder.transform(train_x)
    x_test = embedder.transform(test_x)
    seconds = time.perf_counter() - started
    rate = (len(train_x) + len(test_x)) / seconds
    print(f"embedded {len(train_x) + len(test_x)} texts in {seconds:.1f}s: {rate:.0f} texts/s "
          f"on {embedder._get_encoder().runtime.providers[0]}", file=out)
    started = time.perf_counter()
    head = LogisticRegression(max_iter=1000).fit(x_train, train_y)
    fit_seconds = time.perf_counter() - started
    accuracy = accuracy_score(test_y, head.predict(x_test))
    print(f"LogisticRegression trained in {fit_seconds:.1f}s; test accuracy {accuracy:.4f}", file=out)
    return {"accuracy": accuracy, "texts_per_second": rate, "digest": embedder.digest_}
