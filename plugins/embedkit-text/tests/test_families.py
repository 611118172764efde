"""Each transformer family the seed names exports and passes the backbone contract."""
import numpy as np
import pytest

import embedkit
from embedkit.testing import check_backbone
from embedkit_text.folder import folder_backbone


@pytest.mark.parametrize("family,pooling", [
    ("bert", "mean"), ("bert", "cls"), ("bert", "max"), ("roberta", "mean"), ("t5", "mean"), ("gpt2", "last"),
])
def test_family_passes_check_backbone(tiny_models, tmp_path, family, pooling):
    backbone = folder_backbone(tiny_models[family], pooling=pooling)
    report = check_backbone(backbone, store=tmp_path)
    assert report["rules"][-1] == "preprocess-roundtrip"
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["batch_invariance_max_abs_diff"] <= 1e-5


def test_decoders_default_to_last_token_pooling(tiny_models):
    assert folder_backbone(tiny_models["gpt2"]).preprocess.pooling == "last"
    assert folder_backbone(tiny_models["bert"]).preprocess.pooling == "mean"
    assert folder_backbone(tiny_models["t5"]).dim == 32


def test_normalisation_on_and_off(tiny_models, tmp_path):
    on = embedkit.export(folder_backbone(tiny_models["bert"], normalize=True), tmp_path)
    off = embedkit.export(folder_backbone(tiny_models["bert"], normalize=False), tmp_path)
    assert on.digest != off.digest
    texts = ["the quick brown fox", "card payment"]
    v_on = embedkit.TextEncoder(on).encode(texts).vectors
    v_off = embedkit.TextEncoder(off).encode(texts).vectors
    np.testing.assert_allclose(np.linalg.norm(v_on, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(v_off, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(v_off / np.linalg.norm(v_off, axis=1, keepdims=True), v_on, atol=1e-5)


def test_local_folder_by_path(tiny_models, tmp_path):
    vectors = embedkit.embed(["the lazy dog"], backbone=str(tiny_models["roberta"]), store=tmp_path).vectors
    assert vectors.shape == (1, 32) and np.isfinite(vectors).all()
    emb = embedkit.Embedder(str(tiny_models["t5"]), store=str(tmp_path)).fit()
    assert emb.transform(["a small head"]).shape == (1, 32)


def test_dynamo_exporter_passes_the_gate(tiny_models, tmp_path):
    artifact = embedkit.export(folder_backbone(tiny_models["bert"]), tmp_path, exporter="dynamo")
    assert artifact.manifest["exporter"] == "dynamo"
    assert artifact.manifest["parity"]["max_abs_diff"] <= 1e-4
