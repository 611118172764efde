"""A CLI that says what happened: failures, search matches, namespaces, predict inputs, progress, hints."""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import BANKING, run_cli

import embedkit

INTENTS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed")


def labelled_table(path: Path, per_class: int = 12, intents=INTENTS) -> Path:
    """A real Banking77 sample: ``per_class`` texts of each intent, columns text and category."""
    with open(BANKING / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = [r for c in intents for r in [r for r in rows if r["category"] == c][:per_class]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(picked)
    return path


@pytest.fixture(scope="module")
def trained(minilm, tmp_path_factory):
    """A feature store of 48 labelled texts and a logreg model trained on it through the CLI."""
    root = tmp_path_factory.mktemp("trained")
    table = labelled_table(root / "train.csv")
    fs, run = root / "fs", root / "run"
    assert run_cli("extract", str(table), "--out", str(fs), "--no-progress").returncode == 0
    done = run_cli("train-head", str(fs), "--labels", str(table), "--label-column", "category", "--out", str(run),
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    return root, table, fs, run / "model"


def test_store_failures_lists_each_failed_item(minilm, tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"fine text\n\xff\xfe not utf-8\nanother fine text\n")
    fs = tmp_path / "fs"
    assert run_cli("extract", str(src), "--out", str(fs), "--no-progress").returncode == 2
    done = run_cli("store", "failures", str(fs), "--json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [(r["source"], r["stage"], r["code"], r["backbone"]) for r in records] == [
        ("t.txt:line 2", "decode", "invalid_utf8", "minilm-l6")]
    assert records[0]["message"] and len(records[0]["id"]) == 32
    text = run_cli("store", "failures", str(fs))
    assert "t.txt:line 2" in text.stdout and "invalid_utf8" in text.stdout and "1 failed item(s)" in text.stderr


def test_search_shows_the_matched_text_a_labelled_score_and_df_iloc_rows(trained, tmp_path):
    import pandas as pd

    root, table, fs, _ = trained
    index = tmp_path / "ix"
    built = run_cli("index", str(fs), "--out", str(index))  # no --backbone: the store's only namespace
    assert built.returncode == 0, built.stderr
    done = run_cli("search", str(index), "my card still has not arrived", "-k", "3", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    [entry] = json.loads(done.stdout)
    assert entry["score"] == "cosine similarity" and entry["higher_is_better"] is True
    frame = pd.read_csv(table)
    for hit in entry["neighbours"]:
        assert hit["match"] == frame.iloc[hit["row"]]["text"]  # 0-based, as df.iloc
        assert hit["score"] == pytest.approx(1 - hit["distance"])
    assert frame.iloc[entry["neighbours"][0]["row"]]["category"] == "card_arrival"
    assert entry["neighbours"][0]["score"] >= entry["neighbours"][-1]["score"]
    # human output: the header names the score, rows carry the text; from elsewhere, --source finds it
    human = run_cli("search", str(index), "my card still has not arrived", "-k", "1", "--source", str(table),
                    cwd=tmp_path)
    first = entry["neighbours"][0]
    assert human.stdout.splitlines()[0].startswith("score: cosine similarity (higher is better)")
    assert f"{first['match']}  [train.csv row {first['row']}" in human.stdout
    # the file changed since extraction: the row is not passed off as the match
    edited = tmp_path / "train.csv"
    frame.assign(text=["something else entirely"] * len(frame)).to_csv(edited, index=False)
    changed = run_cli("search", str(index), "my card still has not arrived", "-k", "1", "--json", cwd=tmp_path)
    hit = json.loads(changed.stdout)[0]["neighbours"][0]
    assert hit["match"] is None and "changed since extraction" in hit["note"]


def test_only_namespace_is_used_and_several_are_named(trained, tmp_path):
    root, table, fs, _ = trained
    done = run_cli("train-head", str(fs), "--labels", str(table), "--label-column", "category",
                   "--out", str(tmp_path / "r"), "--json", "--no-progress")
    assert done.returncode == 0, done.stderr
    two = tmp_path / "two"
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    for backbone in ("minilm-l6", "minilm-l6-int8-dynamic"):
        if backbone.endswith("dynamic"):
            embedkit.quantize("minilm-l6", "dynamic")
        assert run_cli("extract", str(tmp_path / "few.txt"), "--backbone", backbone, "--out", str(two),
                       "--no-progress").returncode == 0
    for argv in (["index", str(two), "--out", str(tmp_path / "ix")],
                 ["train-head", str(two), "--labels", str(table), "--out", str(tmp_path / "r2")],
                 ["report", str(two), "--labels", str(table), "--out", str(tmp_path / "r3")]):
        refused = run_cli(*argv)
        assert refused.returncode == 1, refused.stderr
        assert "several backbones: minilm-l6 (" in refused.stderr and "minilm-l6-int8-dynamic (" in refused.stderr
        assert "--backbone" in refused.stderr
    assert not (tmp_path / "ix").exists() and not (tmp_path / "r2").exists()


def test_predict_reads_arguments_files_and_stdin_with_probabilities_and_json(trained, tmp_path):
    root, table, fs, model = trained
    listing = tmp_path / "in.txt"
    listing.write_text("what exchange rate do you use\nmy card was stolen\n")
    done = run_cli("predict", str(model), "my new card has not arrived", "--input", str(listing), "--json", "--proba")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["input"] for r in records] == ["my new card has not arrived", "what exchange rate do you use",
                                             "my card was stolen"]
    assert [r["label"] for r in records] == ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
    for r in records:
        assert set(r["proba"]) == set(INTENTS) and sum(r["proba"].values()) == pytest.approx(1.0)
        assert r["probability"] == max(r["proba"].values()) == r["proba"][r["label"]]
    piped = subprocess.run([sys.executable, "-m", "embedkit.cli", "predict", str(model), "--input", "-", "--proba"],
                           input="my top up failed\n", capture_output=True, text=True, env=dict(os.environ))
    assert piped.returncode == 0, piped.stderr
    label, probability, text, top = piped.stdout.rstrip("\n").split("\t")
    assert (label, text) == ("top_up_failed", "my top up failed") and 0.25 < float(probability) <= 1
    assert top.startswith("(top 3: top_up_failed ")
    nothing = run_cli("predict", str(model))
    assert nothing.returncode == 1 and "no inputs" in nothing.stderr


def test_predict_does_not_import_torch(trained):
    _, _, _, model = trained
    code = ("import sys, embedkit.cli\n"
            f"assert embedkit.cli.main(['predict', {str(model)!r}, 'my card has not arrived']) == 0\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "card_arrival\tmy card has not arrived" in done.stdout and "TORCH False" in done.stdout


def test_progress_goes_to_stderr_for_cv_and_report(trained, tmp_path):
    root, table, fs, _ = trained
    done = run_cli("train-head", str(fs), "--labels", str(table), "--label-column", "category", "--cv", "3",
                   "--out", str(tmp_path / "r"), "--json")
    assert done.returncode == 0, done.stderr
    assert "train-head: 100%" in done.stderr and "4/4" in done.stderr
    assert len(json.loads(done.stdout)["cv_accuracy"]) == 3  # stdout stays pure JSON
    curve = run_cli("report", str(fs), "--labels", str(table), "--label-column", "category", "--repeats", "1",
                    "--out", str(tmp_path / "c"))
    assert curve.returncode == 0, curve.stderr
    assert "report: 100%" in curve.stderr


def test_all_missing_paths_say_where_paths_are_resolved_from(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "files.txt").write_text("ants/a.jpg\nbees/b.jpg\n")
    done = run_cli("embed", "mobilenet-v2", "lists/files.txt", "--out", str(tmp_path / "e.npy"), "--no-progress",
                   cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "2 images: 0 ok, 2 failed ->" in done.stderr and "images/s" not in done.stderr
    assert f"resolved from the folder of that file ({lists})" in done.stderr and str(tmp_path) in done.stderr
    ext = run_cli("extract", "lists/files.txt", "--backbone", "mobilenet-v2", "--out", str(tmp_path / "fs"),
                  "--no-progress", cwd=tmp_path)
    assert ext.returncode == 2 and "items/s" not in ext.stderr
    assert f"({lists})" in ext.stderr and "embedkit store failures" in ext.stderr


def test_load_plugins_naming_nothing_warns_with_the_choices():
    done = run_cli("backbones", env={"EMBEDKIT_LOAD_PLUGINS": "txet"})
    # no backbone is registered: only where the model store is (and what it holds) is printed
    registered = [line for line in done.stdout.splitlines() if line.split()[1:2] in (["text"], ["image"])]
    assert done.returncode == 0 and done.stdout.startswith("model store: ") and registered == []
    assert "EMBEDKIT_LOAD_PLUGINS names 'txet'" in done.stderr and "text (embedkit-text)" in done.stderr
    assert "vision (embedkit-vision)" in done.stderr
    fine = run_cli("backbones", env={"EMBEDKIT_LOAD_PLUGINS": "text"})
    assert "EMBEDKIT_LOAD_PLUGINS" not in fine.stderr and "minilm-l6" in fine.stdout


def test_cuda_without_cuda_is_one_error_and_auto_warns_once(minilm, caplog):
    import onnxruntime as ort

    from embedkit.encoder import encoder_for
    from embedkit.errors import DeviceUnavailableError
    from embedkit.runtimes import onnx_runtime as runtime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    runtime._warned.clear()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(DeviceUnavailableError, match="onnxruntime-gpu"):
            encoder_for(minilm, device="cuda")
        assert caplog.records == []  # no "could not tune" warning before the error
        for _ in range(3):
            assert encoder_for(minilm, device="auto").runtime.device == "cpu"
    assert [r.getMessage().count("running on CPU") for r in caplog.records] == [1]


def test_third_party_progress_bars_stay_out_of_a_fresh_export(tmp_path):
    done = run_cli("export", "minilm-l6", env={"EMBEDKIT_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr


def test_predict_with_a_bad_item_predicts_the_others_and_exits_2(trained):
    """One undecodable line made `predict` print nothing and exit 1; items that fail are
    'some items failed' (exit 2), each named in its row, and the good ones are predicted."""
    _, _, _, model = trained
    data = b"my card was stolen\n\xff\xfe not utf-8\nwhat exchange rate do you use\n"
    for extra, parse in (([], lambda line: line.split("\t")[0]), (["--json", "--proba"], json.loads)):
        done = subprocess.run([sys.executable, "-m", "embedkit.cli", "predict", str(model), "--input", "-", *extra],
                              input=data, capture_output=True, env=dict(os.environ))
        assert done.returncode == 2, done.stderr
        rows = [parse(line) for line in done.stdout.decode("utf-8", "replace").splitlines()]
        assert len(rows) == 3 and b"1 of 3 input(s) could not be embedded" in done.stderr
        if extra:
            assert rows[0]["label"] == "lost_or_stolen_card" and rows[2]["label"] == "exchange_rate"
            assert rows[1]["error_code"] == "invalid_utf8" and "label" not in rows[1]
        else:
            assert rows == ["lost_or_stolen_card", "!invalid_utf8", "exchange_rate"]


@pytest.mark.parametrize("action", ["info", "verify", "gc", "failures"])
def test_store_commands_on_a_folder_that_is_not_a_store(tmp_path, action):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    done = run_cli("store", action, str(mine))
    assert done.returncode == 1 and "is not a feature store" in done.stderr  # was exit 0 with no output
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("store", action, str(empty))
    assert done.returncode == 0 and "holds no features yet" in done.stderr
