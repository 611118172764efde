"""Faults found by attacking the fine-tuning feature from its README (issue 12), one test each."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedkit.fs.atomic import debris_of

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkpoint_killed_mid_write_leaves_only_files_embedkit_names(tmp_path):
    """safetensors' save_file wrote its own '.tmpXXXXXX' beside the target: a kill -9 during a
    checkpoint left it in checkpoints/, and `finetune --resume` then refused the run folder as
    holding a file embedkit did not write (so the run could not be resumed at all).

    The property, not a race: the writer says when each save has returned; once two have, the
    kill lands during a later one (the writer never stops writing), and then the folder holds the
    complete file of a finished save plus, at most, files embedkit names as its own debris. No
    deadline: a loaded machine only makes it slower (an earlier version polled for 3 s and, on a
    loaded machine, saw only the temporary file before the kill)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    script = ("import sys, torch\n"
              "from pathlib import Path\n"
              "from embedkit.finetuning.checkpoints import save_best\n"
              "module, head = torch.nn.Linear(1000, 1000), torch.nn.Linear(8, 2)\n"
              "while True:\n"
              "    save_best(Path(sys.argv[1]), module, head)\n"
              "    print('saved', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    seen: set[str] = set()
    try:
        for _ in range(2):  # two saves returned: the file is complete, and the writer is in its next save
            assert proc.stdout.readline().strip() == "saved"
        seen.update(os.listdir(folder))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = set(os.listdir(folder))
    assert "best.safetensors" in left  # a finished save is never undone by a kill during the next
    from safetensors.torch import load_file

    assert load_file(str(folder / "best.safetensors"))["module.weight"].shape == (1000, 1000)  # whole, readable
    unknown = sorted(n for n in seen | left if n != "best.safetensors" and debris_of(n, "best.safetensors") is None)
    assert unknown == []


# -- settings refused before training, never found out after it ------------------------------

@pytest.fixture(scope="module")
def tiny():
    from finetune_support import LABELS, TEXTS, register

    register()
    return TEXTS, LABELS


@pytest.mark.parametrize("weights", [{"pos": -1.0, "neg": 1.0}, {"pos": float("nan")}, {"pos": 0, "neg": 0},
                                     {"pos": "2"}, {"pos": True}])
def test_class_weights_that_are_not_positive_numbers_are_refused_before_training(tiny, weights, tmp_path):
    """Were accepted: the loss became NaN and the run failed only at the export, after training."""
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    with pytest.raises(UsageError, match="class_weight weights must be positive finite numbers"):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, class_weight=weights,
                          store=tmp_path / "store")
    assert not (tmp_path / "store").exists()  # refused before the store (or anything) was touched


@pytest.mark.parametrize("seed", ["x", 1.5, -1, True, 2**32])
def test_a_seed_that_is_not_a_whole_number_in_range_is_a_usage_error(tiny, seed, tmp_path):
    """seed='x' was a bare ValueError from int() (no typed error, no fix named)."""
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    with pytest.raises(UsageError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, seed=seed, store=tmp_path / "s")


@pytest.mark.parametrize("settings, message", [
    ({"foo": 1}, r"takes the options iterations, loss, scale, got \['foo'\]"),  # was a bare TypeError
    ({"loss": "triplet"}, "loss must be one of cosine, in-batch"),
    ({"loss": "in-batch", "scale": -1.0}, "scale must be a positive number"),
    ({"patience": 1}, "does not use patience"),  # was silently ignored
    ({"layer_decay": 0.5}, "does not use layer_decay"),
    ({"iterations": 0}, "iterations must be a positive int"),
])
def test_contrastive_refuses_options_and_settings_it_would_not_use(tiny, settings, message, tmp_path):
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    with pytest.raises(UsageError, match=message):
        embedkit.finetune("ft-tiny-text", texts, labels, objective="contrastive", epochs=1, store=tmp_path / "s",
                          **settings)
    assert not (tmp_path / "s").exists()


def test_contrastive_class_weight_weights_its_logistic_regression(tiny, tmp_path):
    """class_weight was silently ignored by the contrastive objective."""
    import embedkit

    texts, labels = tiny
    result = embedkit.finetune("ft-tiny-text", texts, labels, objective="contrastive", unfreeze="last:1", epochs=1,
                               iterations=1, validation=None, class_weight={"pos": 5.0}, store=tmp_path / "s")
    assert result.model.steps[-1][1].class_weight == {"pos": 5.0}


@pytest.mark.parametrize("objective, options", [("classify", {"head_lr": 1e30}), ("contrastive", {"iterations": 1})])
def test_a_diverged_training_is_a_typed_error_and_leaves_no_backbone(tiny, objective, options, tmp_path):
    """lr=1e30 trained to weights whose output overflows: the run ended in an ExportError about
    'probes' after persisting the broken backbone, which `embedkit backbones` then listed."""
    import embedkit
    from embedkit.errors import TrainingDivergedError
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    with pytest.raises(TrainingDivergedError, match=r"training diverged: .* lower lr"):
        embedkit.finetune("ft-tiny-text", texts, labels, objective=objective, unfreeze="all", epochs=1, lr=1e30,
                          max_grad_norm=None, validation=None, store=store, **options)
    assert tuned.listing(store) == []
    assert [p.name for p in store.iterdir() if (p / tuned.RECORD).exists() or (p / tuned.WEIGHTS).exists()] == []


def test_empty_texts_are_excluded_and_counted_not_trained_on(tiny, tmp_path):
    """'' and '   ' with a label were trained on silently (no record, failed_items 0)."""
    import embedkit
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    result = embedkit.finetune("ft-tiny-text", [*texts, "", " \u200b "], [*labels, "pos", "neg"], unfreeze="all",
                               epochs=1, validation=None, store=tmp_path / "s")
    assert [(f["index"], f["code"], f["split"]) for f in result.failures] == [(16, "empty_text", "train"),
                                                                             (17, "empty_text", "train")]
    assert result.lineage["data"]["items"] == 16 and result.lineage["data"]["excluded"] == 2
    clean = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="all", epochs=1, validation=None,
                              store=tmp_path / "s")
    assert result.digest == clean.digest  # the same weights: the empty texts took no part
    # two runs all the same (their records differ: 2 items excluded, or none), each named and recorded as itself
    assert result.backbone != clean.backbone
    assert [tuned.find(r.backbone, tmp_path / "s").lineage["data"]["excluded"] for r in (result, clean)] == [2, 0]


def test_embedkit_finetune_stays_the_function_after_its_module_is_imported():
    """FinetunedClassifier.fit (and report --finetune) import the module embedkit/finetune.py; the
    import system then bound it as `embedkit.finetune`: embedkit.finetune(...) -> TypeError
    "'module' object is not callable" for the rest of the process."""
    code = ("import embedkit\n"
            "from embedkit.errors import DatasetError\n"
            "try:\n"
            "    embedkit.FinetunedClassifier('minilm-l6').fit(['a', 'b'], ['x', 'x'])\n"
            "except DatasetError:\n"
            "    pass\n"
            "import sys, embedkit.finetuning.finetune\n"
            "assert sys.modules['embedkit.finetuning.finetune'].__file__.endswith('finetune.py')\n"
            "try:\n"
            "    embedkit.finetune('minilm-l6', ['a', 'b'], ['x', 'x'])\n"
            "except DatasetError as exc:\n"
            "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused: all 2 labelled items have the label 'x'")


def test_tampered_fine_tuned_weights_in_the_model_store_are_refused_not_used(tiny, tmp_path):
    """finetuned.json records the weights' sha256 but nothing checked it: a changed
    finetuned.safetensors was built, exported (a new artifact) and embedded with, silently."""
    import embedkit
    from embedkit.errors import ArtifactError
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    result = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", epochs=1, validation=None,
                               store=store)
    backbone = tuned.find(result.backbone, store)
    backbone.build()  # untouched: builds
    weights = Path(backbone.weight_files[0])
    data = bytearray(weights.read_bytes())
    data[-40] ^= 0x40  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed since the fine-tune wrote them.*run the fine-tune again"):
        backbone.build()
    for export in [p for p in weights.parent.iterdir() if p.is_dir()]:  # as if never exported on this machine
        import shutil

        shutil.rmtree(export)
    with pytest.raises(ArtifactError, match="changed since the fine-tune wrote them"):
        embedkit.export(result.backbone, store=store)
    weights.unlink()
    with pytest.raises(ArtifactError, match="are missing"):
        tuned.find(result.backbone, store).build()


def _persist_many(root, names, seed, barrier, results):
    import torch
    from finetune_support import TEXT

    from embedkit.errors import OutputExistsError
    from embedkit.models import finetuned as tuned

    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 4)  # weights of this process only
    for name in names:
        barrier.wait()
        try:
            tuned.persist(Path(root), name, TEXT, "ft-tiny-text", module, {}, user_named=True)
            results.put((name, seed))
        except OutputExistsError:
            pass


def test_two_fine_tunes_saving_under_one_name_at_once_one_wins_whole(tmp_path):
    """persist checked 'is the name free?' and then wrote weights and record without a lock: two
    runs given the same name= could both pass the check, and the store ended with one run's
    weights under the other's record (or both reported success)."""
    import multiprocessing

    from embedkit.models import finetuned as tuned
    from embedkit.models.store import sha256_file

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    names = [f"race-{i}" for i in range(60)]
    procs = [ctx.Process(target=_persist_many, args=(str(tmp_path), names, seed, barrier, results)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    winners: dict[str, list[int]] = {}
    while not results.empty():
        name, seed = results.get()
        winners.setdefault(name, []).append(seed)
    assert sorted(winners) == sorted(names)
    assert {n: w for n, w in winners.items() if len(w) != 1} == {}  # exactly one run saved each name
    for name in names:  # and the record names the weights that are there
        found = tuned.find(name, tmp_path)
        assert sha256_file(found.weight_files[0]) == found.weights_sha256


def test_a_cli_run_refused_once_the_backbone_is_built_leaves_no_run_folder(tmp_path):
    """`--unfreeze last:99` was refused (exit 1) only after --out was created with a finetune.json
    saying "running": litter that looked like an interrupted run."""
    import csv

    from finetune_support import LABELS, TEXTS

    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, LABELS)])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "finetune_support.py"), "finetune", "ft-tiny-text",
                           str(data), "--labels", str(data), "--out", str(out), "--unfreeze", "last:99",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: unfreeze='last:99' asks for more blocks than backbone 'ft-tiny-text' has: it has 3 blocks; "
        "use last:1 .. last:3, or 'all'"]
    assert not out.exists()


@pytest.mark.parametrize("labels, message", [
    ([1] * 7 + ["1"] + [2] * 8, r"labels mix types \(int, str\)"),  # the classifier merged 1 and "1" silently
    ([True] * 7 + [1] + [False] * 8, r"labels mix types \(bool, int\)"),  # True == 1: merged silently
    ([0.5] * 8 + [1.5] * 8, "labels hold continuous values"),  # finetune() trained two 'classes' 0.5 and 1.5
])
@pytest.mark.parametrize("api", ["finetune", "FinetunedClassifier"])
def test_labels_that_would_merge_or_are_continuous_are_refused_by_both_apis(tiny, labels, message, api, tmp_path):
    import embedkit
    from embedkit.errors import DatasetError

    texts, _ = tiny
    with pytest.raises(DatasetError, match=message):
        if api == "finetune":
            embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, store=tmp_path / "s")
        else:
            embedkit.FinetunedClassifier("ft-tiny-text", unfreeze="head", epochs=1, store=str(tmp_path / "s")).fit(
                texts, labels)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, message", [
    (["--finetune", "classify", "--iterations", "3"], "--iterations is an option of --finetune contrastive"),
    (["--finetune-max-items", "4"], "add --finetune contrastive|classify"),
])
def test_report_refuses_finetune_options_it_would_ignore(flags, message, tmp_path):
    """`report --finetune classify --iterations 3` and `--finetune-max-items` without --finetune
    ran and exited 0, the option silently ignored (`finetune` itself refuses --iterations there)."""
    import csv

    from finetune_support import LABELS, TEXTS

    support = str(ROOT / "tests" / "finetune_support.py")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, LABELS)])
    store = tmp_path / "features"
    store.mkdir()
    extract = subprocess.run([sys.executable, support, "extract", str(labels), "--backbone", "ft-tiny-text", "--column",
                              "text", "--out", str(store)], capture_output=True, text=True, timeout=120)
    assert extract.returncode == 0, extract.stderr[-2000:]
    proc = subprocess.run([sys.executable, support, "report", str(store), "--backbone", "ft-tiny-text", "--labels",
                           str(labels), "--column", "text", "--out", str(tmp_path / "rep"), "--no-progress", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "rep").exists()


def test_two_cli_runs_into_one_out_folder_the_second_is_refused(tmp_path):
    """Both ran to the end and exited 0, both saying 'model -> OUT/model': the second replaced the
    first's checkpoints mid-run (checkpoint.start cleared them) and then its model."""
    import csv
    import json

    from finetune_support import LABELS, TEXTS

    words = ["really", "quite", "so", "very", "truly", "rather", "most", "just"]
    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *((f"{w} {t}", label) for w in words
                                                         for t, label in zip(TEXTS, LABELS))])
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "tests" / "finetune_support.py"), "finetune", "ft-tiny-text", str(data),
            "--labels", str(data), "--out", str(out), "--epochs", "40", "--batch-size", "2", "--no-progress"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "metrics.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert first.poll() is None  # still training
        second = subprocess.run([*argv, "--seed", "9"], capture_output=True, text=True, timeout=120)
        assert first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: another `embedkit finetune` is writing {out} now; wait for it to end, or choose another --out"]
    # the first run's checkpoints are its own: resumable with its own settings
    assert json.loads((out / "checkpoints" / "checkpoint.json").read_text())["config"]["hyperparameters"]["seed"] == 0


def test_a_checkpoint_folder_in_use_by_another_process_is_refused(tiny, tmp_path):
    import embedkit
    from embedkit.errors import OutputError

    texts, labels = tiny
    ckpt = tmp_path / "ckpt"
    embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, checkpoint_dir=ckpt,
                      store=tmp_path / "s")  # a run's checkpoint folder
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
                               "time.sleep(60)\n", str(ckpt / "checkpoint.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="another fine-tune is writing the checkpoints in"):
            embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, checkpoint_dir=ckpt,
                              store=tmp_path / "s")
        assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing of this run written
    finally:
        holder.kill()
        holder.wait()
    result = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, checkpoint_dir=ckpt,
                               store=tmp_path / "s", resume=True)  # free again: runs (here: resumes)
    assert result.history and (ckpt / "last.safetensors").is_file()
    only_locks = tmp_path / "stopped"  # a run killed right after taking its lock: the folder is still usable
    only_locks.mkdir()
    (only_locks / "checkpoint.lock").touch()
    assert embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, checkpoint_dir=only_locks,
                             store=tmp_path / "s").history


def test_resume_from_a_truncated_checkpoint_names_the_way_out(tiny, tmp_path):
    import embedkit
    from embedkit.errors import CheckpointError

    texts, labels = tiny
    ckpt = tmp_path / "ckpt"
    settings = dict(unfreeze="last:1", epochs=2, validation=None, checkpoint_dir=ckpt, store=tmp_path / "s")
    embedkit.finetune("ft-tiny-text", texts, labels, **settings)
    last = ckpt / "last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # a disk that filled, a copy cut short
    with pytest.raises(CheckpointError, match="last.safetensors is not a readable embedkit checkpoint .*"
                                              "run without resume to start over"):
        embedkit.finetune("ft-tiny-text", texts, labels, resume=True, **settings)
    assert embedkit.finetune("ft-tiny-text", texts, labels, **settings).history[-1]["epoch"] == 2  # the way out


def test_a_fine_tune_record_naming_weights_outside_its_folder_is_refused(tiny, tmp_path):
    """finetuned.json's "weights" was joined to the folder unchecked: an absolute path or '../'
    made the store load (and export) a file outside it; a symlink did the same."""
    import json
    import shutil

    import embedkit
    from embedkit.errors import ArtifactError, InvalidBackboneError
    from embedkit.models import finetuned as tuned

    texts, labels = tiny
    store = tmp_path / "store"
    name = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", epochs=1, validation=None,
                             store=store).backbone
    folder = store / name
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / tuned.WEIGHTS, outside)  # the same bytes: the sha256 check alone would pass
    record = json.loads((folder / tuned.RECORD).read_text())
    for weights in (str(outside), "../../outside.safetensors"):
        (folder / tuned.RECORD).write_text(json.dumps({**record, "weights": weights}))
        with pytest.raises(InvalidBackboneError, match="names only 'finetuned.safetensors' beside it"):
            tuned.find(name, store)
        assert tuned.listing(store) == []  # skipped (with a warning), not listed
    (folder / tuned.RECORD).write_text(json.dumps(record))
    (folder / tuned.WEIGHTS).unlink()
    (folder / tuned.WEIGHTS).symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link"):
        tuned.find(name, store).build()


def test_a_head_only_fine_tune_keeps_the_parents_artifact_as_the_readme_says(tiny, tmp_path):
    import embedkit

    texts, labels = tiny
    result = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, validation=None,
                               store=tmp_path / "s")
    assert result.digest == result.parent_digest
    tuned = embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="last:1", epochs=1, validation=None,
                              store=tmp_path / "s")
    assert tuned.digest != tuned.parent_digest == result.parent_digest


@pytest.mark.parametrize("items, message", [
    ([3, None], "none of the 2 validation items could be used: expected str"),
    (["", "  "], "none of the 2 validation items could be used: empty text"),
    ([], r"validation=\(items, labels\) holds no items"),
])
def test_validation_data_with_no_usable_item_is_refused_not_dropped(tiny, items, message, tmp_path):
    """The run trained on with no validation at all: patience (early stopping) and the best-epoch
    choice were dropped silently, val_accuracy None."""
    import embedkit
    from embedkit.errors import DatasetError

    texts, labels = tiny
    with pytest.raises(DatasetError, match=message):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=2, patience=1,
                          validation=(items, ["pos", "neg"][:len(items)]), store=tmp_path / "s")


@pytest.mark.parametrize("flag", ["augment", "resume", "train_batchnorm"])
def test_on_off_settings_take_only_booleans(tiny, flag, tmp_path):
    """augment="false" (a string from a config file) was truthy: augmentation on, silently."""
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    with pytest.raises(UsageError, match=f"{flag} must be True or False, got 'false'"):
        embedkit.finetune("ft-tiny-text", texts, labels, unfreeze="head", epochs=1, store=tmp_path / "s",
                          checkpoint_dir=tmp_path / "c", **{flag: "false"})
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_cli_failure_records_point_at_the_source_item(tmp_path):
    """With a bad row before it, an excluded item's record gave its index among the readable rows
    (one too low: another item) and no locator."""
    import csv
    import json

    from finetune_support import LABELS, TEXTS

    source = tmp_path / "rows.csv"
    source.write_text("\n".join(["text", '"a","b","c"', *TEXTS[:8], "   ", *TEXTS[8:]]) + "\n")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, LABELS), ("   ", "pos")])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "finetune_support.py"), "finetune", "ft-tiny-text",
                           str(source), "--labels", str(labels), "--out", str(out), "--unfreeze", "head", "--epochs",
                           "1", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(r["index"], r["code"], r["source"]) for r in records] == [
        (0, "invalid_row", f"{source.name}:row 1"), (9, "empty_text", f"{source.name}:row 10")]


def test_cli_contrastive_runs_and_refuses_resume(tmp_path):
    """`embedkit finetune --objective contrastive` always failed: the CLI passed its checkpoint
    folder, which the contrastive objective refuses ("checkpoint_dir / resume are for classify")."""
    import csv
    import json

    from finetune_support import LABELS, TEXTS

    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, LABELS)])
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "tests" / "finetune_support.py"), "finetune", "ft-tiny-text", str(data),
            "--labels", str(data), "--out", str(out), "--objective", "contrastive", "--iterations", "1",
            "--epochs", "1", "--unfreeze", "all", "--no-progress", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["backbone"].startswith("ft-tiny-text+ft-") and summary["history"][0]["pairs"] == 2 * 1 * 14
    assert (out / "model" / "model.json").is_file() and not (out / "checkpoints").exists()
    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        "error: --resume and --checkpoint-every are for --objective classify (a contrastive run is short and keeps "
        "no checkpoints: rerun it)"]


def test_resuming_a_run_killed_after_it_stopped_early_ends_where_it_would_have(tiny, tmp_path):
    """The last checkpoint of an early-stopped run holds the stop condition; resuming from it (a
    kill -9 after that checkpoint, or --resume of a finished run) trained one more epoch."""
    import embedkit

    texts, labels = tiny
    settings = dict(unfreeze="all", epochs=15, patience=1, validation=0.25, lr=1e-2, head_lr=1e-2, batch_size=4,
                    checkpoint_dir=tmp_path / "ckpt", store=tmp_path / "s")
    clean = embedkit.finetune("ft-tiny-text", texts * 2, labels * 2, **settings)
    assert clean.history[-1].get("early_stop") and len(clean.history) < 15
    resumed = embedkit.finetune("ft-tiny-text", texts * 2, labels * 2, resume=True, **settings)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in clean.history]
    assert resumed.history[-1]["early_stop"] is True
    assert resumed.backbone == clean.backbone


def test_layer_decay_on_a_backbone_without_blocks_is_refused_not_ignored(tiny, tmp_path):
    import embedkit
    from embedkit.errors import UsageError

    texts, labels = tiny
    with pytest.raises(UsageError, match="layer_decay needs the backbone's blocks, and 'ft-tiny-noblocks' has none"):
        embedkit.finetune("ft-tiny-noblocks", texts, labels, unfreeze="all", layer_decay=0.5, epochs=1,
                          store=tmp_path / "s")
