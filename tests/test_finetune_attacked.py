"""Fine-tuning attacked again (issue 23): names that read as digests or variants, removal that keeps
the user's files and its own variants apart from the parent's, refusals that leave --out as it was,
validation data in a checkpoint's identity, checkpoint folders embedkit cannot account for, and
collision messages that give the real reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_support import errors as _errors
from finetune_support import table as _table

SUPPORT = str(Path(__file__).with_name("finetune_support.py"))
FAST = dict(epochs=1, batch_size=4, lr=1e-2, head_lr=1e-2)


@pytest.fixture(scope="module")
def tiny():
    from finetune_support import LABELS, TEXTS, register

    register()
    return TEXTS, LABELS


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUPPORT, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "EMBEDKIT_TUNE": "0"})




def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


# -- names: a digest's start or a variant's name is refused before training -----------------------

def test_a_name_that_reads_as_a_digest_or_a_variant_is_refused_before_training(tiny, tmp_path):
    """A hex --name made the saved model use the parent; `<backbone>-fp16` took over the variant's folder."""
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    store = tmp_path / "s"
    digest = embedkit.export("ft-tiny-text", store).digest
    for name, message in ((digest[:8], "could be read as an artifact digest"),
                          ("ft-tiny-text-fp16", "is how embedkit names an artifact's variants"),
                          ("mine-int8-dynamic", "is how embedkit names an artifact's variants")):
        steps = []
        with pytest.raises(UsageError, match=message):
            embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", name=name, store=store,
                              progress=lambda *a: steps.append(a), **FAST)
        assert steps == [] and not (store / name).exists()
    assert embedkit.resolve(digest[:8], store).digest == digest  # still the parent's digest


# -- removal: only what embedkit made, its own variants, an unreadable dependents record refused ------

def test_removal_keeps_user_files_own_variants_only_and_refuses_unreadable_dependents(tiny, tmp_path):
    import embedkit
    from embedkit.errors import BackboneInUseError
    from embedkit.models import finetuned as tuned
    from embedkit.models.precision import half
    from embedkit.models.store import ModelStore

    texts, labels = tiny
    store = tmp_path / "store"
    done = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", name="head-only", store=store,
                             validation=None, out=tmp_path / "model", **FAST)
    parent_fp16 = half(done.parent_digest, store)
    mine_fp16 = half(embedkit.resolve("head-only", store), store)
    assert mine_fp16.name == "head-only-fp16"
    listed = json.loads(_cli("backbones", "--store", str(store), "--json").stdout)
    rows = {r["name"]: r for r in listed if "variants" in r}
    assert [v["name"] for v in rows["ft-tiny-text"]["variants"]] == ["ft-tiny-text-fp16"]
    assert [v["name"] for v in rows["head-only"]["variants"]] == ["head-only-fp16"]
    # an unreadable record of saved models: refused, naming it, nothing removed
    (store / "head-only" / "saved-models.json").write_text("[not json")
    with pytest.raises(BackboneInUseError, match=r"saved-models\.json cannot be read"):
        tuned.remove("head-only", store)
    assert tuned.find("head-only", store) is not None
    (store / "head-only" / "saved-models.json").write_text("[]")
    (store / "head-only" / "mine").mkdir()
    (store / "head-only" / "mine" / "n.txt").write_text("my notes")
    removed = _cli("backbones", "--remove", "head-only", "--store", str(store), "--json")
    assert removed.returncode == 0, removed.stderr
    summary = json.loads(removed.stdout)
    assert summary["kept"] == [str(store / "head-only" / "mine")]
    assert summary["variants"] == [mine_fp16.digest]
    assert "kept 1 file(s)" in removed.stderr
    assert (store / "head-only" / "mine" / "n.txt").read_text() == "my notes"
    assert sorted(p.name for p in (store / "head-only").iterdir()) == ["mine"]
    assert tuned.find("head-only", store) is None
    names = {a["name"] for a in ModelStore(store).inventory()}
    assert names == {"ft-tiny-text", "ft-tiny-text-fp16"}  # the parent's own fp16 is kept
    assert (Path(parent_fp16.path) / "model.onnx").is_file()


# -- refusals leave --out as it was -----------------------------------------------------------

def test_a_refused_run_leaves_its_out_folder_as_it_was(tiny, tmp_path):
    """A second run into a finished named run's --out overwrote its finetune.json with "running"."""
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store, out = tmp_path / "store", tmp_path / "f1"
    command = ["finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "head", "--epochs", "1",
               "--batch-size", "4", "--name", "f1", "--store", str(store), "--no-progress"]
    first = _cli(*command, "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = _tree(out)
    assert json.loads(before["finetune.json"])["status"] == "done"
    again = _cli(*command, "--out", str(out))
    assert again.returncode == 1 and len(_errors(again.stderr)) == 1, again.stderr
    resumed = _cli(*command, "--out", str(out), "--resume", "--lr", "0.5")  # other settings: refused
    assert resumed.returncode == 1 and len(_errors(resumed.stderr)) == 1, resumed.stderr
    assert _tree(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    into_empty = _cli(*command, "--out", str(empty))  # the name is taken
    assert into_empty.returncode == 1
    assert list(empty.iterdir()) == []


def test_collision_messages_give_the_real_reason_and_an_action_that_works(tiny, tmp_path):
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store, out = tmp_path / "store", tmp_path / "run"
    command = ["finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "head", "--epochs", "1",
               "--batch-size", "4", "--name", "named", "--store", str(store), "--no-progress"]
    assert _cli(*command, "--out", str(out)).returncode == 0
    seed = _cli(*command, "--out", str(out), "--resume", "--seed", "5")
    assert _errors(seed.stderr) == [
        f"error: a fine-tuned backbone 'named' is already in the model store {store}, made by the run of this --out "
        "with other settings (seed differ): to finish or confirm that run, --resume with its settings; to train with "
        "these ones, choose another --name"], seed.stderr
    fresh = _cli(*command, "--out", str(tmp_path / "fresh"), "--resume")
    assert _errors(fresh.stderr) == [
        f"error: a fine-tuned backbone 'named' is already in the model store {store}, and this --out holds no "
        "checkpoints of the run that made it (--resume finishes a run only from its own --out: give that run's "
        "--out); choose another --name"], fresh.stderr
    assert not (tmp_path / "fresh").exists()


# -- checkpoints: validation data in the identity, folders embedkit cannot account for ---------------

def test_resume_with_other_validation_data_is_refused(tiny, tmp_path):
    import embedkit
    from embedkit.errors import CheckpointError

    texts, labels = tiny
    ckpt = tmp_path / "ckpt"
    v1 = (["fine movie", "bad plot"], ["pos", "neg"])
    v2 = (["superb movie", "awful plot"], ["pos", "neg"])
    embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", validation=v1, checkpoint_dir=ckpt,
                      store=tmp_path / "s", **FAST)
    assert (ckpt / "last.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"validation differ"):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", validation=v2, checkpoint_dir=ckpt,
                          store=tmp_path / "s", resume=True, **FAST)


def test_checkpoint_folders_embedkit_cannot_account_for_are_checkpoint_errors(tiny, tmp_path):
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store, out = tmp_path / "store", tmp_path / "run"
    command = ["finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "head", "--epochs", "1",
               "--batch-size", "4", "--out", str(out), "--store", str(store), "--no-progress"]
    assert _cli(*command).returncode == 0
    marker = out / "checkpoints" / "checkpoint.json"
    good = marker.read_bytes()
    marker.write_bytes(good[:10] + b"\xff" + good[11:])
    damaged = _cli(*command, "--resume")
    assert damaged.returncode == 1 and len(_errors(damaged.stderr)) == 1
    assert f"error: {marker} is damaged" in damaged.stderr and "embedkit did not write" not in damaged.stderr
    marker.unlink()
    missing = _cli(*command, "--resume")
    assert f"error: {marker} is missing" in missing.stderr, missing.stderr
    marker.write_bytes(good)
    last = out / "checkpoints" / "last.safetensors"
    last.unlink()
    last.mkdir()
    folder = _cli(*command, "--resume")
    assert _errors(folder.stderr)[0].startswith(f"error: {last} is not a regular file"), folder.stderr
    assert "Errno" not in folder.stderr
    last.rmdir()  # checkpoint.json but no last.safetensors (a kill in the first epoch): said, not silent
    restarted = _cli(*command, "--resume")
    assert restarted.returncode == 0, restarted.stderr
    assert f"note: no checkpoint in {out} yet: starting from the beginning" in restarted.stderr


# -- settings: numbers read as numbers --------------------------------------------------------

def test_cli_reads_zero_clipping_and_zero_validation_numerically(tiny, tmp_path):
    """`--max-grad-norm 0.00` / `-0` / `1e-400` and `--validation 0.0` were refused though 0 means none."""
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store = tmp_path / "store"
    done = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "head", "--epochs", "1",
                "--max-grad-norm", "-0", "--validation", "0.0", "--out", str(tmp_path / "run"), "--store", str(store),
                "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    hyper = tuned.find(json.loads(done.stdout)["backbone"], store).lineage["hyperparameters"]
    assert hyper["max_grad_norm"] is None and not hyper["validation"]
    for value in ("0.00", "1e-400"):
        bad = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--max-grad-norm", value,
                   "--batch-size", "0", "--out", str(tmp_path / "x"), "--store", str(store))
        assert _errors(bad.stderr) == ["error: embedkit finetune: argument --batch-size: expected a positive integer "
                                       "(>= 1), got 0"], bad.stderr  # 0 taken as off, the next refusal is shown
    wrong = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--max-grad-norm", "-1",
                 "--out", str(tmp_path / "x"), "--store", str(store))
    assert "0 / none for no clipping" in wrong.stderr


def test_numpy_numbers_are_accepted_and_inf_or_bool_settings_refused(tiny, tmp_path):
    import numpy as np

    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    for bad, message in ((dict(weight_decay=float("inf")), "weight_decay must be a finite number"),
                         (dict(layer_decay=True), "layer_decay must be None or a number"),
                         (dict(lr=float("nan")), "lr must be a positive number")):
        with pytest.raises(UsageError, match=message):
            embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", store=tmp_path / "s",
                              **{**FAST, **bad})
    done = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", store=tmp_path / "s", validation=None,
                             epochs=np.int64(1), batch_size=np.int32(4), lr=np.float32(1e-2), seed=np.uint8(3))
    assert done.lineage["hyperparameters"]["epochs"] == 1 and done.lineage["hyperparameters"]["seed"] == 3
    assert isinstance(done.lineage["hyperparameters"]["lr"], float)
