"""The built-in demo: real MiniLM weights on a shipped Banking77 sample."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, TextIO

DATA = Path(__file__).parent / "data" / "banking77"


def load_split(split: str) -> tuple[list[str], list[str]]:
    """Texts and intent labels of the shipped sample (``train`` or ``test``)."""
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def run(out: TextIO, backbone: str = "minilm-l6", store: str | None = None) -> dict[str, Any]:
    """Embed, train LogisticRegression on the train sample, score the test sample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from .embedder import Embedder

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
