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
    assert bad.returncode == 1 and f"{tmp_path / 'nope.csv'}: no such file or folder" in bad.stderr
    (tmp_path / "l.csv").write_text("id,label\nx,a\n")
    few = run_cli("train-head", str(fs), "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "r"))
    assert few.returncode == 1 and "have a label" in few.stderr


# -- degenerate datasets: handled with a note, or refused with one clear error --------------------------------

def _store_of(tmp_path: Path, texts: list[str]) -> Path:
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    fs = tmp_path / "fs"
    done = run_cli("extract", str(src), "--out", str(fs), "--no-progress")
    assert done.returncode == 0, done.stderr
    return fs


def _labels(path: Path, pairs: list[tuple[str, str]]) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(pairs)
    return str(path)


@pytest.fixture(scope="module")
def banking_texts():
    from support import read_banking

    texts, labels = read_banking("train")
    by_class: dict[str, list[str]] = {}
    for t, c in zip(texts, labels):
        by_class.setdefault(c, []).append(t)
    return by_class


def test_degenerate_datasets_in_train_head_and_report(minilm, tmp_path: Path, banking_texts):
    classes = sorted(banking_texts)[:10]
    pairs = [(t, c) for c in classes for t in banking_texts[c][:6]]
    fs = _store_of(tmp_path, [t for t, _ in pairs])
    run = tmp_path / "out"
    run.mkdir()  # outputs are never written into a folder that does not exist

    # a class with one example: report used to crash (stratified split); both now handle it and say so
    lonely = [p for p in pairs if p[1] in classes[:3]][:13]  # classes 0, 1 x 6 and one of class 2
    table = _labels(tmp_path / "lonely.csv", lonely)
    head = run_cli("train-head", str(fs), "--labels", table, "--out", str(run / "a"), "--json", "--no-progress")
    assert head.returncode == 0, head.stderr
    report = json.loads(head.stdout)
    assert report["classes"] == 3 and report["n_train"] + report["n_test"] == 13
    assert classes[2] not in report["per_class"]  # trained on, never scored
    assert any("single labelled example" in n and classes[2] in n for n in report["notes"])
    curve = run_cli("report", str(fs), "--labels", table, "--repeats", "1", "--out", str(run / "b"), "--no-progress")
    assert curve.returncode == 0, curve.stderr
    assert f"1 class(es) with a single labelled example left out ('{classes[2]}')" in curve.stderr
    assert (run / "b" / "learning_curve.png").is_file()

    # more classes than held-out items (10 classes x 2, test_size 0.2 = 4 items): the held-out part grows
    two_each = _labels(tmp_path / "two.csv", [p for c in classes for p in [q for q in pairs if q[1] == c][:2]])
    grown = run_cli("train-head", str(fs), "--labels", two_each, "--out", str(run / "c"), "--json", "--no-progress")
    assert grown.returncode == 0, grown.stderr
    report = json.loads(grown.stdout)
    assert (report["n_train"], report["n_test"]) == (10, 10)
    assert any("held-out part set to 10 items (not 4)" in n for n in report["notes"])
    small_curve = run_cli("report", str(fs), "--labels", two_each, "--repeats", "1", "--out", str(run / "d"),
                          "--no-progress")
    assert small_curve.returncode == 0, small_curve.stderr

    # refused, one error line each, nothing written
    one_class = _labels(tmp_path / "one.csv", [p for p in pairs if p[1] == classes[0]])
    singles = _labels(tmp_path / "singles.csv", [[q for q in pairs if q[1] == c][0] for c in classes])
    nobody = _labels(tmp_path / "nobody.csv", [("a text nobody extracted", "x"), ("another one", "y")])
    for argv, message in (
        (["train-head", str(fs), "--labels", one_class], f"have the label '{classes[0]}'; a classifier needs at least 2"),
        (["report", str(fs), "--labels", one_class], "a classifier needs at least 2 classes"),
        (["train-head", str(fs), "--labels", singles], "every one of the 10 classes has a single labelled example"),
        (["report", str(fs), "--labels", singles], "at least 2 classes with 2 or more labelled examples"),
        (["train-head", str(fs), "--labels", nobody], "only 0 of 60 stored items have a label"),
        (["report", str(fs), "--labels", nobody], "only 0 of 60 stored items have a label"),
        (["train-head", str(fs), "--labels", two_each, "--cv", "3"], "but class"),
        (["train-head", str(fs), "--labels", two_each, "--param", "nonsense=1"], "the logreg head takes: C,"),
        (["train-head", str(fs), "--labels", two_each, "--param", "C=-1"], "'C' parameter of LogisticRegression"),
        (["train-head", str(fs), "--labels", two_each, "--head", "faiss-knn", "--param", "n_neighbors=0"],
         "n_neighbors must be a positive int"),
        (["report", str(fs), "--labels", two_each, "--head", "knn", "--param", "n_neighbors=0"],
         "'n_neighbors' parameter of KNeighborsClassifier"),
    ):
        done = run_cli(*argv, "--out", str(run / "refused"), "--no-progress")
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 1 and len(errors) == 1 and message in errors[0], (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert not (run / "refused").exists(), argv


# -- plots people can read --------------------------------------------------------------------------------------

def _inside(fig, artist) -> bool:
    """Whether ``artist`` lies within the canvas as saved (the layout drawn again on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig).draw()  # plot_* close their figure after saving
    renderer = fig.canvas.get_renderer()
    box, canvas = artist.get_window_extent(renderer), fig.bbox
    return box.x0 >= canvas.x0 and box.y0 >= canvas.y0 and box.x1 <= canvas.x1 and box.y1 <= canvas.y1


def test_confusion_matrix_is_normalised_with_a_colour_bar_and_scales_with_classes(tmp_path: Path):
    import numpy as np
    from support import read_banking

    from embedkit.heads.plots import plot_confusion

    names = np.array(sorted(set(read_banking("train")[1])))
    assert len(names) == 77
    rng = np.random.default_rng(0)
    figures = {}
    for n in (2, 77):
        matrix = rng.integers(0, 4, (n, n)) + np.diag(rng.integers(10, 40, n))
        png = tmp_path / f"c{n}.png"
        fig = plot_confusion(matrix, names[:n], png, "logreg: accuracy 0.856, macro-F1 0.855")
        ax, bar = fig.axes  # the matrix and its colour bar
        shown = ax.images[0].get_array()
        np.testing.assert_allclose(shown.sum(axis=1), 1.0)  # rows normalised
        np.testing.assert_allclose(shown, matrix / matrix.sum(axis=1, keepdims=True))
        assert bar.get_ylabel() == "share of the true class"
        assert _inside(fig, ax.title), n  # the 2-class title used to be cut off
        assert all(_inside(fig, t) for t in ax.get_xticklabels() + ax.get_yticklabels())
        width, height = (int.from_bytes(png.read_bytes()[16:20], "big"), int.from_bytes(png.read_bytes()[20:24], "big"))
        assert all(abs(a - b * 100) <= 1 for a, b in zip((width, height), fig.get_size_inches()))
        figures[n] = (fig, ax.get_xticklabels()[0].get_fontsize(), len(ax.texts))
    (small, small_font, small_texts), (large, large_font, large_texts) = figures[2], figures[77]
    assert large.get_size_inches()[0] > 3 * small.get_size_inches()[0]
    assert small_font > large_font >= 7  # readable at 100 dpi
    assert small_texts == 4 and large_texts == 0  # numbers in cells only while they fit


def test_learning_curve_plot_keeps_its_title_and_labels_inside(tmp_path: Path):
    from embedkit.heads.plots import plot_learning_curve

    rows = [{"per_class": s, "train_items": n, "repeat": 0, "model": m, "accuracy": a, "train_seconds": t}
            for s, n in ((1, 77), (2, 154), ("all", 350))
            for m, a, t in (("logreg on frozen features", 0.5, 1.2), ("from-scratch baseline", 0.2, 0.3))]
    title = "minilm-l6-int8-dynamic-with-a-long-name: logreg vs from-scratch baseline on 77 classes"
    fig = plot_learning_curve(rows, tmp_path / "lc.png", title)
    assert _inside(fig, fig._suptitle)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["77", "154", "350"]  # not 2^7
    assert all(_inside(fig, ax.xaxis.label) and _inside(fig, ax.yaxis.label) for ax in (left, right))
    assert (tmp_path / "lc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["knn", "faiss-knn"])
def test_more_neighbours_than_training_items_is_an_input_error_not_a_crash(kind):
    """`train-head --head knn --param n_neighbors=1000` on a small store crashed at predict
    with a traceback; it is refused as a --param error before fitting."""
    import numpy as np

    from embedkit.errors import UnsupportedInputError
    from embedkit.heads.training import evaluate

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 8)).astype(np.float32)
    y = np.array(["a", "b"] * 20)
    with pytest.raises(UnsupportedInputError, match="n_neighbors=1000"):
        evaluate(X, y, kind, {"n_neighbors": 1000})
    with pytest.raises(UnsupportedInputError, match="n_neighbors=33"):  # holdout trains on 32, a 5-fold fold on 32
        evaluate(X, y, kind, {"n_neighbors": 33}, cv=5)
    assert evaluate(X, y, kind, {"n_neighbors": 5}, cv=5).accuracy >= 0


@pytest.mark.parametrize("kind", ["knn", "faiss-knn"])
def test_learning_curve_of_a_knn_head_leaves_out_sizes_smaller_than_k(kind):
    """`report --head knn` on two classes crashed at 1 example per class (2 items < k=5):
    such sizes are left out (with a warning), and a k above every size is a --param error."""
    import numpy as np

    from embedkit.errors import UnsupportedInputError
    from embedkit.heads.training import learning_curve

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 8)).astype(np.float32)
    y = np.array(["a", "b"] * 20)
    rows = learning_curve(X, X, y, "image", head=kind, params={"n_neighbors": 5}, repeats=1)
    assert rows and min(row["train_items"] for row in rows) >= 5
    assert "all" in {row["per_class"] for row in rows}
    with pytest.raises(UnsupportedInputError, match="n_neighbors=1000"):
        learning_curve(X, X, y, "image", head=kind, params={"n_neighbors": 1000}, repeats=1)


def test_one_text_in_rows_with_different_labels_stays_unlabelled(tmp_path):
    """A table joined on content ids gave a text labelled twice (a then b) the last row's label;
    as README says, an id with rows of different labels stays unlabelled."""
    import numpy as np

    from embedkit.heads.training import labels_for
    from embedkit.inputs.sources import iter_items

    table = tmp_path / "labels.csv"
    table.write_text("text,category\nmy card is lost,lost\nwhat rate,rate\nmy card is lost,rate\n"
                     "top up failed,top_up\ntop up failed,top_up\n")
    ids = np.asarray(sorted({item.id for item in iter_items(table, "text", "text")}))
    by_text = {item.payload: item.id for item in iter_items(table, "text", "text")}
    got = dict(zip(ids, labels_for(ids, np.asarray([""] * len(ids)), str(table), "text", "category")))
    assert got[by_text["my card is lost"]] is None
    assert got[by_text["what rate"]] == "rate" and got[by_text["top up failed"]] == "top_up"
