"""embedkit.finetune on tiny random-weight backbones: what trains, what is kept, what is refused."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from finetune_support import IMAGE, LABELS, TEXT, TEXTS, register

import embedkit
from embedkit.errors import DatasetError, HeadBackboneMismatchError, InvalidUnfreezeError, NoBlocksError, UsageError

FAST = dict(epochs=2, batch_size=4, lr=1e-2, head_lr=1e-2, validation=0.25)


@pytest.fixture(scope="module", autouse=True)
def tiny_plugin():
    register()


@pytest.fixture(scope="module")
def tuned():
    """One fine-tune (last:1 of 3 blocks) shared by the tests that inspect its result."""
    return embedkit.finetune("ft-tiny-text", TEXTS, LABELS, unfreeze="last:1", **FAST)


def _weights(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(embedkit.get_backbone(name).weight_files[0])


def test_last_n_trains_only_the_last_blocks_and_makes_a_new_backbone(tuned):
    import torch

    parent = TEXT.build().state_dict()
    after = _weights(tuned.backbone)
    assert tuned.backbone.startswith("ft-tiny-text+ft-") and len(tuned.backbone) == len("ft-tiny-text+ft-") + 8
    assert torch.equal(after["emb.weight"], parent["emb.weight"])  # frozen blocks: byte-identical
    assert torch.equal(after["layers.0.0.weight"], parent["layers.0.0.weight"])
    assert not torch.equal(after["layers.1.0.weight"], parent["layers.1.0.weight"])  # last:1 trained
    assert tuned.digest != tuned.parent_digest  # its own artifact, hence its own store namespace
    assert [row["epoch"] for row in tuned.history] == [1, 2]
    assert all(0 <= row["val_accuracy"] <= 1 and math.isfinite(row["train_loss"]) for row in tuned.history)


def test_lineage_is_in_the_exported_manifest(tuned):
    from embedkit.finetuning.dataset import data_fingerprint
    from embedkit.inputs.fingerprints import fingerprint

    artifact = embedkit.resolve(tuned.backbone)
    lineage = artifact.manifest["lineage"]
    assert artifact.digest == tuned.digest and artifact.manifest["parent"] == "ft-tiny-text"
    assert lineage["parent"]["digest"] == embedkit.export("ft-tiny-text").digest
    assert lineage["data"]["fingerprint"] == data_fingerprint([fingerprint(t, "text") for t in TEXTS], LABELS)
    assert lineage["hyperparameters"]["unfreeze"] == "last:1" and lineage["hyperparameters"]["lr"] == 1e-2
    def timeless(rows):  # the same weights made again reuse the first export (wall times differ)
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(lineage["metrics"]) == timeless(tuned.history)


def test_classifier_predicts_from_raw_items_and_saves(tuned, tmp_path):
    proba = tuned.model.predict_proba(TEXTS)
    assert proba.shape == (len(TEXTS), 2) and np.allclose(proba.sum(1), 1)
    assert list(tuned.model.classes_) == ["neg", "pos"]
    path = embedkit.save(tuned.model, tmp_path / "model")
    loaded = embedkit.load(path)
    assert loaded.steps[0][1].digest_ == tuned.digest
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), proba, atol=1e-6)


def test_head_matches_the_trained_torch_head():
    """The saved LogisticRegression is the trained linear head (softmax probabilities equal)."""
    import torch

    from embedkit.finetuning import objectives as trainer
    from embedkit.finetuning.finetune import sklearn_head

    for classes in (["a", "b"], ["a", "b", "c"]):
        torch.manual_seed(0)
        head = trainer.make_head(torch, 8, len(classes))
        head.scale.fill_(3.0)
        x = torch.randn(5, 8)
        expected = torch.softmax(head(x), 1).detach().numpy()
        np.testing.assert_allclose(sklearn_head(head, np.asarray(classes, dtype=object)).predict_proba(x.numpy()),
                                   expected, atol=1e-6)


def test_same_seed_same_weights_other_seed_other_weights(tuned):
    again = embedkit.finetune("ft-tiny-text", TEXTS, LABELS, unfreeze="last:1", **FAST)
    assert again.backbone == tuned.backbone  # the name is a hash of the weights and of the run's identity
    other = embedkit.finetune("ft-tiny-text", TEXTS, LABELS, unfreeze="last:1", **{**FAST, "seed": 1})
    assert other.backbone != tuned.backbone


def test_tuned_backbone_resolves_by_name_in_a_fresh_process(tuned, tmp_path):
    """A new process (with the parent's plugin installed, as the user's would be): the name resolves,
    check_backbone passes (export gate, finetune rule...), extract lands in the tuned digest's namespace."""
    code = f"""
import json, sys
from finetune_support import register
register()
import embedkit
from embedkit.features.store import FeatureStore
b = embedkit.get_backbone({tuned.backbone!r})
report = embedkit.check_backbone({tuned.backbone!r})
embedkit.extract(["good movie", "bad film"], backbone={tuned.backbone!r}, store={str(tmp_path / 'fs')!r})
spaces = [(n.name, n.digest) for n in FeatureStore({str(tmp_path / 'fs')!r}).namespaces()]
from embedkit.cli import main
main(["backbones", "--json"])  # listed with its parent
print(json.dumps({{"parent": b.parent, "spaces": spaces, "rules": report["rules"], "digest": report["digest"]}}))
"""
    # the helper module lives beside this file: a `-c` process sees it only through PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    *listing, last = out.stdout.strip().splitlines()
    found = json.loads(last)
    row = next(r for r in json.loads("\n".join(listing)) if r["name"] == tuned.backbone)
    assert row["parent"] == "ft-tiny-text" and row["parent_digest"] == tuned.parent_digest
    assert found["parent"] == "ft-tiny-text"
    assert {"parity", "finetune", "determinism"} <= set(found["rules"]) and found["digest"] == tuned.digest
    assert found["spaces"] == [[tuned.backbone, tuned.digest]]
    assert tuned.digest != tuned.parent_digest


def test_parent_head_refused_on_the_finetuned_backbone(tuned, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    parent_model = Pipeline([("embed", embedkit.Embedder("ft-tiny-text")), ("head", LogisticRegression())])
    parent_model.fit(TEXTS, LABELS)
    path = embedkit.save(parent_model, tmp_path / "parent-model")
    assert embedkit.load(path, backbone="ft-tiny-text").predict(TEXTS[:1]).shape == (1,)  # its own backbone: fine
    with pytest.raises(HeadBackboneMismatchError) as caught:
        embedkit.load(path, backbone=tuned.backbone)
    assert tuned.parent_digest in str(caught.value) and tuned.digest in str(caught.value)
    assert "fine-tune" in str(caught.value)


# -- typed errors before any training -------------------------------------------------------
@pytest.mark.parametrize("labels, unfreeze, backbone, error, words", [
    (LABELS[:-1], "last:1", "ft-tiny-text", DatasetError, "15 labels for 16"),
    (["pos"] * 16, "last:1", "ft-tiny-text", DatasetError, "at least 2 classes"),
    (LABELS[:3] + [float("nan")] + LABELS[4:], "last:1", "ft-tiny-text", DatasetError, "index 3"),
    (LABELS[:5] + [None] + LABELS[6:], "last:1", "ft-tiny-text", DatasetError, "index 5"),
    (LABELS, "last:4", "ft-tiny-text", InvalidUnfreezeError, "3 blocks"),
    (LABELS, "last:1", "ft-tiny-noblocks", NoBlocksError, "ft-tiny-noblocks"),
    (LABELS, "top:2", "ft-tiny-text", InvalidUnfreezeError, "top:2"),
])
def test_bad_input_is_refused_before_training(labels, unfreeze, backbone, error, words):
    steps = []
    with pytest.raises(error) as caught:
        embedkit.finetune(backbone, TEXTS, labels, unfreeze=unfreeze, progress=lambda *a: steps.append(a), **FAST)
    assert words in str(caught.value)
    assert steps == []  # nothing trained


@pytest.mark.parametrize("option, value", [("epochs", 0), ("lr", -1.0), ("batch_size", 2.5), ("layer_decay", 1.5),
                                           ("validation", 1.0), ("warmup", -0.1), ("class_weight", "heavy"),
                                           ("device", "tpu"), ("name", "Bad Name")])
def test_bad_settings_are_usage_errors(option, value):
    with pytest.raises(UsageError, match=option):
        embedkit.finetune("ft-tiny-text", TEXTS, LABELS, **{**FAST, option: value})


def test_patience_needs_validation():
    with pytest.raises(UsageError, match="validation"):
        embedkit.finetune("ft-tiny-text", TEXTS, LABELS, **{**FAST, "validation": None, "patience": 1})


# -- bad items, images, options -------------------------------------------------------------
def test_bad_items_are_records_excluded_and_counted():
    items = TEXTS + [b"\xff\xfe not utf-8", 12345]
    result = embedkit.finetune("ft-tiny-text", items, LABELS + ["pos", "neg"], unfreeze="head", **FAST)
    assert [(f["index"], f["code"]) for f in result.failures] == [(16, "invalid_utf8"), (17, "not_text")]
    assert result.lineage["data"] == {**result.lineage["data"], "items": 16, "excluded": 2}


def _images(folder: Path) -> tuple[list[str], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for k in range(12):
        label = "bright" if k % 2 else "dark"
        base = 180 if k % 2 else 60
        pixels = np.clip(rng.normal(base, 40, size=(40 + k, 48, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{k}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
        labels.append(label)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return paths + [str(folder / "broken.png")], labels + ["dark"]


def test_images_frozen_batchnorm_stays_and_broken_image_is_a_record(tmp_path):
    import torch

    paths, labels = _images(tmp_path)
    result = embedkit.finetune("ft-tiny-image", paths, labels, unfreeze="last:1", epochs=2, batch_size=4,
                               lr=1e-2, head_lr=1e-2, validation=0.25, augment=True, class_weight="balanced")
    assert [(f["index"], f["stage"]) for f in result.failures] == [(12, "decode")]
    parent, after = IMAGE.build().state_dict(), _weights(result.backbone)
    for key in ("features.0.1.running_mean", "features.0.1.running_var", "features.0.0.weight"):
        assert torch.equal(after[key], parent[key]), key  # the frozen block, BatchNorm statistics included
    assert torch.equal(after["features.1.1.running_mean"], parent["features.1.1.running_mean"])  # BN in eval (default)
    assert not torch.equal(after["features.1.0.weight"], parent["features.1.0.weight"])
    assert result.model.predict(paths[:2]).shape == (2,)


def test_given_validation_and_early_stopping_keep_the_best_epoch():
    result = embedkit.finetune("ft-tiny-text", TEXTS, LABELS, unfreeze="all", epochs=8, batch_size=4, lr=0.5,
                               head_lr=5.0, validation=(TEXTS[::3], LABELS[::3]), patience=1)
    history = result.history
    keys = [(h["val_accuracy"], -h["val_loss"]) for h in history]
    best = max(range(len(keys)), key=lambda i: keys[i])
    assert len(history) < 8 and history[-1].get("early_stop")  # stopped early
    assert all(keys[i] > max(keys[:i]) for i in range(1, len(history) - 1))  # improved until the last epoch
    # the kept weights are the best epoch's: its validation accuracy is what the model scores
    assert result.model.score(TEXTS[::3], LABELS[::3]) == pytest.approx(history[best]["val_accuracy"])


def test_contrastive_objective_is_setfit_then_a_logistic_regression():
    import torch
    from sklearn.linear_model import LogisticRegression

    result = embedkit.finetune("ft-tiny-text", TEXTS, LABELS, objective="contrastive", unfreeze="last:2", epochs=1,
                               batch_size=8, lr=1e-2, validation=0.25, iterations=2)
    assert result.history[0]["pairs"] == 2 * 2 * 12 and 0 <= result.history[0]["val_accuracy"] <= 1
    assert result.lineage["hyperparameters"]["objective"] == "contrastive"
    assert result.lineage["hyperparameters"]["iterations"] == 2
    assert type(result.model.steps[1][1]) is LogisticRegression
    after, parent = _weights(result.backbone), TEXT.build().state_dict()
    assert torch.equal(after["emb.weight"], parent["emb.weight"]) and not torch.equal(
        after["layers.1.0.weight"], parent["layers.1.0.weight"])
    with pytest.raises(UsageError, match="text backbones"):
        embedkit.finetune("ft-tiny-image", ["a.png"] * 2, ["a", "b"], objective="contrastive")
