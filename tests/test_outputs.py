"""Outputs never destroy what embedkit did not create, and replace what it did crash-safely."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import read_banking, run_cli

import embedkit
from embedkit.errors import OutputExistsError, OutputFolderMissingError, OutputIsInputError

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def corpus(minilm, tmp_path_factory):
    """A labelled CSV and its feature store (40 banking texts of 4 intents)."""
    root = tmp_path_factory.mktemp("corpus")
    texts, labels = read_banking("train")
    keep = sorted(set(labels))[:4]
    rows = [r for c in keep for r in [(t, l) for t, l in zip(texts, labels) if l == c][:10]]
    table = root / "train.csv"
    table.write_text("text,label\n" + "".join(f'"{t}",{c}\n' for t, c in rows))
    embedkit.extract(str(table), "minilm-l6", str(root / "features"))
    return root, table, root / "features"


def _store_rows(features: Path) -> int:
    ids, X = embedkit.FeatureStore(features).load("minilm-l6")
    return len(ids)


def _documents(tmp_path: Path) -> Path:
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("three years of work")
    return docs


def test_index_onto_its_own_feature_store_is_refused_and_the_store_survives(corpus):
    _, _, features = corpus
    before = sorted(p.relative_to(features) for p in features.rglob("*"))
    done = run_cli("index", str(features), "--out", str(features))
    assert done.returncode == 1, done.stderr  # was 0, with the whole store deleted
    assert "error:" in done.stderr and "is the input" in done.stderr
    assert sorted(p.relative_to(features) for p in features.rglob("*")) == before
    assert _store_rows(features) == 40
    inside = run_cli("index", str(features), "--out", str(features / "idx"))
    assert inside.returncode == 1 and "lies inside the input" in inside.stderr


@pytest.mark.parametrize("command", ["index", "train-head", "report", "extract"])
def test_out_naming_a_folder_of_documents_is_refused_by_every_command(corpus, tmp_path, command):
    _, table, features = corpus
    docs = _documents(tmp_path)
    args = {
        "index": ["index", str(features)],
        "train-head": ["train-head", str(features), "--labels", str(table)],
        "report": ["report", str(features), "--labels", str(table), "--repeats", "1"],
        "extract": ["extract", str(table), "--no-progress"],
    }[command]
    done = run_cli(*args, "--out", str(docs))
    assert done.returncode == 1, done.stderr  # index deleted the folder; the others wrote into it
    assert "is not a" in done.stderr and "written by embedkit" in done.stderr
    assert sorted(p.name for p in docs.iterdir()) == ["thesis.txt"]
    assert (docs / "thesis.txt").read_text() == "three years of work"


def test_embed_onto_its_own_input_is_refused_and_the_input_is_unchanged(minilm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["hello there", "my card is lost"], "id": [1, 2]}), data)
    before = data.read_bytes()
    done = run_cli("embed", "minilm-l6", str(data), "--column", "text", "--out", str(data), "--no-progress")
    assert done.returncode == 1 and "is the input" in done.stderr  # was 0, the input replaced by embeddings
    assert data.read_bytes() == before
    assert not (tmp_path / "data.parquet.errors.jsonl").exists()

    foreign = tmp_path / "mine.npy"
    np.save(foreign, np.arange(3))
    refused = run_cli("embed", "minilm-l6", str(data), "--column", "text", "--out", str(foreign))
    assert refused.returncode == 1 and "not an embeddings file" in refused.stderr
    np.testing.assert_array_equal(np.load(foreign), np.arange(3))

    out = tmp_path / "vectors.parquet"
    for _ in range(2):  # an earlier output of embed itself is replaced
        again = run_cli("embed", "minilm-l6", str(data), "--column", "text", "--out", str(out), "--no-progress")
        assert again.returncode == 0, again.stderr
    assert pq.read_table(out).num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet", "mine.npy", "vectors.parquet"]


def test_an_npy_of_embed_with_no_failures_is_replaced_and_a_lookalike_is_refused(minilm, tmp_path):
    src, out = tmp_path / "t.txt", tmp_path / "v.npy"
    src.write_text("one\ntwo\n")
    for _ in range(2):  # no failures, so no errors file: the journal of written files recognises it
        done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")
        assert done.returncode == 0, done.stderr
    assert np.load(out).shape == (2, 384) and not (tmp_path / "v.npy.errors.jsonl").exists()
    lookalike = tmp_path / "mine.npy"  # the same shape and dtype, but the user's own
    np.save(lookalike, np.ones((2, 384), np.float32))
    refused = run_cli("embed", "minilm-l6", str(src), "--out", str(lookalike), "--no-progress")
    assert refused.returncode == 1 and "not an embeddings file" in refused.stderr
    np.testing.assert_array_equal(np.load(lookalike), np.ones((2, 384), np.float32))


def test_python_writers_check_their_target_before_any_work(corpus, tmp_path):
    from sklearn.linear_model import LogisticRegression

    _, table, features = corpus
    docs = _documents(tmp_path)
    with pytest.raises(OutputExistsError):
        embedkit.save_index(str(features), "minilm-l6", docs)
    with pytest.raises(OutputIsInputError):
        embedkit.save_index(str(features), "minilm-l6", features)
    with pytest.raises(OutputFolderMissingError) as missing:
        embedkit.save_index(str(features), "minilm-l6", tmp_path / "no" / "idx")
    assert isinstance(missing.value, FileNotFoundError) and "does not exist" in str(missing.value)
    with pytest.raises(OutputExistsError):
        embedkit.train_head(features, "minilm-l6", str(table), out=docs)
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(OutputIsInputError):
        embedkit.extract(str(tmp_path / "t.txt"), "minilm-l6", str(tmp_path))  # the store would hold its source
    (tmp_path / "t.txt").unlink()
    with pytest.raises(OutputExistsError):
        embedkit.extract(str(table), "minilm-l6", str(docs))
    pipe = (embedkit.Embedder("minilm-l6").fit(), LogisticRegression().fit(np.eye(4, 384), [0, 1, 0, 1]))
    with pytest.raises(OutputExistsError) as exists:
        embedkit.save(pipe, docs)
    assert isinstance(exists.value, FileExistsError)
    assert sorted(p.name for p in docs.iterdir()) == ["thesis.txt"]
    with pytest.raises(OutputExistsError):
        embedkit.save(pipe, docs / "thesis.txt")
    assert (docs / "thesis.txt").read_text() == "three years of work"
    (docs / "thesis.txt").unlink()
    assert embedkit.save(pipe, docs) == docs  # an empty folder holds nothing to lose
    assert embedkit.save(pipe, docs) == docs  # an earlier saved model is replaced
    (docs / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):  # replacing it would delete notes.txt
        embedkit.save(pipe, docs)


def test_earlier_outputs_of_the_same_kind_are_replaced(corpus, tmp_path):
    _, table, features = corpus
    idx, run = tmp_path / "idx", tmp_path / "run"
    assert run_cli("index", str(features), "--out", str(idx)).returncode == 0
    done = run_cli("index", str(features), "--out", str(idx), "--metric", "euclidean")
    assert done.returncode == 0, done.stderr
    assert json.loads((idx / "index.json").read_text())["metric"] == "euclidean"
    embedkit.train_head(features, "minilm-l6", str(table), out=run)
    report, model = embedkit.train_head(features, "minilm-l6", str(table), head="ridge", out=run)
    assert json.loads((run / "report.json").read_text())["head"] == "ridge" and model == run / "model"
    assert sorted(p.name for p in run.iterdir()) == ["confusion.png", "model", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "run"]  # nothing set aside is left


CRASH = r"""
import os, sys
import embedkit
from embedkit.fs import atomic

step, mode = int(sys.argv[1]), sys.argv[2]
count = 0

def counted(fn, name):
    def wrapped(*args, **kwargs):
        global count
        count += 1
        if count == step:
            if mode == "partial" and name == "remove":  # die half way through deleting the old version
                files = sorted(p for p in args[0].rglob("*") if p.is_file())
                files[0].unlink()
            os._exit(137)
        return fn(*args, **kwargs)
    return wrapped

atomic.fsync_files = counted(atomic.fsync_files, "fsync_files")
atomic.fsync_dir = counted(atomic.fsync_dir, "fsync_dir")
atomic._remove = counted(atomic._remove, "remove")
atomic.os.rename = counted(os.rename, "rename")
embedkit.save_index(sys.argv[3], "minilm-l6", sys.argv[4], metric="euclidean")
print("finished", count)
"""


def test_a_crash_at_every_step_of_replacing_an_index_leaves_one_whole_version(corpus, tmp_path):
    _, _, features = corpus
    idx = tmp_path / "idx"
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    seen = {}
    for step, mode in [(6, "partial")] + [(s, "before") for s in range(1, 12)]:
        embedkit.save_index(str(features), "minilm-l6", idx, metric="cosine")  # the earlier version
        proc = subprocess.run([sys.executable, str(script), str(step), mode, str(features), str(idx)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            assert "finished" in proc.stdout
            break
        assert proc.returncode == 137, proc.stderr
        # What a reader sees right after the crash: one whole version, old or new.
        hits = embedkit.search(idx, ["my card has not arrived"], k=3)
        assert len(hits[0]) == 3 and all("id" in h for h in hits[0])
        metric = json.loads((idx / "index.json").read_text())["metric"]
        seen[step, mode] = metric
        assert metric in ("cosine", "euclidean")
        # The next writer finishes the job and cleans up what the dead one left.
        embedkit.save_index(str(features), "minilm-l6", idx, metric="euclidean")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["crash.py", "idx"]
        assert json.loads((idx / "index.json").read_text())["metric"] == "euclidean"
    else:
        pytest.fail("the writer never finished: more file operations than steps tried")
    # crashes before the new version's rename leave the old one, after it the new one
    order = [seen[s, "before"] for s in range(1, step)]
    assert order == sorted(order) and order[0] == "cosine" and order[-1] == "euclidean", order
    assert len(order) >= 5 and seen[6, "partial"] == "euclidean"


def test_a_model_left_aside_by_a_crash_between_the_two_renames_is_put_back_by_load(corpus, tmp_path):
    """The exact state after a crash between 'old version aside' and 'new version in'."""
    import os

    from sklearn.linear_model import LogisticRegression

    _, _, features = corpus
    ids, X = embedkit.FeatureStore(features).load("minilm-l6")
    y = np.arange(len(ids)) % 2
    pipe = (embedkit.Embedder("minilm-l6").fit(), LogisticRegression().fit(np.asarray(X), y))
    model = embedkit.save(pipe, tmp_path / "model")
    expected = embedkit.load(model).predict(["my card is lost", "top up failed"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".model.{int(dead.stdout)}-0badc0de.old"
    os.rename(model, aside)
    (tmp_path / f".model.{int(dead.stdout)}-0badc0de.tmp").mkdir()  # the new version, half written
    np.testing.assert_array_equal(embedkit.load(model).predict(["my card is lost", "top up failed"]), expected)
    assert (model / "model.json").is_file() and not aside.exists()
    embedkit.save(pipe, model)  # the next save sweeps the dead writer's staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_check_output_rules_without_a_model(tmp_path):
    from embedkit.fs.outputs import check_output

    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(OutputIsInputError, match="lies inside"):  # a glob's folder is an input too
        check_output(photos / "fs", "feature-store", inputs=[str(photos / "*.jpg")])
    with pytest.raises(OutputIsInputError, match="holds"):
        check_output(tmp_path, "feature-store", inputs=[str(photos / "a.jpg")])
    assert check_output(tmp_path / "fs", "feature-store", inputs=[str(photos / "**" / "*.jpg"), iter([])]) == tmp_path / "fs"
    # a feature store reached through a symlink is added to in place: allowed
    store = tmp_path / "big-disk-store"
    (store / "minilm-l6" / "abc").mkdir(parents=True)
    (store / "minilm-l6" / "abc" / "namespace.json").write_text("{}")
    (tmp_path / "features").symlink_to(store)
    assert check_output(tmp_path / "features", "feature-store") == tmp_path / "features"
    # embed's .npy is recognised by the error records beside it, a stray file of that name is not overwritten
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.zeros((2, 3), np.float32))
    with pytest.raises(OutputExistsError):
        check_output(vectors, "embeddings")
    (tmp_path / "v.npy.errors.jsonl").write_text("")
    assert check_output(vectors, "embeddings") == vectors
    (tmp_path / "w.npy.errors.jsonl").write_text("my own notes\n")
    with pytest.raises(OutputExistsError, match="error records"):
        check_output(tmp_path / "w.npy", "embeddings")
    # outputs written before markers had a kind field are still recognised as embedkit's own
    old_index = tmp_path / "idx"
    old_index.mkdir()
    (old_index / "index.json").write_text(json.dumps({"format": 1, "files": {"ids.npy": "x"}, "metric": "cosine",
                                                      "kind": "flat"}))
    (old_index / "ids.npy").write_bytes(b"")
    assert check_output(old_index, "index") == old_index
    with pytest.raises(OutputExistsError):  # ... but only as what they are
        check_output(old_index, "model")
    with pytest.raises(OutputFolderMissingError):
        check_output(tmp_path / "a" / "b", "report")


def test_files_of_yours_inside_an_earlier_train_head_model_folder_are_never_deleted(tmp_path):
    """train-head replaces its whole output folder, run/model included: a file of yours in
    run/model must refuse the replacement as one in run/ does (it was silently deleted)."""
    from embedkit.fs.outputs import check_output, is_output

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"kind": "train-head"}))
    (run / "confusion.png").write_bytes(b"")
    (run / "model" / "model.json").write_text(json.dumps({"kind": "model", "head": {"files": {"head.skops": "x"}}}))
    (run / "model" / "head.skops").write_bytes(b"")
    assert check_output(run, "train-head") == run
    (run / "model" / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="model/my-notes.txt"):
        check_output(run, "train-head")
    assert not is_output(run, "train-head")
    (run / "model" / "my-notes.txt").unlink()
    (run / "model" / "model.json").unlink()  # a model folder that is not embedkit's at all
    with pytest.raises(OutputExistsError):
        check_output(run, "train-head")


def test_an_unwritable_output_folder_is_refused_up_front_and_a_failed_write_is_one_error_line(tmp_path, monkeypatch,
                                                                                              capsys):
    """`embed ... --out /read-only/x.npy` computed everything, then died with two chained
    tracebacks (the write's EROFS, then the temp file's cleanup's)."""
    import errno
    import os as os_module

    from embedkit import cli
    from embedkit.errors import OutputError
    from embedkit.fs import atomic
    from embedkit.fs.outputs import check_output

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os_module.access
    monkeypatch.setattr("embedkit.fs.outputs.os.access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    for kind in ("embeddings", "index", "model", "train-head", "report"):
        with pytest.raises(OutputError, match="not writable"):
            check_output(locked / "out.npy", kind)
    monkeypatch.undo()

    def refuse(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(ValueError, match="the real failure"):  # the cleanup's own failure does not mask it
        with atomic.staged_file(tmp_path / "x.npy"):
            raise ValueError("the real failure")
    monkeypatch.undo()

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "out.npy")

    monkeypatch.setitem(cli.COMMANDS, "backbones", full_disk)
    assert cli.main(["backbones"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err and "Traceback" not in err
