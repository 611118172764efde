"""Long texts: a LogisticRegression head on chunk-pooled vectors vs on truncated vectors (issue 25).

No labelled long-text dataset is in ../shared/data, so two are built from its sentences, stated
as built (seeded, reproducible):

- ``banking77-docs``: each document joins 15-40 Banking77 sentences of one intent (train
  documents from the train split, test documents from the test split); label: that intent
  (77 classes). Every sentence carries the label, so the first window usually suffices: this
  measures what chunking costs or gains when the start of a text is representative.
- ``sst2-majority-docs``: each document joins 30 SST-2 sentences (phrases of >= 6 words), 18 of
  its label and 12 of the other, shuffled; label: the majority sentiment. Here a truncated vector
  sees only the first ~40 % of the evidence: the case chunking exists for.

For each: all-MiniLM-L6-v2 (``minilm-l6``, window 256 tokens) embeds every document twice,
``long="truncate"`` (the default) and ``long="chunk"`` (windows of 256 tokens, 32 shared, pooled by
token-weighted mean, renormalised); prints how many texts were longer than the window, the
windows embedded, the embedding time and the held-out accuracy of each.

    .venv/bin/python benchmarks/chunking.py [--docs 1500]
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"


def banking_docs(split: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    with open(DATA / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["category"], []).append(r["text"].strip())
    docs, labels = [], []
    for label in sorted(by_label):
        sents = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        while len(sents) >= 15:
            n = int(rng.integers(15, 41))
            docs.append(" ".join(sents[:n]))
            labels.append(label)
            sents = sents[n:]
    return docs, labels


def sst_docs(n_docs: int, rng: np.random.Generator) -> tuple[list[str], list[str], list[str], list[str]]:
    lines = (DATA / "sst2" / "glue_train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    pool: dict[str, list[str]] = {"0": [], "1": []}
    for line in dict.fromkeys(lines):
        text, label = line.rsplit("\t", 1)
        if len(text.split()) >= 6:
            pool[label.strip()].append(text.strip())
    for key in pool:
        pool[key] = [pool[key][i] for i in rng.permutation(len(pool[key]))]
    halves = {k: (v[: len(v) // 2], v[len(v) // 2:]) for k, v in pool.items()}  # train / test sentences disjoint

    def make(part: int, count: int) -> tuple[list[str], list[str]]:
        docs, labels = [], []
        for _ in range(count):
            y = str(int(rng.integers(2)))
            other = "1" if y == "0" else "0"
            own = rng.choice(len(halves[y][part]), 18, replace=False)
            opp = rng.choice(len(halves[other][part]), 12, replace=False)
            sents = [halves[y][part][i] for i in own] + [halves[other][part][i] for i in opp]
            docs.append(" ".join(sents[i] for i in rng.permutation(len(sents))))
            labels.append(y)
        return docs, labels

    train_x, train_y = make(0, n_docs)
    test_x, test_y = make(1, n_docs // 3)
    return train_x, train_y, test_x, test_y


def run(name: str, train_x: list[str], train_y: list[str], test_x: list[str], test_y: list[str]) -> None:
    from sklearn.linear_model import LogisticRegression

    import embedkit

    print(f"\n{name}: {len(train_x):,} train / {len(test_x):,} test documents, "
          f"{np.mean([len(d.split()) for d in train_x + test_x]):.0f} words on average")
    for long in ("truncate", "chunk"):
        start = time.perf_counter()
        tr = embedkit.embed(train_x, "minilm-l6", long=long)
        te = embedkit.embed(test_x, "minilm-l6", long=long)
        seconds = time.perf_counter() - start
        acc = LogisticRegression(max_iter=3000).fit(tr.vectors, train_y).score(te.vectors, test_y) * 100
        longer = tr.stats.truncated + te.stats.truncated if long == "truncate" else tr.stats.chunked + te.stats.chunked
        windows = (tr.stats.chunks + te.stats.chunks) if long == "chunk" else len(train_x) + len(test_x)
        print(f"  long={long:<8}  accuracy {acc:6.2f}%   texts longer than the window: {longer:,}   "
              f"windows embedded: {windows:,}   {seconds:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1500, help="sst2-majority-docs train documents (a third as many test)")
    args = ap.parse_args()
    print(f"CPU: {cpu()}")
    rng = np.random.default_rng(0)
    train_x, train_y = banking_docs("train", rng)
    test_x, test_y = banking_docs("test", rng)
    run("banking77-docs", train_x, train_y, test_x, test_y)
    run("sst2-majority-docs", *sst_docs(args.docs, rng))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
