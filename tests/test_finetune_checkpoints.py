"""Checkpoints are verified before a resume (issue 23, item 1): each file carries a checksum and
the identity of its run; real files are tampered with, as a disk, a copy or a user would."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

SETTINGS = dict(unfreeze="last:1", epochs=2, batch_size=4, lr=1e-2, head_lr=1e-2, validation=0.25)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs with checkpoints, seeds 0 and 1 (same data, same settings otherwise)."""
    from finetune_support import LABELS, TEXTS, register

    import embedkit

    register()
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for seed in (0, 1):
        result = embedkit.finetune("ft-tiny-text", TEXTS, LABELS, seed=seed, checkpoint_dir=root / f"seed{seed}",
                                   store=root / "store", **SETTINGS)
        made[seed] = result
    return root, made


def _resume(folder, store, seed=0):
    from finetune_support import LABELS, TEXTS

    import embedkit

    return embedkit.finetune("ft-tiny-text", TEXTS, LABELS, seed=seed, checkpoint_dir=folder, resume=True,
                             store=store, **SETTINGS)


def _copy(runs, tmp_path, seed=0):
    root, _ = runs
    folder = tmp_path / "ckpt"
    shutil.copytree(root / f"seed{seed}", folder)
    for lock in folder.glob("*.lock"):
        lock.unlink()
    return folder


def _header_size(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_an_intact_checkpoint_folder_resumes_to_the_same_backbone(runs, tmp_path):
    root, made = runs
    result = _resume(_copy(runs, tmp_path), root / "store")
    assert result.backbone == made[0].backbone and result.digest == made[0].digest
    assert [row["epoch"] for row in result.history] == [1, 2]


@pytest.mark.parametrize("name", ["last.safetensors", "best.safetensors"])
def test_one_flipped_bit_in_the_weights_is_refused_naming_the_file(runs, tmp_path, name):
    """Was: --resume finished with other weights and exit 0."""
    from embedkit.errors import CheckpointError

    folder = _copy(runs, tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    at = 8 + _header_size(path) + (len(data) - 8 - _header_size(path)) // 2  # a byte in the tensors
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name} does not match its checksum.*run without resume"):
        _resume(folder, runs[0] / "store")


@pytest.mark.parametrize("old, new", [(b'"optim.', b'"optin.'), (b'"rng.torch"', b'"rng.torcH"'),
                                      (b'"shape":[', b'"shape":{')])
def test_a_flipped_byte_in_the_header_is_refused_naming_the_file(runs, tmp_path, old, new):
    """Was: a raw KeyError traceback from the optimiser."""
    from embedkit.errors import CheckpointError

    folder = _copy(runs, tmp_path)
    path = folder / "last.safetensors"
    data = path.read_bytes()
    assert old in data[:8 + _header_size(path)]
    path.write_bytes(data.replace(old, new, 1))
    with pytest.raises(CheckpointError, match=r"last.safetensors (does not match its checksum|is not a readable)"):
        _resume(folder, runs[0] / "store")


@pytest.mark.parametrize("name", ["last.safetensors", "best.safetensors"])
def test_a_file_copied_in_from_another_seeds_run_is_refused(runs, tmp_path, name):
    """Was: resumed from silently, and the lineage then recorded this run's seed for the other's weights."""
    from embedkit.errors import CheckpointError

    root, _ = runs
    folder = _copy(runs, tmp_path)
    shutil.copy(root / "seed1" / name, folder / name)  # intact, checksum and all: only its run differs
    with pytest.raises(CheckpointError, match=rf"{name} was written by another run"):
        _resume(folder, root / "store")
    marker = json.loads((folder / "checkpoint.json").read_text())
    assert marker["config"]["hyperparameters"]["seed"] == 0  # the folder is left as it was, for the user to see


def test_a_whole_folder_of_another_seed_is_refused_by_its_settings(runs, tmp_path):
    from embedkit.errors import CheckpointError

    root, _ = runs
    with pytest.raises(CheckpointError, match="other settings or data"):
        _resume(_copy(runs, tmp_path, seed=1), root / "store", seed=0)


def _rewrite(path, metadata):
    """The file's tensors written again with ``metadata`` (None: none at all), as safetensors writes them."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata=metadata)


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def test_a_checkpoint_of_the_older_format_is_called_older_and_not_resumed_from(runs, tmp_path):
    """Format 1 wrote no checksum and no run: only such an intact file is "written by an older embedkit"."""
    from embedkit.errors import CheckpointError

    folder = _copy(runs, tmp_path)
    path = folder / "last.safetensors"
    meta = _metadata(path)
    state = {**json.loads(meta["embedkit"]), "format": 1}
    _rewrite(path, {"embedkit": json.dumps(state)})  # what format 1 wrote: its state, no sha256, no run
    with pytest.raises(CheckpointError, match=r"last.safetensors carries no checksum \(written by an older embedkit, "
                                              r"checkpoint format 1\): it cannot be verified.*run without resume"):
        _resume(folder, runs[0] / "store")
    _rewrite(path, None)  # tensors only, no metadata: safetensors' own file, not embedkit's
    with pytest.raises(CheckpointError, match="last.safetensors carries no embedkit metadata \\(not written by embedkit\\)"):
        _resume(folder, runs[0] / "store")


@pytest.mark.parametrize("name", ["last.safetensors", "best.safetensors"])
@pytest.mark.parametrize("key, flipped", [(b'"__metadata__"', b'"__metadaua__"'), (b'"sha256"', b'"sha246"'),
                                          (b'"embedkit"', b'"embedkjt"')])
def test_a_flipped_byte_in_a_key_of_the_header_is_reported_as_damaged(runs, tmp_path, name, key, flipped):
    """A flipped byte in the "__metadata__" (or "sha256") key hid the checksum field, and the loader said
    "carries no checksum (written by an older embedkit...)": the file is damaged, and is called so."""
    from embedkit.errors import CheckpointError

    folder = _copy(runs, tmp_path)
    path = folder / name
    data = path.read_bytes()
    size = _header_size(path)
    assert data[8:8 + size].count(key) == 1 and len(key) == len(flipped)
    at = data.index(key)
    path.write_bytes(data[:at] + flipped + data[at + len(key):])  # one byte differs: the header stays valid JSON
    assert sum(a != b for a, b in zip(data, path.read_bytes())) == 1
    with pytest.raises(CheckpointError) as caught:
        _resume(folder, runs[0] / "store")
    message = str(caught.value)
    assert message.startswith(f"{path} ")
    assert " damaged" in message and "older embedkit" not in message, message
    assert message.endswith("run without resume to start over")


def test_a_current_checkpoint_whose_checksum_field_was_removed_is_damaged(runs, tmp_path):
    """Its state says format 2 and it names its run: a missing checksum is damage (or an edit), not age."""
    from embedkit.errors import CheckpointError

    folder = _copy(runs, tmp_path)
    path = folder / "last.safetensors"
    _rewrite(path, {k: v for k, v in _metadata(path).items() if k != "sha256"})
    with pytest.raises(CheckpointError, match=r"last.safetensors is damaged: its header lacks the checksum embedkit "
                                              r"writes into it"):
        _resume(folder, runs[0] / "store")


def test_the_cli_names_the_tampered_file_in_one_error_line(tmp_path):
    """`embedkit finetune --resume` after a flipped bit: one `error:` line naming the file and the flag."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    from finetune_support import LABELS, TEXTS

    table = tmp_path / "train.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, LABELS)])
    support = str(Path(__file__).with_name("finetune_support.py"))
    command = [sys.executable, support, "finetune", "ft-tiny-text", str(table), "--labels", str(table), "--unfreeze",
               "last:1", "--epochs", "1", "--validation", "0", "--out", str(tmp_path / "run"), "--store",
               str(tmp_path / "store"), "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert first.returncode == 0, first.stderr
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0x10
    last.write_bytes(bytes(data))
    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert again.returncode == 1
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {last} does not match its checksum: it changed after embedkit wrote it (a damaged disk "
                      "or copy, an edit); it is not resumed from: run without --resume to start over"], again.stderr
    assert "Traceback" not in again.stderr
