"""kill -9 at random moments during an extraction, each followed by a rerun; the final store
must hold every item exactly once and equal an uninterrupted run, bit for bit.

    python benchmarks/crash_resume.py [--items 20000] [--kills 10] [--seed 0]

Texts: Banking77 train and SST-2 phrases from ../shared/data (unique lines).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"


def texts(n: int) -> list[str]:
    import csv

    out: list[str] = []
    seen: set[str] = set()
    with open(DATA / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        rows = [" ".join(r["text"].split()) for r in csv.DictReader(f)]
    with open(DATA / "sst2" / "glue_train.tsv", encoding="utf-8") as f:
        next(f)
        rows += [" ".join(line.split("\t")[0].split()) for line in f]
    for t in rows:
        if t and t not in seen:
            seen.add(t)
            out.append(t)
        if len(out) == n:
            break
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1024)
    args = parser.parse_args()
    from embedkit import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="embedkit-crash-"))
    source = work / "texts.txt"
    items = texts(args.items)
    source.write_text("\n".join(items) + "\n")
    command = [sys.executable, "-m", "embedkit.cli", "extract", str(source), "--backbone", "minilm-l6",
               "--no-progress", "--shard-size", str(args.shard_size)]
    start = time.perf_counter()
    subprocess.run(command + ["--out", str(work / "clean")], check=True, capture_output=True)
    clean_seconds = time.perf_counter() - start
    print(f"{len(items)} texts; uninterrupted run {clean_seconds:.0f} s")
    rng = random.Random(args.seed)
    crashed = work / "crashed"
    for k in range(args.kills):
        proc = subprocess.Popen(command + ["--out", str(crashed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        moment = rng.uniform(1.0, clean_seconds / 3)
        time.sleep(moment)
        state = "killed" if proc.poll() is None else "had finished"
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rows = sum(r["rows"] for r in FeatureStore(crashed).find("minilm-l6").commits()) if crashed.exists() else 0
        print(f"run {k + 1}: {state} after {moment:.1f} s; {rows} rows committed so far")
    final = subprocess.run(command + ["--out", str(crashed)], capture_output=True, text=True)
    print("final rerun:", final.stderr.strip().splitlines()[-1])
    a_ids, a_X = FeatureStore(work / "clean").load("minilm-l6")
    b_ids, b_X = FeatureStore(crashed).load("minilm-l6")
    oa, ob = np.argsort(a_ids), np.argsort(b_ids)
    same_ids = list(a_ids[oa]) == list(b_ids[ob])
    once = len(b_ids) == len(set(b_ids.tolist())) == len(items)
    equal = same_ids and np.array_equal(np.asarray(a_X)[oa], np.asarray(b_X)[ob])
    problems = FeatureStore(crashed).find("minilm-l6").verify()
    print(f"every item exactly once: {once}; same ids: {same_ids}; embeddings bit-identical: {equal}; "
          f"damaged shards: {len(problems)}")
    return 0 if (once and equal and not problems) else 1


if __name__ == "__main__":
    sys.exit(main())
