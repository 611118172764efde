"""`extract` on the local engine vs `--engine ray` with N actors, side by side, on this machine.

20,000 real texts (Banking77 train + test, then SST-2 GLUE train phrases, in that order; from
../shared/data), all-MiniLM-L6-v2 (ONNX), each engine into its own fresh store. Prints the CPU
model and the vector-instruction flags, the throughput of both engines, their ratio, Ray's
start-up cost (a tiny run on a fresh local Ray), and checks that the two stores agree: same ids,
vectors within 1e-6. Each engine gets the whole machine in turn (Ray: a private local Ray with
the machine's CPUs; each actor --cpus-per-worker of them, ONNX Runtime threads to match).

    .venv/bin/python benchmarks/ray_extract.py [--n 20000] [--workers 2] [--shard-size 1024]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"


def texts(n: int) -> list[str]:
    out: list[str] = []
    for split in ("train", "test"):
        with open(DATA / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as f:
            out += [row["text"] for row in csv.DictReader(f)]
    with open(DATA / "sst2" / "glue_train.tsv", encoding="utf-8") as f:
        next(f)
        out += [line.split("\t")[0] for line in f]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} texts under {DATA}")
    return [" ".join(t.split()) for t in out[:n]]


def main() -> None:
    import embedkit
    from embedkit import FeatureStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--backbone", default="minilm-l6")
    args = ap.parse_args()
    items = texts(args.n)
    artifact = embedkit.resolve(args.backbone)  # exported once, outside the clocks
    print(f"CPU: {cpu()}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share these cores)")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        embedkit.extract(items[:64], artifact, Path(tmp) / "warm", engine="ray", workers=1)
        startup = time.perf_counter() - t
        t = time.perf_counter()
        local = embedkit.extract(items, artifact, Path(tmp) / "local", shard_size=args.shard_size)
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        ray = embedkit.extract(items, artifact, Path(tmp) / "ray", shard_size=args.shard_size, engine="ray",
                               workers=args.workers)
        ray_s = time.perf_counter() - t
        a_ids, a_X = FeatureStore(Path(tmp) / "local").load(artifact.name)
        b_ids, b_X = FeatureStore(Path(tmp) / "ray").load(artifact.name)
        oa, ob = np.argsort(a_ids), np.argsort(b_ids)
        same_ids = a_ids[oa].tolist() == b_ids[ob].tolist()
        diff = float(np.abs(np.asarray(a_X)[oa] - np.asarray(b_X)[ob]).max()) if same_ids else float("nan")
    n = len(items)
    print(f"{n} texts ({local.computed} distinct computed), {args.backbone} {artifact.digest[:12]}, shard size {args.shard_size}")
    print(f"Ray start-up + a 64-text run on a fresh local Ray (1 actor): {startup:.1f} s")
    print(f"local engine (1 process, all cores):      {n / local_s:8.0f} texts/s  ({local_s:.1f} s)")
    print(f"ray engine ({args.workers} actors, fresh local Ray): {n / ray_s:8.0f} texts/s  ({ray_s:.1f} s, "
          f"{ray.computed / args.workers / ray_s:.0f} texts/s per actor, start-up included)")
    print(f"ratio ray / local: {local_s / ray_s:.2f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"stores agree: same ids {same_ids} ({len(a_ids)}), max |difference| {diff:.2e} "
          f"({'OK' if same_ids and diff <= 1e-6 else 'MISMATCH'} at 1e-6)")
    if not (same_ids and diff <= 1e-6):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
