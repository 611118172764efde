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
- embedkit with default settings and no prior record (``runtime="auto"``: the first use measures
  the candidates within its time budget and records the choice; that one-off cost is its own line);
- embedkit: every candidate of :func:`embedkit.runtimes.candidates.candidates_for` (ONNX Runtime, torch and
  OpenVINO fp32; OpenVINO bf16 and torch bf16 autocast when the CPU has bf16; the int8 variants);
  then, with ``--tune-items N``, the thorough ``embedkit.tune`` on a sample.

Every run ends: the fastembed worker's every answer is awaited at most ``--worker-timeout``
seconds (then it is killed and the table says "not run: why"), and a path whose warm-up pass
and first round are both more than ``--far`` times slower than the fastest path is time-boxed:
those two passes are its measurement, and it skips the other rounds and the accuracy pass (not the anchors, embedkit's
default and ONNX Runtime fp32: the ratios and the accuracy deltas are taken against them).

    .venv/bin/python benchmarks/text_cpu.py [--rounds 5] [--n 2000] [--train 3000] [--tune-items 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
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


class Worker:
    """A line-oriented worker process whose every answer is awaited at most ``timeout`` seconds:
    its stdout is read by a thread into a queue, its stderr goes to a file (a pipe nobody reads
    fills up and blocks the worker, while the parent waits on its stdout for ever)."""

    def __init__(self, argv: list[str], stderr_path: Path):
        self.err = open(stderr_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.why = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # end of output: the worker exited

    def ask(self, message: str | None, timeout: float) -> str | None:
        """Send ``message`` (a line; None: send nothing) and return the answer line, or None (with
        ``why`` set, the worker stopped) when it does not come within ``timeout`` seconds."""
        try:
            if message is not None:
                self.proc.stdin.write(message + "\n")
                self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except (BrokenPipeError, OSError):
            line = None
        except queue.Empty:
            self.why = f"no answer within {timeout:g}s: killed"
            self.stop()
            return None
        if line is None:
            self.why = self.why or f"exited ({self.proc.wait()}): {self.stderr_tail()}"
            self.stop()
        return line

    def stderr_tail(self, n: int = 400) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()[-n:].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def fastembed_worker(artifact, minilm: Path, texts: list[str], tmp: Path,
                     timeout: float) -> tuple[Worker | None, np.ndarray | None, str]:
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
    worker = Worker([str(FASTEMBED), "-c", FASTEMBED_WORKER, str(folder), str(tmp / "texts.json"),
                     str(tmp / "fastembed.npy")], tmp / "fastembed.stderr")
    line = worker.ask(None, timeout)
    if line != "ready":
        why = worker.why or f"unexpected {line!r}"
        worker.stop()
        return None, None, f"fastembed could not load the local folder: {why}"
    return worker, np.load(tmp / "fastembed.npy"), ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--train", type=int, default=3000, help="train-split sentences for the accuracy heads")
    parser.add_argument("--tune-items", type=int, default=0,
                        help="sentences the thorough embedkit.tune measures on after the table (0: not run)")
    parser.add_argument("--worker-timeout", type=float, default=300.0,
                        help="seconds to wait for the fastembed worker to start, then per round at least")
    parser.add_argument("--far", type=float, default=4.0,
                        help="a path this much slower than the fastest in its warm-up and first round skips the rest")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    import embedkit
    from embedkit.encoder import encoder_for
    from embedkit.encoders.tuning import FIRST_USE_BUDGET, machine, tune_table
    from embedkit.models.probes import cosine
    from embedkit.runtimes.candidates import candidates_for
    from embedkit.runtimes.cpu import describe
    from embedkit.runtimes.records import recorded
    from embedkit_text import minilm_folder

    texts, labels = read("test")
    while len(texts) < args.n:
        texts, labels = texts + texts, labels + labels
    texts, labels = texts[: args.n], labels[: args.n]
    train_texts, train_labels = read("train")
    train_texts, train_labels = train_texts[: args.train], train_labels[: args.train]
    cpu = describe()
    ov = machine("cpu").get("openvino")
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores usable (affinity and cgroup quota: "
          f"{'%g CPUs' % cpu['quota'] if cpu['quota'] else 'none'}), {os.cpu_count()} visible")
    print(f"matrix-engine flags present: {', '.join(cpu['matrix_flags']) or 'none'}; "
          f"absent: {', '.join(cpu['absent']) or 'none'} (AMX {'present' if 'amx_bf16' in cpu['matrix_flags'] else 'ABSENT'}, "
          f"bf16 in hardware: {'yes' if cpu['bf16'] else 'no'})")
    print("OpenVINO: " + (f"{ov['version'].split('-')[0]}, CPU capabilities {ov['capabilities']}, default inference "
                          f"precision {ov['default_precision']}" if ov else "not installed"))
    folder = minilm_folder()
    not_run: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as store:
        tmp = Path(store)
        artifact = embedkit.export("minilm-l6", store)
        for v in ("dynamic", "dynamic-per-tensor"):
            embedkit.quantize(artifact, v, store=store)
        # embedkit as a new user gets it: default settings, a store with no record, first use measures.
        assert recorded(artifact, "cpu") is None
        started = time.perf_counter()
        auto = encoder_for(artifact, tune=True)
        first_use_s = time.perf_counter() - started
        first = recorded(artifact, "cpu")
        auto_name = f"embedkit auto (chose {first['choice'] if first else 'onnxruntime'})"
        st = SentenceTransformer(str(folder), device="cpu")

        def st_bf16(batch: list[str]) -> np.ndarray:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return st.encode(batch, normalize_embeddings=True)

        paths: dict[str, object] = {
            "sentence-transformers fp32": lambda b: st.encode(b, normalize_embeddings=True),
            "sentence-transformers bf16 autocast": st_bf16,
            auto_name: lambda b: auto.encode(b).vectors,
        }
        for name in candidates_for("cpu", artifact):
            try:
                enc = encoder_for(artifact, runtime=name)
            except Exception as exc:  # noqa: BLE001 - say why a candidate is absent here
                not_run[f"embedkit {name}"] = f"cannot run here: {type(exc).__name__}: {exc}"
                continue
            paths[f"embedkit {name}"] = lambda b, enc=enc: enc.encode(b).vectors
        anchors = ("sentence-transformers fp32", "sentence-transformers bf16 autocast", auto_name, "embedkit onnxruntime")
        worker, fe_vectors, why = fastembed_worker(artifact, folder, texts, tmp, args.worker_timeout)
        if worker is None:
            not_run["fastembed (same model.onnx)"] = why
        # The warm-up pass, then the rounds. After the first round a path far slower than the
        # fastest in both of its passes (one pass can catch a load spike or one-off start-up costs)
        # is time-boxed: those two passes are its measurement, and it skips the rest.
        vectors, times, boxed = {}, {}, set()
        for name, run in paths.items():
            t = time.perf_counter()
            vectors[name] = run(texts)
            times[name] = [time.perf_counter() - t]
        if worker is not None:
            vectors["fastembed (same model.onnx)"] = fe_vectors
            times["fastembed (same model.onnx)"] = []
        warm = {name: t.pop() for name, t in times.items() if t}  # the rounds' timings replace the warm-up
        for r in range(args.rounds):
            for name, run in paths.items():
                if name in boxed:
                    continue
                t = time.perf_counter()
                run(texts)
                times[name].append(time.perf_counter() - t)
            if worker is not None:
                slowest = max(max(v) for k, v in times.items() if v and k != "fastembed (same model.onnx)")
                line = worker.ask("go", max(60.0, 20 * slowest))
                if line is None:
                    not_run["fastembed (same model.onnx)"] = f"worker stopped mid-run: {worker.why}"
                    times.pop("fastembed (same model.onnx)")
                    vectors.pop("fastembed (same model.onnx)")
                    worker = None
                else:
                    times["fastembed (same model.onnx)"].append(float(line))
            if r == 0:
                best = {name: min(t + [warm[name]] if name in warm else t) for name, t in times.items() if t}
                fastest = min(best.values())
                boxed = {name for name in paths if best[name] > args.far * fastest and name not in anchors}
                for name in boxed:
                    times[name].append(warm[name])
        if worker is not None:
            worker.stop()
        # Accuracy: a LogisticRegression head per path, trained on that path's own features.
        accuracy = {}
        for name, run in paths.items():
            if name in boxed:
                continue
            head = LogisticRegression(max_iter=2000).fit(run(train_texts), train_labels)
            accuracy[name] = float((head.predict(vectors[name]) == np.asarray(labels)).mean())
        tuned = embedkit.tune(artifact, items=texts[: args.tune_items], seconds=1.0) if args.tune_items else None
    fp32 = vectors["embedkit onnxruntime"]
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    st32, st16 = rate["sentence-transformers fp32"], rate["sentence-transformers bf16 autocast"]
    print(f"\n{len(texts)} Banking77 test sentences end to end, {args.rounds} interleaved rounds (medians); "
          f"accuracy: LogisticRegression on {len(train_texts)} train sentences. The machine is shared: "
          "absolute rates move with its load, ratios within one run are fairer.")
    print(f"{'path':<44} {'sent/s':>8} {'x ST fp32':>9} {'x ST bf16':>9} {'mean cos':>9} {'min cos':>9} "
          f"{'accuracy':>8} {'delta':>6}")
    base_acc = accuracy["embedkit onnxruntime"]
    for name in rate:
        cos = cosine(vectors[name], fp32)
        acc = accuracy.get(name)
        print(f"{name:<44} {rate[name]:8.0f} {rate[name] / st32:9.2f} {rate[name] / st16:9.2f} {cos.mean():9.6f} "
              f"{cos.min():9.6f} " + (f"{100 * acc:8.2f} {100 * (acc - base_acc):+6.2f}" if acc is not None else "")
              + (f"  time-boxed: {best[name] / fastest:.1f}x the fastest after round 1, 2 passes, no accuracy"
                 if name in boxed else ""))
    for name, why in not_run.items():
        print(f"{name:<44} not run: {why}")
    if first is not None:
        print(f"\nfirst use (no prior record, default settings): measured in {first_use_s:.1f}s, a one-off cost "
              f"(budget {FIRST_USE_BUDGET:g}s), and chose {first['choice']} ({first['precision']}); later processes reuse it")
        print("\n".join(tune_table(first)))
    else:
        print(f"\nfirst use: the measurement failed after {first_use_s:.1f}s (see the log); auto runs ONNX Runtime")
    if tuned is not None:
        print(f"\nthorough embedkit tune on {args.tune_items} of these sentences chose {tuned['choice']} ({tuned['precision']})")
        print("\n".join(tune_table(tuned)))
    auto_rate = rate[auto_name]
    print(f"\nembedkit with default settings (auto, first use included above): {auto_rate / st32:.2f}x sentence-transformers "
          f"fp32 (target >= 3.5x where bf16 passes), {auto_rate / st16:.2f}x under bf16 autocast (target >= 1.5x); "
          f"accuracy {100 * accuracy.get(auto_name, float('nan')):.2f} vs fp32 {100 * base_acc:.2f}")


if __name__ == "__main__":
    sys.exit(main())
