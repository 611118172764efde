"""train-head on cached features, then predict from raw inputs with the saved model (real CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import BANKING, SHARED, run_cli


def test_text_head_from_a_labelled_table(minilm, tmp_path: Path):
    import csv

    with open(BANKING / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::10]  # sorted by intent: every 10th row spans all 77
    table = tmp_path / "train.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    fs, out = tmp_path / "fs", tmp_path / "run"
    assert run_cli("extract", str(table), "--out", str(fs), "--no-progress").returncode == 0
    run = run_cli("train-head", str(fs), "--labels", str(table), "--label-column", "category",
                  "--head", "logreg", "--param", "C=10", "--cv", "2", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["classes"] == 77 and report["unlabelled"] == 0 and len(report["cv_accuracy"]) == 2
    assert report["accuracy"] > 0.6 and 0 < report["macro_f1"] <= 1
    assert "card_arrival" in report["per_class"]
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = run_cli("predict", str(out / "model"), "my new card still has not arrived", "what exchange rate do you use")
    assert pred.returncode == 0, pred.stderr
    assert [line.split("\t")[0] for line in pred.stdout.splitlines()] == ["card_arrival", "exchange_rate"]
    curve = run_cli("report", str(fs), "--labels", str(table), "--label-column", "category", "--repeats", "1",
                    "--out", str(tmp_path / "rep"))
    assert curve.returncode == 0, curve.stderr
    lines = (tmp_path / "rep" / "learning_curve.csv").read_text().splitlines()
    assert lines[0] == "per_class,train_items,repeat,model,accuracy,train_seconds"
    sizes = {line.split(",")[0] for line in lines[1:]}
    assert {"1", "2", "4", "all"} <= sizes and any("baseline" in line for line in lines)
    assert (tmp_path / "rep" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_image_head_with_folder_labels(tmp_path: Path):
    hym = SHARED / "images" / "hymenoptera" / "train"
    if not hym.is_dir():
        pytest.skip("hymenoptera is not present")
    listing = tmp_path / "files.txt"
    files = sorted((hym / "ants").glob("*.jpg"))[:20] + sorted((hym / "bees").glob("*.jpg"))[:20]
    listing.write_text("\n".join(str(f) for f in files) + "\n")
    fs, out = tmp_path / "fs", tmp_path / "run"
    assert run_cli("extract", str(listing), "--backbone", "mobilenet-v2", "--out", str(fs), "--no-progress").returncode == 0
    run = run_cli("train-head", str(fs), "--backbone", "mobilenet-v2", "--labels", "folder", "--head", "faiss-knn",
                  "--param", "n_neighbors=3", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["classes"] == 2 and report["n_train"] + report["n_test"] == 40
    pred = run_cli("predict", str(out / "model"), str(files[0]), str(files[-1]))
    assert [line.split("\t")[0] for line in pred.stdout.splitlines()] == ["ants", "bees"], pred.stderr


def test_bad_param_and_missing_labels_are_usage_errors(minilm, tmp_path: Path):
    fs = tmp_path / "fs"
    (tmp_path / "t.txt").write_text("one text\nanother text\n")
    assert run_cli("extract", str(tmp_path / "t.txt"), "--out", str(fs), "--no-progress").returncode == 0
    bad = run_cli("train-head", str(fs), "--labels", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"))
    assert bad.returncode == 1 and "not a file" in bad.stderr
    (tmp_path / "l.csv").write_text("id,label\nx,a\n")
    few = run_cli("train-head", str(fs), "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "r"))
    assert few.returncode == 1 and "have a label" in few.stderr
