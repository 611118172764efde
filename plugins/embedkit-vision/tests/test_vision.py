"""mobilenet-v2 and efficientnet-lite0: real ImageNet weights, the contract, real photos."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

import embedkit
from embedkit import Embedder, ImageProcessor, InvalidInputError, image_folder
from embedkit.probes import cosine
from embedkit.testing import check_backbone, torch_preprocess

BACKBONES = ["mobilenet-v2", "efficientnet-lite0"]
ANT, BEE = 310, 309  # ImageNet classes "ant, emmet, pismire" and "bee"


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_passes_the_contract(name, tmp_path):
    report = check_backbone(name, store=tmp_path)
    assert report["rules"][-1] == "preprocess-roundtrip"
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["batch_invariance_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("name", BACKBONES)
def test_manifest_records_parity_and_preprocessing(name):
    artifact = embedkit.export(name)
    m = artifact.manifest
    assert m["modality"] == "image" and m["dim"] == 1280 and m["inputs"] == ["pixel_values"]
    assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["min_cosine"] >= 0.99999
    assert artifact.preprocess == embedkit.get_backbone(name).preprocess


@pytest.mark.parametrize("name", BACKBONES)
def test_preprocessing_matches_torch_reference_on_real_photos(name, hymenoptera):
    backbone = embedkit.get_backbone(name)
    paths = image_folder(hymenoptera / "val").paths[::10]
    processor = ImageProcessor(backbone.preprocess)
    ours = np.stack([processor(p)[0] for p in paths])
    ref = torch.stack([torch_preprocess(p, backbone.preprocess) for p in paths])
    assert np.abs(ours - ref.numpy()).max() <= 1e-3
    # Features: torch on the torch-side input vs embedkit (ONNX Runtime on PIL + numpy input).
    module = backbone.build().eval()
    with torch.inference_mode():
        torch_features = module(ref).numpy()
    ours_features = embedkit.embed(paths, backbone=name).vectors
    assert cosine(torch_features, ours_features).min() >= 0.9999


@pytest.mark.parametrize("name,head", [("mobilenet-v2", "classifier"), ("efficientnet-lite0", "_fc")])
def test_imagenet_weights_are_loaded(name, head, hymenoptera):
    """The full ImageNet classifier on top of the features sees ants and bees in the photos."""
    backbone = embedkit.get_backbone(name)
    module = backbone.build().eval()
    processor = ImageProcessor(backbone.preprocess)
    hits = 0
    paths = image_folder(hymenoptera / "val").paths
    sample = paths[:10] + paths[-10:]  # ten ants, ten bees
    with torch.inference_mode():
        for path in sample:
            features = module(torch.from_numpy(processor(path)[0][None]))
            logits = getattr(module.net, head)(features)
            top5 = set(logits.topk(5).indices[0].tolist())
            hits += bool({ANT, BEE} & top5)
    assert hits >= 14, f"only {hits}/20 photos have ant or bee in the ImageNet top 5"


@pytest.mark.parametrize("name", BACKBONES)
def test_hymenoptera_pipeline_accuracy(name, hymenoptera):
    train, val = image_folder(hymenoptera / "train"), image_folder(hymenoptera / "val")
    pipe = Pipeline([("embed", Embedder(name)), ("head", LogisticRegression(max_iter=2000))])
    with pytest.raises(InvalidInputError) as info:
        pipe.fit(train.paths, train.labels)
    # The placeholder GIF in train/ants is one error record, not a crash, not a silent drop.
    [error] = info.value.errors
    assert train.paths[error.index].endswith("imageNotFound.gif") and error.code == "blank_image"
    keep = info.value.ok
    assert keep.sum() == len(train) - 1
    pipe.fit([p for p, k in zip(train.paths, keep) if k], np.asarray(train.labels)[keep])
    accuracy = pipe.score(val.paths, val.labels)
    print(f"{name}: hymenoptera val accuracy {accuracy:.4f}")
    assert accuracy >= 0.93


def test_every_input_kind_gives_the_same_embedding(hymenoptera, tmp_path):
    path = image_folder(hymenoptera / "val").paths[0]
    data = open(path, "rb").read()
    image = Image.open(io.BytesIO(data))
    array = np.asarray(Image.open(path).convert("RGB"))
    X = Embedder("mobilenet-v2").fit().transform([path, data, image, array])
    assert X.shape == (4, 1280)
    for row in X[1:]:
        np.testing.assert_allclose(row, X[0], atol=1e-5)
    stack = Embedder("mobilenet-v2").fit().transform(np.stack([array[:200, :200], array[:200, :200]]))
    assert stack.shape == (2, 1280)


def test_cli_embeds_an_image_folder_with_labels_and_error_records(hymenoptera, tmp_path):
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    (folder / "ants").mkdir(parents=True)
    (folder / "bees").mkdir()
    ants = image_folder(hymenoptera / "train" / "ants").paths
    bees = image_folder(hymenoptera / "train" / "bees").paths[:3]
    for p in [a for a in ants if a.endswith("imageNotFound.gif")] + [a for a in ants if a.endswith(".jpg")][:3]:
        (folder / "ants" / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    for p in bees:
        (folder / "bees" / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    (folder / "bees" / "broken.jpg").write_bytes(open(bees[0], "rb").read()[:2000])
    out = tmp_path / "feats.parquet"
    run = subprocess.run(
        [sys.executable, "-m", "embedkit.cli", "embed", "mobilenet-v2", str(folder), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 2, run.stderr  # failed items -> exit code 2
    assert "8 images: 6 ok, 2 failed" in run.stderr
    table = pq.read_table(out).to_pandas()
    assert list(table["label"]) == ["ants"] * 4 + ["bees"] * 4
    assert table["ok"].sum() == 6
    errors = [json.loads(line) for line in open(str(out) + ".errors.jsonl")]
    assert {(e["path"].rsplit("/", 1)[1], e["code"]) for e in errors} == {
        ("imageNotFound.gif", "blank_image"), ("broken.jpg", "truncated"),
    }
    assert np.stack(table["embedding"][table["ok"]]).shape == (6, 1280)


@pytest.mark.parametrize("name", BACKBONES)
def test_fp16_variant_stays_close_on_real_photos(name, hymenoptera):
    fp32 = embedkit.resolve(name)
    fp16 = embedkit.half(fp32)
    paths = sorted(hymenoptera.glob("val/*/*.jpg"))[:24]
    a = embedkit.embed([str(p) for p in paths], backbone=fp32).vectors
    b = embedkit.embed([str(p) for p in paths], backbone=fp16).vectors
    assert fp16.manifest["precision"]["parity"]["min_cosine"] >= 0.999
    assert cosine(a, b).min() >= 0.999
