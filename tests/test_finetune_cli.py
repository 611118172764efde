"""`embedkit finetune` as a real subprocess: kill -9 and --resume, per-item failures, refused heads."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_support import LABELS, TEXTS, register

import embedkit
from embedkit.errors import CheckpointError

SUPPORT = str(Path(__file__).with_name("finetune_support.py"))
WORDS = ["really", "quite", "so", "very", "truly", "rather", "most", "just"]
# 64 labelled texts: enough steps (batch 2) that a kill lands mid-run
ROWS = [(f"{w} {t}", label) for w in WORDS for t, label in zip(TEXTS, LABELS)][:64]
SETTINGS = dict(unfreeze="last:2", epochs=12, batch_size=2, lr=1e-2, head_lr=1e-2, validation=0.25, seed=3)
FLAGS = ["--unfreeze", "last:2", "--epochs", "12", "--batch-size", "2", "--lr", "0.01", "--head-lr", "0.01",
         "--validation", "0.25", "--seed", "3", "--checkpoint-every", "5", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def tiny_plugin():
    register()


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUPPORT, *args], capture_output=True, text=True, timeout=180, **kw)


def _table(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_kill_9_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    data = _table(tmp_path / "train.csv", ROWS)
    out = tmp_path / "run"
    argv = ["finetune", "ft-tiny-text", str(data), "--labels", str(data), "--out", str(out), *FLAGS]
    proc = subprocess.Popen([sys.executable, SUPPORT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "checkpoints" / "metrics.json"
    deadline = time.monotonic() + 120
    while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # after the first epoch's checkpoint, mid-training
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "finetune.json").read_text())["status"] == "running"  # it was interrupted
    done_before = len(json.loads(metrics.read_text()))
    assert done_before < 12

    resumed = _cli(*argv, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 13))

    clean = embedkit.finetune("ft-tiny-text", [t for t, _ in ROWS], [label for _, label in ROWS], **SETTINGS)
    assert summary["backbone"] == clean.backbone  # named by the hash of its weights
    mine, theirs = (load_file(embedkit.get_backbone(n).weight_files[0]) for n in (summary["backbone"], clean.backbone))
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    assert summary["digest"] == clean.digest
    # the history of the resumed run is the clean run's, epoch for epoch
    assert [round(h["val_loss"], 6) for h in summary["history"]] == [round(h["val_loss"], 6) for h in clean.history]

    with pytest.raises(CheckpointError, match="other settings or data.*hyperparameters"):  # not another run's
        embedkit.finetune("ft-tiny-text", [t for t, _ in ROWS], [label for _, label in ROWS],
                          **{**SETTINGS, "seed": 4}, checkpoint_dir=out / "checkpoints", resume=True)


def test_bad_rows_exit_2_with_records_and_parent_head_refused_by_predict(tmp_path):
    rows = list(zip(TEXTS, LABELS))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows) + "{not json\n")
    labels = _table(tmp_path / "labels.csv", rows)
    out = tmp_path / "run"
    done = _cli("finetune", "ft-tiny-text", str(data), "--labels", str(labels), "--out", str(out), "--unfreeze",
                "last:1", "--epochs", "1", "--batch-size", "4", "--no-progress", "--json")
    assert done.returncode == 2, done.stderr[-3000:]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["code"], f["source"]) for f in failures] == [("invalid_json", "train.jsonl:row 17")]
    summary = json.loads(done.stdout)
    assert summary["failed_items"] == 1 and (out / "model" / "model.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == summary["history"]

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    parent = Pipeline([("embed", embedkit.Embedder("ft-tiny-text")), ("head", LogisticRegression())]).fit(TEXTS, LABELS)
    embedkit.save(parent, tmp_path / "parent-model")
    refused = _cli("predict", str(tmp_path / "parent-model"), "good film", "--backbone", summary["backbone"])
    assert refused.returncode == 1 and refused.stdout == ""
    assert summary["digest"] in refused.stderr and summary["parent_digest"] in refused.stderr


def test_contrastive_from_the_cli_with_in_batch_negatives(tmp_path):
    data = _table(tmp_path / "train.csv", ROWS[:24])
    out = tmp_path / "run"
    done = _cli("finetune", "ft-tiny-text", str(data), "--labels", str(data), "--out", str(out), "--objective",
                "contrastive", "--loss", "in-batch", "--iterations", "2", "--unfreeze", "all", "--epochs", "1",
                "--batch-size", "2", "--validation", "0", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["history"][0]["steps"] > 0 and (out / "model" / "model.json").is_file()
    assert not (out / "checkpoints").exists()  # a contrastive run takes no checkpoints
    lineage = embedkit.export(summary["backbone"]).manifest["lineage"]  # resolves by name in this process
    assert lineage["hyperparameters"]["loss"] == "in-batch" and lineage["hyperparameters"]["iterations"] == 2
    assert lineage["hyperparameters"]["objective"] == "contrastive"
    match = "--resume and --checkpoint-every are for --objective classify"
    for flags in (["--resume"], ["--checkpoint-every", "3"]):
        refused = _cli("finetune", "ft-tiny-text", str(data), "--labels", str(data), "--out", str(tmp_path / "r2"),
                       "--objective", "contrastive", "--no-progress", *flags)
        assert refused.returncode == 1 and match in refused.stderr, refused.stderr[-2000:]
    refused = _cli("finetune", "ft-tiny-text", str(data), "--labels", str(data), "--out", str(tmp_path / "r3"),
                   "--loss", "in-batch", "--no-progress")
    assert refused.returncode == 1 and "--loss is an option of --objective contrastive" in refused.stderr
