"""Issue 23, items 2 (search recovery), 7 and 8: the CLI reads as users type, inputs that could
mean two things are refused, and row ids tell sources apart. Real files, the real CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import run_cli

import embedkit
from embedkit.errors import UnsupportedInputError

TEXTS = ["my card is lost", "my card was stolen", "lost my card today", "card missing",
         "top up failed", "top up did not work", "my top up is pending", "cannot top up"]
LABELS = ["card"] * 4 + ["topup"] * 4


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


@pytest.fixture()
def trained(minilm, tmp_path: Path) -> Path:
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{c}\n" for t, c in zip(TEXTS, LABELS)))
    assert run_cli("extract", str(tmp_path / "train.csv"), "--out", str(tmp_path / "fs"), "--no-progress").returncode == 0
    done = run_cli("train-head", str(tmp_path / "fs"), "--labels", str(tmp_path / "train.csv"), "--out",
                   str(tmp_path / "run"), "--test-size", "0.5")
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_predict_takes_options_between_the_model_and_the_inputs(trained: Path):
    model = str(trained / "run" / "model")
    after = run_cli("predict", model, "card missing", "cannot top up", "--proba", "--json")
    assert after.returncode == 0, after.stderr
    between = run_cli("predict", model, "--proba", "card missing", "--json", "cannot top up")  # was: unrecognized
    assert between.returncode == 0, between.stderr
    rows = [json.loads(line) for line in after.stdout.splitlines()]  # one JSON line per input
    again = [json.loads(line) for line in between.stdout.splitlines()]
    assert [(r["input"], r["label"], sorted(r["proba"])) for r in again] == \
        [(r["input"], r["label"], sorted(r["proba"])) for r in rows]
    # two processes: the runtime's thread count may differ with the load, so the last bits may too
    assert all(abs(a["probability"] - b["probability"]) <= 1e-5 for a, b in zip(again, rows))
    assert [r["label"] for r in rows] == ["card", "topup"]
    named = run_cli("predict", model, "--backbone", "minilm-l6", "card missing")  # the README's own spelling
    assert named.returncode == 0 and named.stdout == "card\tcard missing\n", named.stderr


def test_search_puts_back_an_index_whose_replacement_was_interrupted(trained: Path):
    idx = trained / "idx"
    assert run_cli("index", str(trained / "fs"), "--out", str(idx)).returncode == 0
    before = run_cli("search", str(idx), "card missing", "-k", "2", "--json")
    assert before.returncode == 0, before.stderr
    idx.rename(trained / f".idx.{dead_pid()}-abc123.old")  # a crash between the two renames of a replacement
    found = run_cli("search", str(idx), "-k", "2", "card missing", "--json")  # was: "idx does not exist"
    assert found.returncode == 0, found.stderr
    hits = [[(n["id"], n["source"]) for n in q["neighbours"]] for q in json.loads(found.stdout)]
    assert hits == [[(n["id"], n["source"]) for n in q["neighbours"]] for q in json.loads(before.stdout)]
    assert (idx / "index.json").is_file() and not list(trained.glob(".idx.*"))  # put back, nothing left aside


def test_predict_puts_back_a_model_whose_replacement_was_interrupted(trained: Path):
    model = trained / "run" / "model"
    model.rename(trained / "run" / f".model.{dead_pid()}-abc123.old")
    done = run_cli("predict", str(model), "card missing")
    assert done.returncode == 0 and done.stdout == "card\tcard missing\n", done.stderr
    assert (model / "model.json").is_file()


def test_a_missing_index_is_still_one_error_line(tmp_path: Path):
    done = run_cli("search", str(tmp_path / "nope"), "a query")
    assert done.returncode == 1 and "error:" in done.stderr and "nope" in done.stderr and "Traceback" not in done.stderr


def test_numeric_looking_labels_are_said_to_be_read_as_class_names(minilm, tmp_path: Path):
    scores = ["0.5", "1.5"] * 4
    (tmp_path / "train.csv").write_text("text,score\n" + "".join(f"{t},{s}\n" for t, s in zip(TEXTS, scores)))
    assert run_cli("extract", str(tmp_path / "train.csv"), "--out", str(tmp_path / "fs"), "--no-progress").returncode == 0
    done = run_cli("train-head", str(tmp_path / "fs"), "--labels", str(tmp_path / "train.csv"), "--label-column",
                   "score", "--out", str(tmp_path / "run"), "--test-size", "0.5")
    assert done.returncode == 0, done.stderr
    assert "note: labels are read as strings: the 2 distinct values of 'score' ('0.5', '1.5')" in done.stderr, \
        done.stderr
    plain = run_cli("train-head", str(tmp_path / "fs"), "--labels", str(tmp_path / "train.csv"), "--label-column",
                    "score", "--out", str(tmp_path / "run2"), "--test-size", "0.5", "--json")
    assert json.loads(plain.stdout)["classes"] == 2
    help_text = run_cli("train-head", "--help").stdout
    assert "read as strings" in " ".join(help_text.split())


def test_row_ids_of_two_data_csv_files_in_different_folders_differ(minilm, tmp_path: Path):
    for folder, text in (("a", "my card is lost"), ("b", "top up failed")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.csv").write_text(f"id,text\n,{text}\n")  # an empty id cell
    first = embedkit.extract(tmp_path / "a" / "data.csv", "minilm-l6", tmp_path / "fs", id_column="id")
    second = embedkit.extract(tmp_path / "b" / "data.csv", "minilm-l6", tmp_path / "fs", id_column="id")
    assert (first.computed, second.computed, second.cached) == (1, 1, 0)  # was: "already cached"
    ids, X = embedkit.FeatureStore(tmp_path / "fs").load("minilm-l6")
    assert len(set(ids.tolist())) == 2
    expected = embedkit.embed(["my card is lost", "top up failed"], "minilm-l6").vectors
    got = np.asarray(X)[np.argsort([s for s in ids.tolist()])]  # order-free check: each vector is one text's
    for row in np.asarray(X):
        assert min(np.abs(row - e).max() for e in expected) <= 1e-6
    assert not np.allclose(got[0], got[1])
    again = embedkit.extract(tmp_path / "a" / "data.csv", "minilm-l6", tmp_path / "fs", id_column="id")
    assert (again.cached, again.computed) == (1, 0)  # the same file's row keeps its id


def test_one_image_array_is_refused_where_a_sequence_of_images_is_expected(tmp_path: Path):
    from finetune_support import IMAGE, register

    register()
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    embedder = embedkit.Embedder(backbone="ft-tiny-image").fit()
    with pytest.raises(UnsupportedInputError, match=r"shape \(40, 48, 3\).*\[image\]"):
        embedder.transform(photo)  # was: 40 strips of 48 x 3 pixels, embedded silently
    one = embedder.transform([photo])
    assert one.shape == (1, IMAGE.dim)
    np.testing.assert_allclose(embedder.transform(photo[None]), one, atol=1e-6)
    with pytest.raises(UnsupportedInputError, match=r"may be one 40x48 image with 3 channel"):
        embedkit.extract(photo, "ft-tiny-image", tmp_path / "fs")
    stack = rng.integers(0, 255, (3, 40, 48, 3), dtype=np.uint8)
    assert embedder.transform(stack).shape == (3, IMAGE.dim)  # (N, H, W, C) is N images, as before
    with pytest.raises(UnsupportedInputError, match=r"shape \(40, 48, 3\)"):
        embedkit.embed(photo, "ft-tiny-image")  # the function, as the estimator: never 40 strips
    assert embedkit.embed(stack, "ft-tiny-image").stats.ok == 3
