"""Which exporter wins for MiniLM: TorchScript (traced, all-ones mask) vs dynamo.

Exports all-MiniLM-L6-v2 with each exporter, prints the parity-gate numbers, then runs both
graphs interleaved with the same runtime settings on the same real sentences and prints
sentences/s and the ratio. `exporter="auto"` tries TorchScript first because of this
measurement.

    .venv/bin/python benchmarks/exporters.py
"""
from __future__ import annotations

import csv
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77" / "test.csv"


def main(rounds: int = 5) -> None:
    import embedkit

    with open(DATA, newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:2000]
    with tempfile.TemporaryDirectory() as store:
        encoders = {}
        for name in ("torchscript", "dynamo"):
            t = time.perf_counter()
            artifact = embedkit.export("minilm-l6", store, exporter=name, force=True)
            p = artifact.manifest["parity"]
            print(f"{name:<12} export {time.perf_counter() - t:5.1f}s  max|diff| {p['max_abs_diff']:.2e}  "
                  f"min cos {p['min_cosine']:.8f}  digest {artifact.digest[:12]}")
            encoders[name] = embedkit.TextEncoder(artifact)
            encoders[name].encode(texts[:200])
        times: dict[str, list[float]] = {n: [] for n in encoders}
        for _ in range(rounds):
            for name, encoder in encoders.items():
                t = time.perf_counter()
                encoder.encode(texts)
                times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    for name, seconds in med.items():
        print(f"{name:<12} {len(texts) / seconds:7.0f} sentences/s")
    print(f"torchscript / dynamo speed: {med['dynamo'] / med['torchscript']:.2f}x")


if __name__ == "__main__":
    main()
