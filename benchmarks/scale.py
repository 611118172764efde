"""A store and indexes at scale: N texts through ``extract``, compact namespaces, IVF-PQ and binary
indexes, and search (issue 25). Default N = 1,000,000; ``--n 10000000`` is the ten-million run.

The corpus: every text joins two different sentences of the shared datasets (Banking77 train +
test, SST-2 train + dev; ../shared/data), ``"<sentence a> <sentence b>"`` for a seeded random pair
(a, b), pairs drawn without repeats, so every text is distinct and no text is a near copy of a
handful of others (numbering one sentence a million times would make each query's neighbours a
cluster of near-identical vectors, and recall among them a coin toss). 1,000 sentences are held
out of the pairs: they are the queries.

Stages (each resumable: a stage whose output is complete is skipped; ``extract`` resumes after
``kill -9`` by itself, skipping committed shards):

1. ``corpus``: the Parquet table ``corpus-<N>.parquet`` (id, text) and ``queries.txt``.
2. ``extract``: ``embedkit extract`` in its own process: wall time, items/s, peak RSS.
3. ``compact``: the int8 (calibrated on the stored vectors) and binary namespaces derived from
   the float one without re-running the model (``embedkit store compact``), in their own
   processes: wall time, rows/s, peak RSS; store bytes per item of each namespace.
4. ``search``: in its own process: the queries embedded; exact float search (chunked matrix
   products over the memory-mapped float rows: the reference); an IVF-PQ index on the float
   rows and a binary index on the binary rows (with float rescoring of the top 100): build time,
   query p50/p99 at k=10 (one query at a time), recall@10 against exact; peak RSS.

Prints the CPU model and its flags, the load average, and one line per stage. Memory: every
stage runs in its own process; the parent reports each child's peak RSS (``wait4``).

    .venv/bin/python benchmarks/scale.py [--n 1000000] [--work benchmarks/.work/scale]
        [--stages corpus extract compact search] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"
QUERIES = 1000
K = 10


def sentences() -> list[str]:
    """The shared datasets' sentences, deduplicated, in a fixed order."""
    import csv

    out: list[str] = []
    for name in ("train.csv", "test.csv"):
        with open(DATA / "banking77" / name, newline="", encoding="utf-8") as f:
            out += [row["text"].strip() for row in csv.DictReader(f)]
    for name in ("glue_train.tsv", "glue_dev.tsv"):
        lines = (DATA / "sst2" / name).read_text(encoding="utf-8").splitlines()[1:]
        out += [line.split("\t")[0].strip() for line in lines]
    return list(dict.fromkeys(s for s in out if s))


def build_corpus(n: int, work: Path) -> tuple[Path, Path]:
    """``corpus-<n>.parquet`` (id, text) and ``queries.txt``; written once (temp file, then renamed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, queries = work / f"corpus-{n}.parquet", work / "queries.txt"
    if table.exists() and queries.exists():
        return table, queries
    base = sentences()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(base))
    held = [base[i] for i in order[:QUERIES]]
    pool = np.asarray(order[QUERIES:])
    m = len(pool)
    if n > m * (m - 1):
        raise SystemExit(f"--n {n} exceeds the {m * (m - 1)} distinct pairs of {m} sentences")
    seen: set[int] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        a = rng.integers(m, size=n)
        b = rng.integers(m, size=n)
        for x, y in zip(a.tolist(), b.tolist()):
            key = x * m + y
            if x != y and key not in seen:
                seen.add(key)
                pairs.append((x, y))
                if len(pairs) == n:
                    break
    del seen
    tmp = table.with_suffix(".parquet.tmp")
    writer = None
    step = 200_000
    for start in range(0, n, step):
        part = pairs[start:start + step]
        ids = [f"t{start + i:08d}" for i in range(len(part))]
        texts = [f"{base[pool[x]]} {base[pool[y]]}" for x, y in part]
        batch = pa.table({"id": ids, "text": texts})
        if writer is None:
            writer = pq.ParquetWriter(tmp, batch.schema)
        writer.write_table(batch)
    assert writer is not None
    writer.close()
    os.replace(tmp, table)
    queries.write_text("\n".join(held) + "\n", encoding="utf-8")
    print(f"corpus: {n:,} texts from {len(base):,} distinct sentences ({m:,} in pairs, {QUERIES} held out as queries)")
    return table, queries


def run_child(argv: list[str], what: str) -> dict[str, float]:
    """Run a child process (output passed through), return its wall seconds and peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{what} exited {code}: {' '.join(argv)}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def namespace_bytes(store: Path, precision: str) -> tuple[int, int]:
    """(bytes of the namespace's shards and records, rows) of one variant in the store."""
    from embedkit import FeatureStore

    ns = FeatureStore(store).find("minilm-l6", precision=precision)
    size = sum(p.stat().st_size for p in ns.path.rglob("*") if p.is_file() and "cache" not in p.parts)
    return size, len(ns.stored())


EXACT = r'''
import sys, time
import numpy as np
import embedkit
from embedkit import FeatureStore

store, queries_file, k, out_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
queries = [q for q in open(queries_file, encoding="utf-8").read().splitlines() if q]
Q = embedkit.embed(queries, "minilm-l6").vectors
ids, X = FeatureStore(store).load("minilm-l6")
t = time.perf_counter()
best_s = np.full((len(Q), k), -np.inf, np.float32); best_i = np.zeros((len(Q), k), np.int64)
for start in range(0, len(ids), 16384):  # chunked products over the memory-mapped rows
    s = Q @ np.asarray(X[start:start + 16384]).T
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, np.arange(start, start + s.shape[1])[None, :].repeat(len(Q), 0)], axis=1)
    top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
    best_s = np.take_along_axis(cand_s, top, 1); best_i = np.take_along_axis(cand_i, top, 1)
np.save(out_file, best_i)
print(f"RESULT {time.perf_counter() - t}")
'''

SEARCH = r'''
import json, resource, sys, time
import numpy as np
import embedkit
from embedkit import FeatureStore
from embedkit.heads.knn import FaissNearestNeighbors
from embedkit.heads.binary import BinaryNearestNeighbors

store, queries_file, k, nprobe, exact_file, binary_index = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                                            int(sys.argv[4]), sys.argv[5], sys.argv[6])
out = {}
queries = [q for q in open(queries_file, encoding="utf-8").read().splitlines() if q]
t = time.perf_counter()
Q = embedkit.embed(queries, "minilm-l6").vectors
out["embed_queries_s"] = time.perf_counter() - t
ids, X = FeatureStore(store).load("minilm-l6")
n = len(ids)
out["rows"] = n
exact = [set(row) for row in np.load(exact_file).tolist()]

def timed(search):
    lat, got = [], []
    for q in Q:
        t0 = time.perf_counter()
        idx = search(q[None, :])
        lat.append(time.perf_counter() - t0)
        got.append(set(np.asarray(idx).reshape(-1).tolist()))
    recall = float(np.mean([len(a & b) / k for a, b in zip(got, exact)]))
    lat = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "recall_at_10": recall}

t = time.perf_counter()
ivf = FaissNearestNeighbors(n_neighbors=k, metric="cosine", index="ivfpq", nprobe=nprobe).fit(X)
out["ivfpq_build_s"] = time.perf_counter() - t
out["ivfpq"] = timed(lambda q: ivf.kneighbors(q, return_distance=False))
out["ivfpq_params"] = ivf.index_params_
ivf.nprobe = 4 * nprobe
out["ivfpq_wide"] = timed(lambda q: ivf.kneighbors(q, return_distance=False))
out["ivfpq_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
del ivf
_, B = FeatureStore(store).load("minilm-l6", precision="binary")
t = time.perf_counter()
binary = BinaryNearestNeighbors(n_neighbors=k, rescore=0, index=binary_index).fit(B)
out["binary_build_s"] = time.perf_counter() - t
out["binary_index"] = binary.index_kind_
out["binary"] = timed(lambda q: binary.kneighbors(embedkit.Compact(None, "binary").apply(q), return_distance=False))
rescored = BinaryNearestNeighbors(n_neighbors=k, rescore=100, index=binary_index).fit(B, rescore_vectors=X)
out["binary_rescore_100"] = timed(lambda q: rescored.kneighbors(q, return_distance=False))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "scale")
    ap.add_argument("--stages", nargs="+", default=["corpus", "extract", "compact", "search"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--binary-index", default="flat", choices=["flat", "ivf", "auto"],
                    help="the binary index (flat: an exact Hamming scan; ivf at 1M rows, nprobe 16: recall@10 0.80 "
                         "after rescoring, built in 603 s, measured 2026-12-06)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"store-{args.n}"
    embedkit_cli = [str(Path(sys.executable).with_name("embedkit"))]
    print(f"CPU: {cpu()}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; work folder {work}")
    results: dict[str, object] = {"n": args.n}
    table, queries = build_corpus(args.n, work)
    if "extract" in args.stages:
        argv = [*embedkit_cli, "extract", str(table), "--column", "text", "--id-column", "id", "--out", str(store)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        store.mkdir(exist_ok=True)
        r = run_child(argv, "extract")
        results["extract"] = r
        print(f"extract: {r['seconds']:.0f} s for the run (a resumed run counts only its own part), "
              f"{args.n / r['seconds']:.0f} items/s if all were computed now, peak RSS {r['peak_rss_mb']:.0f} MB")
    if "compact" in args.stages:
        _, stored = namespace_bytes(store, "float32")
        if stored < args.n:
            print(f"the float namespace holds {stored:,} of {args.n:,} rows (extraction unfinished: rerun the extract "
                  "stage to resume it); the stages below measure those rows")
        for precision in ("int8", "binary"):
            r = run_child([*embedkit_cli, "store", "compact", str(store), "--backbone", "minilm-l6",
                           "--precision", precision], f"compact {precision}")
            results[f"compact_{precision}"] = r
            print(f"compact {precision}: {r['seconds']:.0f} s, {stored / r['seconds']:.0f} rows/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
        for precision in ("float32", "int8", "binary"):
            size, rows = namespace_bytes(store, precision)
            results[f"bytes_{precision}"] = size
            print(f"store {precision}: {rows:,} rows, {size / 1e6:.1f} MB, {size / max(rows, 1):.1f} bytes per item")
    if "search" in args.stages:
        # the reference (exact float top-10 of every query) in a process of its own: not the search's memory
        start = time.perf_counter()
        exact_file = work / f"exact-{args.n}.npy"
        proc = subprocess.Popen([sys.executable, "-c", EXACT, str(store), str(queries), str(K), str(exact_file)],
                                stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"exact reference exited {proc.returncode}")
        exact_s = float(next(x for x in out.splitlines() if x.startswith("RESULT ")).split()[1])
        results["exact_all_queries_s"] = exact_s
        print(f"exact float top-{K} of {QUERIES} queries (the reference, its own process): {exact_s:.1f} s "
              f"({time.perf_counter() - start:.0f} s with the model and the store's cache)")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", SEARCH, str(store), str(queries), str(K), str(args.nprobe),
                                 str(exact_file), args.binary_index], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"search exited {proc.returncode}")
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        results["search"] = r
        print(f"search ({time.perf_counter() - start:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"{r['ivfpq_peak_rss_mb']:.0f} MB after the IVF-PQ stage): {QUERIES} queries embedded in "
              f"{r['embed_queries_s']:.1f} s; {r['rows']:,} rows")
        print(f"  IVF-PQ {r['ivfpq_params']} (nprobe {args.nprobe}): built in {r['ivfpq_build_s']:.0f} s; "
              + _fmt(r["ivfpq"]))
        print(f"  IVF-PQ (nprobe {4 * args.nprobe}): " + _fmt(r["ivfpq_wide"]))
        print(f"  binary {r['binary_index']} (Hamming only): built in {r['binary_build_s']:.1f} s; " + _fmt(r["binary"]))
        print("  binary + float rescoring of the top 100: " + _fmt(r["binary_rescore_100"]))
    (work / f"results-{args.n}.json").write_text(json.dumps(results, indent=2))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def _fmt(r: dict[str, float]) -> str:
    return f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms at k={K}, recall@10 {r['recall_at_10']:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
