"""Every embedkit runtime/precision candidate vs sentence-transformers (and fastembed) on this CPU,
side by side, interleaved in one run.

Same weights (all-MiniLM-L6-v2), same >= 2,000 real sentences (Banking77 test), end to end
(tokenisation included). Prints the CPU model and its matrix-engine flags (AMX, AVX-512 BF16,
VNNI: present and absent), then per path: sentences/s (median of the interleaved rounds), the
ratio to sentence-transformers fp32 and under bf16 autocast, mean / min cosine to fp32, and the
Banking77 LogisticRegression accuracy (trained on ``--train`` sentences of the train split embedded
by that path, scored on the test sentences) with its delta to fp32. Paths:

- anchors: sentence-transformers ``encode`` in fp32 and under ``torch.autocast("cpu", bfloat16)``;
  fastembed loading the very same ``model.onnx`` + tokenizer from a local folder, run in its own
  virtual environment (``.bench/fastembed``: its pins clash with this one's huggingface_hub) as a
  worker process that times each round when told to, so it is interleaved too;
- embedkit: every candidate of :func:`embedkit.runtimes.candidates.candidates_for` (ONNX Runtime, torch and
  OpenVINO fp32; OpenVINO bf16 and torch bf16 autocast when the CPU has bf16; the int8 variants);
  then ``embedkit.tune`` on a sample and what ``runtime="auto"`` picks.

    .venv/bin/python benchmarks/text_cpu.py [--rounds 5] [--n 2000] [--train 3000] [--tune-items 500]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77"
FASTEMBED = ROOT / ".bench" / "fastembed" / "bin" / "python"

FASTEMBED_WORKER = r"""
import sys, time, json, numpy as np
from fastembed import TextEmbedding
from fastembed.common.model_description import PoolingType, ModelSource
folder, texts_file, out = sys.argv[1:4]
texts = json.load(open(texts_file))
# The graph already pools and normalises: fastembed must pass its output through untouched.
TextEmbedding.add_custom_model(model="embedkit/minilm-l6", pooling=PoolingType.DISABLED, normalization=False,
                               sources=ModelSource(hf="embedkit/minilm-l6"), dim=384, model_file="model.onnx")
model = TextEmbedding("embedkit/minilm-l6", specific_model_path=folder, threads=None)
np.save(out, np.stack(list(model.embed(texts, batch_size=64))))
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    list(model.embed(texts, batch_size=64))
    print(time.perf_counter() - t, flush=True)
"""


def read(split: str) -> tuple[list[str], list[str]]:
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r.get("category") or r.get("label") for r in rows]


def fastembed_worker(artifact, minilm: Path, texts: list[str], tmp: Path) -> tuple[object | None, np.ndarray | None, str]:
    """Start fastembed in its own venv on a local folder holding the artifact's model.onnx; or why not."""
    if not FASTEMBED.is_file():
        return None, None, f"no {FASTEMBED} (python -m venv .bench/fastembed && .bench/fastembed/bin/pip install fastembed)"
    folder = tmp / "fastembed-model"
    folder.mkdir()
    os.symlink(artifact.onnx_path, folder / "model.onnx")
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm / name).is_file():
            os.symlink(minilm / name, folder / name)
    (tmp / "texts.json").write_text(json.dumps(texts))
    proc = subprocess.Popen([str(FASTEMBED), "-c", FASTEMBED_WORKER, str(folder), str(tmp / "texts.json"),
                             str(tmp / "fastembed.npy")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        return None, None, "fastembed could not load the local folder: " + proc.stderr.read()[-400:].strip()
    return proc, np.load(tmp / "fastembed.npy"), ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--train", type=int, default=3000, help="train-split sentences for the accuracy heads")
    parser.add_argument("--tune-items", type=int, default=500, help="sentences embedkit.tune measures on")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    import embedkit
    from embedkit.encoder import encoder_for
    from embedkit.encoders.tuning import machine, tune_table
    from embedkit.models.probes import cosine
    from embedkit.runtimes.candidates import candidates_for
    from embedkit.runtimes.cpu import cpu_count, describe
    from embedkit_text import minilm_folder

    texts, labels = read("test")
    while len(texts) < args.n:
        texts, labels = texts + texts, labels + labels
    texts, labels = texts[: args.n], labels[: args.n]
    train_texts, train_labels = read("train")
    train_texts, train_labels = train_texts[: args.train], train_labels[: args.train]
    cpu = describe()
    ov = machine("cpu").get("openvino")
    print(f"CPU: {cpu['model']}, {cpu_count()} cores usable")
    print(f"matrix-engine flags present: {', '.join(cpu['matrix_flags']) or 'none'}; "
          f"absent: {', '.join(cpu['absent']) or 'none'} (AMX {'present' if 'amx_bf16' in cpu['matrix_flags'] else 'ABSENT'})")
    print("OpenVINO: " + (f"{ov['version'].split('-')[0]}, CPU capabilities {ov['capabilities']}, default inference "
                          f"precision {ov['default_precision']}" if ov else "not installed"))
    folder = minilm_folder()
    with tempfile.TemporaryDirectory() as store:
        tmp = Path(store)
        artifact = embedkit.export("minilm-l6", store)
        for v in ("dynamic", "dynamic-per-tensor"):
            embedkit.quantize(artifact, v, store=store)
        st = SentenceTransformer(str(folder), device="cpu")

        def st_bf16(batch: list[str]) -> np.ndarray:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return st.encode(batch, normalize_embeddings=True)

        paths: dict[str, object] = {
            "sentence-transformers fp32": lambda b: st.encode(b, normalize_embeddings=True),
            "sentence-transformers bf16 autocast": st_bf16,
        }
        encoders = {}
        for name in candidates_for("cpu", artifact):
            try:
                encoders[name] = encoder_for(artifact, runtime=name)
            except Exception as exc:  # noqa: BLE001 - say why a candidate is absent here
                print(f"embedkit {name}: cannot run here: {type(exc).__name__}: {exc}")
        for name, enc in encoders.items():
            paths[f"embedkit {name}"] = lambda b, enc=enc: enc.encode(b).vectors
        worker, fe_vectors, why = fastembed_worker(artifact, folder, texts, tmp)
        if worker is None:
            print(f"fastembed: not run: {why}")
        vectors = {name: run(texts) for name, run in paths.items()}  # also the warm-up
        if worker is not None:
            vectors["fastembed (same model.onnx)"] = fe_vectors
        times: dict[str, list[float]] = {name: [] for name in vectors}
        for _ in range(args.rounds):
            for name, run in paths.items():
                t = time.perf_counter()
                run(texts)
                times[name].append(time.perf_counter() - t)
            if worker is not None:
                worker.stdin.write("go\n")
                worker.stdin.flush()
                times["fastembed (same model.onnx)"].append(float(worker.stdout.readline()))
        if worker is not None:
            worker.stdin.close()
            worker.wait()
        # Accuracy: a LogisticRegression head per path, trained on that path's own features.
        accuracy = {}
        for name, run in paths.items():
            head = LogisticRegression(max_iter=2000).fit(run(train_texts), train_labels)
            accuracy[name] = float((head.predict(vectors[name]) == np.asarray(labels)).mean())
        tuned = embedkit.tune(artifact, items=texts[: args.tune_items], seconds=1.0)
        auto = encoder_for(artifact).runtime
    fp32 = vectors["embedkit onnxruntime"]
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    st32, st16 = rate["sentence-transformers fp32"], rate["sentence-transformers bf16 autocast"]
    print(f"\n{len(texts)} Banking77 test sentences end to end, {args.rounds} interleaved rounds (medians); "
          f"accuracy: LogisticRegression on {len(train_texts)} train sentences. The machine is shared: "
          "absolute rates move with its load, ratios within one run are fairer.")
    print(f"{'path':<40} {'sent/s':>8} {'x ST fp32':>9} {'x ST bf16':>9} {'mean cos':>9} {'min cos':>9} "
          f"{'accuracy':>8} {'delta':>6}")
    base_acc = accuracy["embedkit onnxruntime"]
    for name in rate:
        cos = cosine(vectors[name], fp32)
        acc = accuracy.get(name)
        print(f"{name:<40} {rate[name]:8.0f} {rate[name] / st32:9.2f} {rate[name] / st16:9.2f} {cos.mean():9.6f} "
              f"{cos.min():9.6f} " + (f"{100 * acc:8.2f} {100 * (acc - base_acc):+6.2f}" if acc is not None else ""))
    print(f"\nembedkit tune on {args.tune_items} of these sentences chose {tuned['choice']} ({tuned['precision']}); "
          f"runtime='auto' now builds {type(auto).__name__} {auto.providers}")
    print("\n".join(tune_table(tuned)))
    best = rate.get(f"embedkit {tuned['choice']}", float("nan"))
    print(f"\nembedkit's choice end to end: {best / st32:.2f}x sentence-transformers fp32 (target >= 3.5x on AMX), "
          f"{best / st16:.2f}x under bf16 autocast (target >= 1.5x on AMX)")


if __name__ == "__main__":
    sys.exit(main())
