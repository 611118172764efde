"""Fine-tuning after issue 23, as a fresh tester found it: default names that identify the run, outputs
blocked by a file, the --resume hint only where it works, removal that says what it checked, and
refusals that are JSON under --json. Real runs, files and subprocesses (tiny backbones)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_support import errors as _errors
from finetune_support import table as _table

SUPPORT = str(Path(__file__).with_name("finetune_support.py"))
HEAD = dict(unfreeze="head", batch_size=4, lr=1e-2, head_lr=1e-2, validation=None)


@pytest.fixture(scope="module")
def tiny():
    from finetune_support import LABELS, TEXTS, register

    register()
    return TEXTS, LABELS


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUPPORT, *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))


# -- 1. a default name identifies the run, not only its weights ---------------------------------

def test_head_only_runs_of_other_seeds_data_or_epochs_each_get_their_own_name_and_record(tiny, tmp_path):
    """`unfreeze="head"` leaves the body as the parent's: the default name was a hash of the weights
    alone, so runs with other seeds, data or epochs shared one name, and each rewrote the record of
    the one before (a saved model's record then described another run's seed, epochs and metrics)."""
    import embedkit
    from embedkit.models import finetuned as tuned
    from embedkit.models.store import sha256_file

    texts, labels = tiny
    store = tmp_path / "store"
    runs = {
        "seed 0": embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=0, store=store, **HEAD),
        "seed 1": embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=1, store=store, **HEAD),
        "2 epochs": embedkit.finetune("ft-tiny-text", texts, labels, epochs=2, seed=0, store=store, **HEAD),
        "other data": embedkit.finetune("ft-tiny-text", texts[:-2], labels[:-2], epochs=1, seed=0, store=store, **HEAD),
        "given validation": embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=0, store=store,
                                              **{**HEAD, "validation": (texts[::4], labels[::4])}),
    }
    names = {what: r.backbone for what, r in runs.items()}
    assert len(set(names.values())) == len(runs), names  # five runs, five names
    assert all(n.startswith("ft-tiny-text+ft-") and len(n) == len("ft-tiny-text+ft-") + 8 for n in names.values())
    found = {what: tuned.find(name, store) for what, name in names.items()}
    assert len({sha256_file(b.weight_files[0]) for b in found.values()}) == 1  # one body: the parent's weights
    assert [b.lineage["hyperparameters"]["seed"] for b in found.values()] == [0, 1, 0, 0, 0]
    assert [b.lineage["hyperparameters"]["epochs"] for b in found.values()] == [1, 1, 2, 1, 1]
    assert [b.lineage["data"]["items"] for b in found.values()] == [16, 16, 16, 14, 16]
    assert "validation_fingerprint" in found["given validation"].lineage["data"]
    for what, result in runs.items():  # each record is its own run's: its metrics, as the run returned them
        assert found[what].lineage["metrics"] == json.loads(json.dumps(result.history)), what
    # an identical rerun is idempotent: the same name, and the record left as the first run wrote it
    record = store / names["seed 0"] / tuned.RECORD
    before = record.read_bytes()
    again = embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=0, store=store, **HEAD)
    assert again.backbone == names["seed 0"] and again.digest == runs["seed 0"].digest
    assert record.read_bytes() == before
    assert len(tuned.listing(store)) == len(runs)


def test_a_name_holding_another_runs_fine_tune_is_refused_even_with_the_same_weights(tiny, tmp_path):
    """The claim compares the run too, not only the weights: a second head-only run may not take over
    the name (and the record) of the first one (here the name is the user's; the first run's record
    stays whole)."""
    from finetune_support import TEXT

    from embedkit.errors import OutputExistsError
    from embedkit.models import finetuned as tuned

    module = TEXT.build()
    store = tmp_path / "store"
    lineage = {"parent": {"digest": "p"}, "data": {"fingerprint": "d"}, "hyperparameters": {"seed": 0}}
    first, created = tuned.persist(store, "mine", TEXT, "ft-tiny-text", module, lineage, user_named=True)
    assert created
    same, created = tuned.persist(store, "mine", TEXT, "ft-tiny-text", module, json.loads(json.dumps(lineage)),
                                  user_named=True)
    assert not created and same.lineage == lineage  # this very run: accepted, nothing rewritten
    with pytest.raises(OutputExistsError, match=r"'mine' made by another run \(other settings or data\) is already "
                                                r"in the model store"):
        tuned.persist(store, "mine", TEXT, "ft-tiny-text", module, {**lineage, "hyperparameters": {"seed": 1}},
                      user_named=True)
    assert tuned.find("mine", store).lineage["hyperparameters"] == {"seed": 0}
    assert sorted(p.name for p in (store / tuned.STAGING).glob("*.safetensors")) == []  # no staged weights left
    assert tuned.default_name("ft-tiny-text", "ab" * 32, lineage) != tuned.default_name(
        "ft-tiny-text", "ab" * 32, {**lineage, "hyperparameters": {"seed": 1}})


def test_cli_head_only_runs_with_two_seeds_keep_two_records(tiny, tmp_path):
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store = tmp_path / "store"
    made = {}
    for seed in ("0", "1"):
        done = _cli("finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "head", "--epochs",
                    "1", "--validation", "0", "--seed", seed, "--out", str(tmp_path / f"run{seed}"), "--store",
                    str(store), "--no-progress", "--json")
        assert done.returncode == 0, done.stderr
        made[seed] = json.loads(done.stdout)["backbone"]
    assert made["0"] != made["1"]
    for seed, name in made.items():
        record = json.loads((store / name / "finetuned.json").read_text())
        assert record["lineage"]["hyperparameters"]["seed"] == int(seed)
        model = json.loads((tmp_path / f"run{seed}" / "model" / "model.json").read_text())
        assert model["backbone"]["name"] == name  # each saved model names the record of its own run


# -- 3. a file where a folder should be is named as a file -------------------------------------------

@pytest.mark.parametrize("below", ["x", "sub/x"])
def test_an_out_below_a_regular_file_says_the_file_is_not_a_folder(tiny, tmp_path, below):
    """`finetune --out afile/x` said "its folder does not exist (create it first)"."""
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    (tmp_path / "t.txt").write_text("a text\n")
    commands = {
        "finetune": ("finetune output folder", ["finetune", "ft-tiny-text", str(table), "--labels", str(table),
                                                "--out", f"{afile}/{below}", "--store", str(tmp_path / "store")]),
        "extract": ("feature store", ["extract", str(tmp_path / "t.txt"), "--out", f"{afile}/{below}"]),
        "embed": ("embeddings file", ["embed", "ft-tiny-text", str(tmp_path / "t.txt"), "--out", f"{afile}/{below}.npy"]),
    }
    for command, (what, argv) in commands.items():
        done = _cli(*argv)
        target = argv[argv.index("--out") + 1]
        assert done.returncode == 1, (command, done.stderr)
        assert _errors(done.stderr) == [f"error: cannot write the {what} {target}: {afile} is a file, not a folder; "
                                        "choose another path"], (command, done.stderr)
        assert "Traceback" not in done.stderr
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "t.txt",
                                                                                         "train.csv"]


def test_a_model_store_below_a_regular_file_is_refused_naming_the_file(tmp_path):
    """`--models afile/store` was an OSError naming a temporary folder inside it."""
    (tmp_path / "afile").write_text("mine")
    for store in (tmp_path / "afile" / "store", tmp_path / "afile"):
        done = _cli("export", "ft-tiny-text", "--models", str(store))
        assert done.returncode == 1 and _errors(done.stderr) == [
            f"error: embedkit export: argument --models/--store: {store}: {tmp_path / 'afile'} is a file, not a folder; "
            "give a model store folder"], done.stderr
    assert (tmp_path / "afile").read_text() == "mine"


def test_check_output_names_the_file_in_the_way_for_every_kind(tmp_path, monkeypatch):
    from embedkit.errors import OutputFolderMissingError
    from embedkit.fs.outputs import KINDS, NAMES, check_output

    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("mine")
    for kind in KINDS:
        with pytest.raises(OutputFolderMissingError) as caught:
            check_output("afile/deeper/x", kind)
        assert str(caught.value) == f"cannot write the {NAMES[kind]} afile/deeper/x: afile is a file, not a folder; " \
                                    "choose another path"
    with pytest.raises(OutputFolderMissingError, match=r"its folder .*nowhere does not exist \(create it first\)"):
        check_output("nowhere/x", "model")


# -- 4. --resume is suggested only where it would finish the run ---------------------------------------

def test_a_taken_name_suggests_resume_only_when_this_checkpoint_folder_made_it(tiny, tmp_path):
    """The refusal suggested --resume also for an --out that never made that backbone."""
    import embedkit
    from embedkit.errors import OutputExistsError

    texts, labels = tiny
    store = tmp_path / "store"
    settings = dict(unfreeze="last:1", epochs=1, batch_size=4, validation=None, store=store, name="my-tune")
    embedkit.finetune("ft-tiny-text", texts, labels, checkpoint_dir=tmp_path / "made", **settings)
    taken = f"a fine-tuned backbone 'my-tune' is already in the model store {store}; choose another name"
    cases = {
        "the run that made it": (dict(checkpoint_dir=tmp_path / "made"), taken + (
            " (or, to finish or confirm the run of this checkpoint_dir that made it, run again with resume)")),
        "a new folder": (dict(checkpoint_dir=tmp_path / "new"), taken),
        "that folder, other settings": (dict(checkpoint_dir=tmp_path / "made", seed=1), taken),
        "no checkpoints": ({}, taken),
    }
    for what, (extra, message) in cases.items():
        with pytest.raises(OutputExistsError) as caught:
            embedkit.finetune("ft-tiny-text", texts, labels, **settings, **extra)
        assert str(caught.value) == message, what
    assert not (tmp_path / "new").exists()  # refused before anything was written
    # where it is suggested, it works
    assert embedkit.finetune("ft-tiny-text", texts, labels, checkpoint_dir=tmp_path / "made", resume=True,
                             **settings).backbone == "my-tune"


def test_cli_a_taken_name_from_another_out_asks_for_another_name(tiny, tmp_path):
    texts, labels = tiny
    table = _table(tmp_path / "train.csv", texts, labels)
    store = tmp_path / "store"
    base = ["finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze", "last:1", "--epochs", "1",
            "--validation", "0", "--name", "my-tune", "--store", str(store), "--no-progress"]
    assert _cli(*base, "--out", str(tmp_path / "first")).returncode == 0
    refused = _cli(*base, "--out", str(tmp_path / "second"))
    assert refused.returncode == 1
    assert _errors(refused.stderr) == [f"error: a fine-tuned backbone 'my-tune' is already in the model store {store}; "
                                       "choose another --name"], refused.stderr
    assert not (tmp_path / "second").exists()


# -- 5. removal says what it checked; --json refusals are JSON -----------------------------------------

def test_removal_says_what_it_checked_and_names_a_saved_model_no_longer_at_its_folder(tiny, tmp_path):
    import embedkit
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    model = tmp_path / "model"
    name = embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, store=store, out=model, **HEAD).backbone
    # while the saved model is where it was saved: refused, and with --json the refusal is JSON on stdout
    refused = _cli("backbones", "--remove", name, "--store", str(store), "--json")
    assert refused.returncode == 1
    body = json.loads(refused.stdout)["error"]
    assert body["type"] == "BackboneInUseError" and body["exit_code"] == 1
    assert body["dependents"] == [f"saved model {model}"]
    assert "checked: the fine-tunes in the model store, and the saved models that `finetune` recorded" in body["message"]
    assert _errors(refused.stderr) == [f"error: {body['message']}"]
    assert tuned.find(name, store) is not None
    # moved elsewhere: embedkit cannot see it; the removal goes on and says so plainly
    shutil.move(model, tmp_path / "elsewhere")
    done = _cli("backbones", "--remove", name, "--store", str(store))
    assert done.returncode == 0, done.stderr
    assert f"removed fine-tuned backbone {name}" in done.stdout
    assert "checked for dependents: the fine-tunes in the model store, and the saved models `finetune` recorded, at " \
           "the folders they were saved to (a saved model moved elsewhere is not seen)" in done.stdout
    assert f"note: 1 saved model(s) made on it are no longer at their recorded folders (deleted, or moved: a moved " \
           f"one was not checked and will not load any more): {model}" in done.stderr
    assert tuned.find(name, store) is None


def test_removal_in_python_lists_what_it_checked(tiny, tmp_path):
    import embedkit
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    kept, moved = tmp_path / "kept", tmp_path / "moved"
    first = embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=0, store=store, out=kept, **HEAD)
    again = embedkit.finetune("ft-tiny-text", texts, labels, epochs=1, seed=0, store=store, out=moved, **HEAD)
    assert again.backbone == first.backbone  # one run, two saved models
    shutil.move(moved, tmp_path / "away")
    (kept / "model.json").write_text(json.dumps({"backbone": {"name": "another", "digest": "0" * 64}}))
    removed = tuned.remove(first.backbone, store)
    assert removed.checked_models == [str(kept)] and removed.missing_models == [str(moved)]


@pytest.mark.parametrize("argv, kind", [
    (["backbones", "--remove", "nothing-here", "--json"], "UsageError"),
    (["backbones", "--json", "--remove"], "UsageError"),  # a line that does not parse
    (["plugins", "--json", "--bogus"], "UsageError"),
    (["extract", "{tmp}/t.txt", "--out", "{tmp}/afile/x", "--json"], "OutputFolderMissingError"),
    (["store", "info", "{tmp}/nowhere", "--json"], "UsageError"),
    (["train-head", "{tmp}/nowhere", "--labels", "{tmp}/t.txt", "--out", "{tmp}/o", "--json"], "UsageError"),
    (["predict", "{tmp}/nowhere", "a text", "--json"], "UsageError"),
    (["search", "{tmp}/nowhere", "a text", "--json"], "UsageError"),
    (["tune", "no-such-backbone", "--json"], "UnknownBackboneError"),
    (["quantize", "no-such-backbone", "--json"], "UnknownBackboneError"),
    (["finetune", "ft-tiny-text", "{tmp}/t.txt", "--labels", "{tmp}/t.txt", "--out", "{tmp}/afile/x", "--json"],
     "OutputFolderMissingError"),
])
def test_every_json_command_refuses_with_a_json_object_on_stdout(tmp_path, argv, kind):
    (tmp_path / "t.txt").write_text("a text\n")
    (tmp_path / "afile").write_text("mine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    done = _cli(*argv, "--store", str(tmp_path / "store")) if argv[0] in ("backbones", "finetune", "tune", "quantize") \
        else _cli(*argv)
    assert done.returncode == 1, done.stderr
    body = json.loads(done.stdout)["error"]
    assert (body["type"], body["exit_code"]) == (kind, 1), body
    assert _errors(done.stderr) == [f"error: {body['message']}"], done.stderr
    assert "Traceback" not in done.stderr
    without = _cli(*[a for a in argv if a != "--json"])
    assert without.returncode == 1 and without.stdout == ""  # without --json: stdout stays empty
