"""Fine-tuning hardened (issue 23): labels, names and stores checked before training, a named run
finished by --resume in any state a kill leaves, collapsed and chance-level results, training
images that disappear, clipping off from the CLI, --out with missing folders, fine-tunes removed
(and what depends on them kept), scratch stores of killed reports swept."""
from __future__ import annotations

import decimal
import enum
import fractions
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from finetune_support import errors as _errors
from finetune_support import table as _table

SUPPORT = str(Path(__file__).with_name("finetune_support.py"))
FAST = dict(epochs=2, batch_size=4, lr=1e-2, head_lr=1e-2)


@pytest.fixture(scope="module")
def tiny():
    from finetune_support import LABELS, TEXTS, register

    register()
    return TEXTS, LABELS


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUPPORT, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})




# -- item 6: every bad label is a typed error ---------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda ls: [[v] for v in ls], r"16 of 16 labels are not single values \(e.g. a list \['pos'\] at index 0\)"),
    (lambda ls: [(v, 1) for v in ls], r"labels are not single values \(e.g. a tuple"),
    (lambda ls: np.asarray(ls, dtype=object).reshape(-1, 1), r"one-dimensional.*got shape \(16, 1\); flatten them"),
    (lambda ls: [None if i == 3 else v for i, v in enumerate(ls)], r"1 of 16 labels are missing .* at index 3"),
    # issue 23's second attack: these were a raw TypeError, or accepted in an arbitrary order / as dict keys
    (lambda ls: [enum.Enum("Sentiment", ["pos", "neg"])[v] for v in ls], r"got a Sentiment .*map them to strings"),
    (lambda ls: [complex(len(v), 1) for v in ls], r"strings, integers or whole-number floats; got a complex"),
    (lambda ls: [decimal.Decimal(len(v)) for v in ls], r"got a Decimal"),
    (lambda ls: [fractions.Fraction(1, len(v)) for v in ls], r"got a Fraction"),
    (lambda ls: {f"k{i}": v for i, v in enumerate(ls)}, r"ordered sequence .* got a dict"),
    (lambda ls: set(range(len(ls))), r"ordered sequence .* got a set"),
])
def test_labels_that_are_not_one_value_per_item_are_dataset_errors(tiny, make, message, tmp_path):
    """Lists, tuples and (N, 1) arrays were a raw TypeError (unhashable)."""
    import embedkit
    from embedkit.errors import DatasetError

    texts, labels = tiny
    with pytest.raises(DatasetError, match=message):
        embedkit.finetune("ft-tiny-text", texts, make(labels), unfreeze="head", epochs=1, store=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_the_classifier_takes_a_column_of_labels_as_scikit_learn_does_and_refuses_pairs(tiny, tmp_path):
    """FinetunedClassifier.fit follows scikit-learn: a (N, 1) column is one label per item; pairs are refused."""
    import embedkit
    from embedkit.errors import DatasetError

    texts, labels = tiny
    with pytest.raises(DatasetError, match=r"y must be one label per item \(1-D\), got shape \(16, 2\)"):
        embedkit.FinetunedClassifier("ft-tiny-text", unfreeze="head", epochs=1,
                                     store=str(tmp_path / "s")).fit(texts, [(v, 1) for v in labels])
    assert not (tmp_path / "s").exists()


def test_a_pandas_na_label_is_called_missing_not_mixed_types(tiny, tmp_path):
    pd = pytest.importorskip("pandas")
    import embedkit
    from embedkit.errors import DatasetError

    texts, labels = tiny
    series = pd.Series(labels, dtype="string")
    series[5] = pd.NA
    with pytest.raises(DatasetError, match=r"1 of 16 labels are missing \(None, NaN or empty\), e.g. at index 5"):
        embedkit.finetune("ft-tiny-text", texts, series, unfreeze="head", epochs=1, store=tmp_path / "s")
    frame = pd.DataFrame({"label": labels})
    with pytest.raises(DatasetError, match=r"got shape \(16, 1\)"):
        embedkit.finetune("ft-tiny-text", texts, frame, unfreeze="head", epochs=1, store=tmp_path / "s")


# -- item 4: what is knowable before training is checked before training -----------------------

def test_a_name_of_a_registered_backbone_is_refused_before_training(tiny, tmp_path):
    """Was refused only after the whole training."""
    import embedkit
    from embedkit.errors import OutputExistsError

    texts, labels = tiny
    steps = []
    with pytest.raises(OutputExistsError, match="'ft-tiny-image' is a registered backbone; give the fine-tune another"):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", name="ft-tiny-image", store=tmp_path / "s",
                          checkpoint_dir=tmp_path / "ckpt", progress=lambda *a: steps.append(a), **FAST)
    assert steps == [] and not (tmp_path / "ckpt").exists()


def test_a_read_only_model_store_is_refused_before_training_naming_the_store(tiny, tmp_path):
    """Was found only after training, naming a temporary staging file instead of the store."""
    from store_support import confined

    import embedkit

    texts, labels = tiny
    store = tmp_path / "store"
    embedkit.export("ft-tiny-text", store)  # the parent is there: only the new backbone needs a write
    table = _table(tmp_path / "train.csv", texts, labels)
    out = tmp_path / "run"
    done = confined([sys.executable, SUPPORT, "finetune", "ft-tiny-text", str(table), "--labels", str(table),
                     "--unfreeze", "last:1", "--epochs", "2", "--out", str(out), "--store", str(store),
                     "--no-progress"], f"mount --bind -o ro {store} {store}")
    assert done.returncode == 1, done.stderr
    assert _errors(done.stderr) == [f"error: cannot keep the fine-tuned backbone in the model store {store}: it "
                                    "is not writable (read-only file system or no permission); give --store a "
                                    "writable folder"], done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "checkpoints" / "last.safetensors").exists()  # no training happened


# -- item 2: `finetune --name NAME --resume` finishes the run in every state a kill leaves ---------

def test_a_named_run_is_finished_by_resume_in_every_state_a_kill_leaves(tiny, tmp_path):
    """After a kill during the export (the weights already in the model store), the same command
    with --resume was refused: "already in the model store; choose another name"."""
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store, out = tmp_path / "store", tmp_path / "run"
    command = ["finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "last:1", "--epochs", "2",
               "--batch-size", "4", "--lr", "0.01", "--validation", "0.25", "--name", "my-tune", "--out", str(out),
               "--store", str(store), "--no-progress", "--json"]
    first = _cli(*command)
    assert first.returncode == 0, first.stderr
    done = json.loads(first.stdout)
    assert done["backbone"] == "my-tune"
    # the state of a kill during the export: weights and record in the store, no export, no model
    for sub in (store / "my-tune").iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)
    shutil.rmtree(out / "model")
    again = _cli(*command, "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["digest"] == done["digest"]
    assert (out / "model" / "model.json").is_file()
    # the state of a kill after the model was saved (or a finished run): --resume confirms it
    confirm = _cli(*command, "--resume")
    assert confirm.returncode == 0, confirm.stderr
    assert json.loads(confirm.stdout)["digest"] == done["digest"]
    assert json.loads((out / "finetune.json").read_text())["status"] == "done"
    # without --resume the name is refused, and the message says how to finish that run instead
    refused = _cli(*command)
    assert refused.returncode == 1
    assert _errors(refused.stderr) == [
        f"error: a fine-tuned backbone 'my-tune' is already in the model store {store}; choose another --name (or, "
        "to finish or confirm the run of this --out that made it, run again with --resume)"], refused.stderr
    # another run's --out (other settings) cannot take the name with --resume
    other = _cli(*[a if a != str(out) else str(tmp_path / "other") for a in command], "--seed", "1", "--resume")
    assert other.returncode == 1
    assert "already in the model store" in other.stderr and "Traceback" not in other.stderr
    assert tuned.find("my-tune", store).lineage["hyperparameters"]["seed"] == 0


# -- item 5: divergence is more than NaN --------------------------------------------------------

def test_a_collapsed_backbone_is_a_typed_error_and_is_not_saved(tiny, tmp_path):
    """lr=1e4 saved a backbone that embeds every text to one vector, with exit 0."""
    import embedkit
    from embedkit.errors import TrainingCollapsedError, TrainingDivergedError
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    with pytest.raises(TrainingCollapsedError, match=r"training diverged: .* collapsed to \(nearly\) one vector "
                                                     r"\(mean pairwise cosine 1\.0000000; the parent's 0\.9") as caught:
        embedkit.finetune("ft-tiny-relu", texts, labels, unfreeze="last:2", epochs=2, batch_size=4, lr=1e4,
                          validation=0.25, store=store)
    assert isinstance(caught.value, TrainingDivergedError)  # one except clause catches both
    assert caught.value.cosine >= 1 - 1e-4 > caught.value.parent_cosine
    assert tuned.listing(store) == []
    # the same backbone at a sane rate is kept
    assert embedkit.finetune("ft-tiny-relu", texts, labels, unfreeze="last:2", epochs=1, batch_size=4, lr=1e-3,
                             validation=None, store=store).backbone


def test_chance_level_validation_is_a_loud_warning_recorded_in_the_lineage(tiny, tmp_path, caplog):
    import embedkit
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    # validation of one class: always answering it is right every time, so no accuracy beats chance
    result = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", store=store,
                               validation=(texts[:4], labels[:4]), **FAST)
    assert set(labels[:4]) == {"pos"}
    [warning] = result.warnings
    assert warning.startswith("validation accuracy ") and "is at chance level (the most common class is 1.0000 of " \
        "the 4 validation items)" in warning
    assert tuned.find(result.backbone, store).lineage["warnings"] == [warning]
    assert any(r.levelname == "WARNING" and "chance level" in r.getMessage() for r in caplog.records)
    good = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", store=store, validation=None, **FAST)
    assert good.warnings == [] and tuned.find(good.backbone, store).lineage["warnings"] == []


# -- item 6: a training image that disappears during the run --------------------------------------

def _images(folder: Path) -> tuple[list[str], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for k in range(8):
        pixels = np.clip(rng.normal(180 if k % 2 else 60, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{k}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
        labels.append("bright" if k % 2 else "dark")
    return paths, labels


@pytest.mark.parametrize("change", ["removed", "unreadable"])
def test_a_training_image_that_disappears_during_the_run_is_a_typed_error_naming_it(tiny, tmp_path, change):
    """The augmentation re-reads files each epoch: a file gone mid-run killed `finetune` with a traceback."""
    import embedkit
    from embedkit.errors import DatasetError, TrainingItemLostError

    paths, labels = _images(tmp_path)
    victim = Path(paths[3])

    def progress(done, total, info):  # after the first step: every image is read again in epoch 2
        if done == 1 and victim.exists():
            if change == "removed":
                victim.unlink()
            else:
                victim.write_bytes(b"\x89PNG\r\n\x1a\n cut short")

    with pytest.raises(TrainingItemLostError, match=rf"training image {victim} \(item 3\) could not be read again "
                                                    "during the run .* restore it and run again with resume") as caught:
        embedkit.finetune("ft-tiny-image", paths, labels, unfreeze="last:1", epochs=2, batch_size=4, validation=None,
                          checkpoint_dir=tmp_path / "ckpt", store=tmp_path / "store", progress=progress)
    assert isinstance(caught.value, DatasetError)


# -- item 8: the CLI reads as users type ------------------------------------------------------

def test_cli_max_grad_norm_0_turns_clipping_off_and_out_parents_are_made(tiny, tmp_path):
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store = tmp_path / "store"
    out = tmp_path / "runs" / "deep" / "ants"  # neither runs/ nor runs/deep/ exists, as in the README
    done = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "last:1", "--epochs", "1",
                "--max-grad-norm", "0", "--validation", "0", "--out", str(out), "--store", str(store), "--no-progress",
                "--json")
    assert done.returncode == 0, done.stderr
    name = json.loads(done.stdout)["backbone"]
    assert tuned.find(name, store).lineage["hyperparameters"]["max_grad_norm"] is None  # off, not 1.0
    assert (out / "model" / "model.json").is_file()
    bad = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--max-grad-norm", "-1",
               "--out", str(out), "--store", str(store))
    assert bad.returncode == 1 and "--max-grad-norm" in bad.stderr
    # a run refused once the backbone is built leaves none of the folders it made
    fresh = tmp_path / "new" / "runs" / "x"
    refused = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "last:9",
                   "--out", str(fresh), "--store", str(store), "--no-progress")
    assert refused.returncode == 1 and len(_errors(refused.stderr)) == 1, refused.stderr
    assert not (tmp_path / "new").exists()
    # a file where a folder should be: one error line naming it
    (tmp_path / "afile").write_text("mine")
    blocked = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--out",
                   str(tmp_path / "afile" / "run"), "--store", str(store))
    assert blocked.returncode == 1 and _errors(blocked.stderr) == [
        f"error: cannot write the finetune output folder {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, "
        "not a folder; choose another path"], blocked.stderr
    assert (tmp_path / "afile").read_text() == "mine"


# -- item 9: fine-tunes can be listed and removed ----------------------------------------------

def test_a_fine_tune_is_removed_only_when_nothing_depends_on_it(tiny, tmp_path, monkeypatch):
    import embedkit
    from embedkit.errors import BackboneInUseError
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    monkeypatch.setenv("EMBEDKIT_HOME", str(store))  # a fine-tune of a fine-tune finds its parent by name there
    parent = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", store=store, validation=None,
                               out=tmp_path / "model", **FAST)
    child = embedkit.finetune(parent.backbone, texts, labels, unfreeze="last:1", store=store,
                              validation=None, seed=1, **FAST)
    listed = _cli("backbones", "--store", str(store))
    assert parent.backbone in listed.stdout and child.backbone in listed.stdout
    with pytest.raises(BackboneInUseError) as caught:
        tuned.remove(parent.backbone, store)
    assert caught.value.dependents == [f"fine-tune {child.backbone!r} (fine-tuned from it)",
                                       f"saved model {tmp_path / 'model'}"]
    refused = _cli("backbones", "--remove", parent.backbone, "--store", str(store))
    assert refused.returncode == 1 and len(_errors(refused.stderr)) == 1
    assert f"saved model {tmp_path / 'model'}" in refused.stderr and "Traceback" not in refused.stderr
    assert tuned.find(parent.backbone, store) is not None  # nothing removed
    removed = _cli("backbones", "--remove", child.backbone, "--store", str(store), "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["exports"] == [child.digest]
    assert tuned.find(child.backbone, store) is None and not (store / child.backbone).exists()
    shutil.rmtree(tmp_path / "model")  # the saved model gone, nothing depends on it any more
    gone = tuned.remove(parent.backbone, store)
    assert gone.digests == [parent.digest] and not (store / parent.backbone).exists()
    assert embedkit.export("ft-tiny-text", store).digest == parent.parent_digest  # the parent itself is kept
    unknown = _cli("backbones", "--remove", "ft-tiny-text", "--store", str(store))
    assert unknown.returncode == 1 and _errors(unknown.stderr) == [
        f"error: no fine-tuned backbone 'ft-tiny-text' in the model store {store} (a registered backbone: embedkit "
        "removes only the fine-tunes it made); fine-tunes there: none"], unknown.stderr


def test_a_killed_reports_scratch_store_is_swept_by_the_next_one(tiny, tmp_path):
    """A `report --finetune` killed with kill -9 left its scratch model store in the temp folder for ever."""
    from embedkit.finetuning.curves import SCRATCH, FinetunedCurve

    texts, labels = tiny
    dead, live, foreign = (tmp_path / f"embedkit-report-{k}" for k in ("dead", "live", "foreign"))
    for folder in (dead, live, foreign):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x" * 1000)
    script = ("import sys, time\nfrom embedkit.finetuning.curves import mark_scratch\n"
              "mark_scratch(sys.argv[1]); print('marked', flush=True); time.sleep(600)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(f)], stdout=subprocess.PIPE, text=True)
             for f in (dead, live)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "marked"
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        mine = tmp_path / "embedkit-report-mine"
        mine.mkdir()
        FinetunedCurve("ft-tiny-text", texts, np.asarray(labels, dtype=object), str(mine), "classify", "head")
        assert not dead.exists()  # its process is gone
        assert (live / "weights.bin").exists() and (live / SCRATCH).exists()  # its process still runs
        assert (foreign / "weights.bin").exists()  # no marker: not a curve's, never touched
        assert (mine / SCRATCH).exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
