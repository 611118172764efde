"""embedkit vs sentence-transformers `encode` on this CPU, side by side, interleaved.

Same weights (all-MiniLM-L6-v2), same >= 2,000 real sentences (Banking77 test), end to end
(tokenisation included). Prints sentences/s for each, the ratio, the min cosine between the
two, and the share of the machine's fp32 matmul rate (numpy, measured in this run) that the
useful FLOPs reach: unpadded tokens x 2 x (linear-layer weights per token). The int8 variants
(dynamic per-channel and per-tensor) run in the same interleaved rounds, with their mean
cosine to embedkit fp32.

    .venv/bin/python benchmarks/text_cpu.py [--rounds 5] [--n 2000]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77" / "test.csv"
REFERENCE_GFLOPS = 200.0  # the figure for numpy on this machine class


def matmul_gflops(n: int = 2048, reps: int = 7) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def flops_per_token(config: dict) -> float:
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return 2.0 * layers * (4 * h * h + 2 * h * f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()

    import json

    import embedkit
    from embedkit_text import minilm_folder
    from sentence_transformers import SentenceTransformer

    with open(DATA, newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    while len(texts) < args.n:
        texts = texts + texts
    texts = texts[: args.n]
    folder = minilm_folder()
    with tempfile.TemporaryDirectory() as store:
        artifact = embedkit.export("minilm-l6", store)
        encoder = embedkit.TextEncoder(artifact)
        st = SentenceTransformer(str(folder), device="cpu")
        tokens = encoder.encode(texts).stats.tokens
        ours = encoder.encode(texts).vectors
        ref = st.encode(texts, normalize_embeddings=True)
        min_cos = float((ours * ref).sum(1).min())
        int8 = {v: embedkit.TextEncoder(embedkit.quantize(artifact, v, store=store))
                for v in ("dynamic", "dynamic-per-tensor")}
        int8_cos = {}
        for v, enc in int8.items():
            q = enc.encode(texts).vectors
            int8_cos[v] = float(((q * ours).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ours, axis=1)).mean())
        ek_times, st_times = [], []
        int8_times: dict[str, list[float]] = {v: [] for v in int8}
        for _ in range(args.rounds):
            t = time.perf_counter()
            encoder.encode(texts)
            ek_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            st.encode(texts)
            st_times.append(time.perf_counter() - t)
            for v, enc in int8.items():
                t = time.perf_counter()
                enc.encode(texts)
                int8_times[v].append(time.perf_counter() - t)
        gflops = matmul_gflops()
    ek, ref_t = statistics.median(ek_times), statistics.median(st_times)
    per_token = flops_per_token(json.loads((folder / "config.json").read_text()))
    useful = tokens * per_token / ek / 1e9
    print(f"sentences: {len(texts)} real Banking77 texts, {tokens} tokens ({tokens / len(texts):.1f}/text), "
          f"{args.rounds} interleaved rounds, medians")
    print(f"embedkit              {len(texts) / ek:8.0f} sentences/s  ({encoder.runtime.streams} streams)")
    print(f"sentence-transformers {len(texts) / ref_t:8.0f} sentences/s")
    print(f"ratio                 {ref_t / ek:8.2f}x   (target >= 1.6x)")
    print(f"min cosine to ST      {min_cos:.7f}")
    for v, times in int8_times.items():
        q = statistics.median(times)
        print(f"embedkit int8 {v:<19} {len(texts) / q:8.0f} sentences/s  {ref_t / q:5.2f}x ST  "
              f"mean cosine to fp32 {int8_cos[v]:.4f}   (target >= 3.5x at mean cosine >= 0.99)")
    print(f"useful FLOPs          {useful:8.1f} GFLOP/s ({per_token / 1e6:.1f} MFLOP/token)")
    print(f"numpy fp32 matmul     {gflops:8.1f} GFLOP/s measured now -> {useful / gflops:.0%} of it "
          f"(target >= 80%); {useful / REFERENCE_GFLOPS:.0%} of the issue's {REFERENCE_GFLOPS:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
