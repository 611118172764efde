"""embedkit report --finetune: a fine-tuned line beside the frozen head and the baseline (tiny backbone, real CLI)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_support import NEG, POS, register

HERE = Path(__file__).resolve().parent


def tiny_cli(*args: str) -> subprocess.CompletedProcess:
    """The embedkit command with the tiny backbones registered (tests/finetune_support.py)."""
    return subprocess.run([sys.executable, str(HERE / "finetune_support.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curve")
    table = folder / "reviews.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for prefix in ("", "a really ", "such a "):
            writer.writerows([prefix + t, "pos"] for t in POS)
            writer.writerows([prefix + t, "neg"] for t in NEG)
    fs = folder / "fs"
    done = tiny_cli("extract", str(table), "--backbone", "ft-tiny-text", "--out", str(fs), "--no-progress")
    assert done.returncode == 0, done.stderr
    return table, fs


def test_report_adds_fine_tuned_points_at_affordable_sizes_only(features, tmp_path):
    register()
    from embedkit.models import finetuned as tuned

    table, fs = features
    before = sorted(b.name for b in tuned.listing())
    out = tmp_path / "rep"
    run = tiny_cli("report", str(fs), "--labels", str(table), "--repeats", "1", "--finetune", "contrastive",
                   "--finetune-max-items", "8", "--iterations", "2", "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    with open(out / "learning_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    models = {r["model"] for r in rows}
    assert models == {"logreg on frozen features", "from-scratch baseline", "fine-tuned (contrastive, all)"}
    tuned_rows = [r for r in rows if r["model"].startswith("fine-tuned")]
    # 48 items, 30% held out: 33 to train (16 + 17), sizes 1, 2, 4, 8 per class, then all;
    # only subsets of at most 8 items are fine-tuned: 1, 2 and 4 per class (2, 4 and 8 items)
    assert [(r["per_class"], int(r["train_items"])) for r in tuned_rows] == [("1", 2), ("2", 4), ("4", 8)]
    frozen_sizes = [r["per_class"] for r in rows if r["model"] == "logreg on frozen features"]
    assert frozen_sizes == ["1", "2", "4", "8", "all"]
    for r in tuned_rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["train_seconds"]) > 0
    report = json.loads((out / "learning_curve.json").read_text())
    assert report["finetune"] == {"objective": "contrastive", "unfreeze": "all", "max_items": 8, "epochs": 1,
                                  "iterations": 2, "batch_size": 16}
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "fine-tuned (contrastive, all)" in run.stdout
    assert sorted(b.name for b in tuned.listing()) == before  # the scratch backbones went with their store


def test_report_finetune_options_are_checked(features, tmp_path):
    table, fs = features
    lone = tiny_cli("report", str(fs), "--labels", str(table), "--unfreeze", "all", "--out", str(tmp_path / "a"))
    assert lone.returncode == 1 and "--finetune" in lone.stderr
    bad = tiny_cli("report", str(fs), "--labels", str(table), "--finetune", "contrastive", "--unfreeze", "sideways",
                   "--out", str(tmp_path / "b"))
    assert bad.returncode == 1 and "sideways" in bad.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
