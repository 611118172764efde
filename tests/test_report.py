"""``embedkit.report``: the learning-curve report as a library function (``embedkit report`` is a thin layer on it)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from support import read_banking, run_cli

import embedkit
from embedkit.errors import DatasetError, UnsupportedInputError

PER_CLASS = 12


@pytest.fixture(scope="module")
def labelled(minilm, tmp_path_factory):
    """36 banking77 texts of 3 intents (12 each) extracted with MiniLM: ``(table, store, artifact)``."""
    texts, intents = read_banking("train")
    classes = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
    rows = [(t, c) for c in classes for t in [t for t, i in zip(texts, intents) if i == c][:PER_CLASS]]
    assert len(rows) == 3 * PER_CLASS
    folder = tmp_path_factory.mktemp("report")
    table = folder / "labelled.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    store = folder / "features"
    done = embedkit.extract(str(table), "minilm-l6", str(store), column="text")
    assert done.ok == len(rows)
    return table, store, minilm


def test_report_returns_the_curve_it_writes(labelled, tmp_path: Path):
    table, store, artifact = labelled
    out = tmp_path / "curves"
    result = embedkit.report(store, "minilm-l6", table, out, repeats=2)

    assert (result.backbone, result.digest, result.head, result.finetune) == ("minilm-l6", artifact.digest, "logreg", None)
    # 36 items, 30% held out (11): 25 train (8 or 9 per class); sizes 1, 2, 4 per class (2 subsets each), then all
    frozen, baseline = "logreg on frozen features", "from-scratch baseline"
    assert len(result.rows) == 2 * (3 * 2 + 1)
    summary = result.summary()
    for model in (frozen, baseline):
        line = [r for r in summary if r["model"] == model]
        assert [r["per_class"] for r in line] == [1, 2, 4, "all"]  # one row per training size
        assert [r["train_items"] for r in line] == [3, 6, 12, 25]
        assert [r["subsets"] for r in line] == [2, 2, 2, 1]
    for row in result.rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["train_seconds"] > 0
        assert row["repeat"] in ((0, 1) if row["per_class"] != "all" else (0,))
    # accuracy is a share of the 11 held-out items; MiniLM's features separate these 3 intents
    # far above chance (1/3) once trained on every item
    assert all(abs(r["accuracy"] * 11 - round(r["accuracy"] * 11)) < 1e-9 for r in result.rows)
    assert next(r for r in summary if r["model"] == frozen and r["per_class"] == "all")["accuracy"] >= 0.8

    assert result.files == {"csv": out / "learning_curve.csv", "png": out / "learning_curve.png",
                            "json": out / "learning_curve.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.files.values())
    written = json.loads(result.files["json"].read_text())
    assert written == result.to_json() and written["kind"] == "report" and written["rows"] == result.rows
    with open(result.files["csv"], newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert [(r["per_class"], int(r["train_items"]), r["model"], float(r["accuracy"])) for r in table_rows] == [
        (str(r["per_class"]), r["train_items"], r["model"], r["accuracy"]) for r in result.rows]
    assert result.files["png"].read_bytes()[:4] == b"\x89PNG"

    again = embedkit.report(store, artifact.digest[:12], table, repeats=2)  # no out: the same curve, nothing written
    assert again.files == {} and [(r["per_class"], r["model"], r["accuracy"]) for r in again.rows] == [
        (r["per_class"], r["model"], r["accuracy"]) for r in result.rows]


def test_report_errors_name_python_parameters(labelled, tmp_path: Path):
    table, store, _ = labelled
    out = tmp_path / "refused"
    for kwargs, error, message in (
        ({"params": {"nonsense": 1}}, UnsupportedInputError, r"^params: .*the logreg head takes: C,"),
        ({"head": "knn", "params": {"n_neighbors": 26}}, UnsupportedInputError,
         r"^params: the knn head asks for n_neighbors=26, but the curve trains on at most 25 items"),
        ({"epochs": 2}, UnsupportedInputError, r"^epochs set how the report fine-tunes: pass finetune="),
        ({"finetune": "classify", "iterations": 2}, UnsupportedInputError, r"^iterations: only finetune='contrastive'"),
        ({"finetune": "sideways"}, UnsupportedInputError, r"^finetune: must be one of classify, contrastive"),
        ({"repeats": 0}, ValueError, r"^repeats must be a positive int"),
    ):
        with pytest.raises(error, match=message) as raised:
            embedkit.report(store, "minilm-l6", table, out, **kwargs)
        assert "--" not in str(raised.value), kwargs  # the library names parameters, not CLI flags
        assert not out.exists(), kwargs
    with pytest.raises(UnsupportedInputError, match="nope"):  # a missing label column is named
        embedkit.report(store, "minilm-l6", table, out, label_column="nope")
    with pytest.raises(UnsupportedInputError, match=r"^labels: text reports need a labels table, not 'folder'"):
        embedkit.report(store, "minilm-l6", "folder", out)
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"{t},x\n" for t in ["a", "b"]))
    with pytest.raises(DatasetError, match="only 0 of 36 stored items have a label"):
        embedkit.report(store, "minilm-l6", one, out)
    assert not out.exists()


def test_the_cli_names_its_flags_for_the_same_errors(labelled, tmp_path: Path):
    table, store, _ = labelled
    done = run_cli("report", str(store), "--labels", str(table), "--head", "knn", "--param", "n_neighbors=26",
                   "--out", str(tmp_path / "r"), "--no-progress")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("error: --param: the knn head asks for n_neighbors=26"), errors
    assert not (tmp_path / "r").exists()
