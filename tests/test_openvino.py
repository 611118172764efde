"""The OpenVINO runtime and precision as a measured choice (bf16 gated against fp32)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import read_banking
from tiny import Pooled, register, text_backbone

import embedkit
from embedkit.encoder import encoder_for
from embedkit.errors import MissingDependencyError
from embedkit.models.probes import BF16_LIMITS, LIMITS, cosine, onnx_runner, passes, probes_for
from embedkit.runtimes.cpu import has_bf16
from embedkit.runtimes.records import recorded
from embedkit.runtimes.select import make_runtime

pytest.importorskip("openvino")
from embedkit.runtimes.openvino_runtime import OpenVINORuntime, cache_dir  # noqa: E402


class Cancelling(torch.nn.Module):
    """A real network whose output needs fp32's 24-bit mantissa: a hidden layer sits on a bias of
    256 that the next layer subtracts again. fp32 keeps the O(1) signal riding on 256 to ~1e-5;
    bf16 (8 bits) rounds 256 + x to steps of 2, so the signal is mostly gone after the second product."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        with torch.no_grad():
            self.up.bias.fill_(256.0)
            self.down.bias.copy_(-256.0 * self.down.weight.sum(1))

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return self.down(self.up(pooled))


class TinyConv(torch.nn.Module):
    """A small real CNN: convolutions, batch norm, ReLU6, global pooling (MobileNet's parts)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
            torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.Conv2d(16, 8, 1), torch.nn.ReLU6(),
        )

    def forward(self, pixel_values):
        return self.body(pixel_values).mean((2, 3))


pytestmark = pytest.mark.usefixtures("no_tuning_records_left")  # tests here run tune: drop its records



@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from embedkit.backbones import registry as plugins

    backbone = text_backbone("tiny-ov-text", Pooled)
    register(backbone)
    yield embedkit.export(backbone, tmp_path_factory.mktemp("ov") / "models")
    plugins.reset()


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory):
    backbone = embedkit.Backbone(name="tiny-ov-image", modality="image", dim=8, weights="random", license="MIT",
                                 preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=36), builder=TinyConv)
    return embedkit.export(backbone, tmp_path_factory.mktemp("ov") / "models")


@pytest.mark.parametrize("model", ["tiny_text", "tiny_image"])
def test_openvino_fp32_equals_onnx_runtime_within_the_fp32_gate_on_the_probes(model, request):
    artifact = request.getfixturevalue(model)
    runtime = OpenVINORuntime(artifact, "fp32")
    probes = probes_for(artifact)
    parity = probes.compare(runtime.run, onnx_runner(artifact.onnx_path, probes.rank), "onnxruntime", LIMITS)
    assert passes(parity, LIMITS), parity
    assert parity["min_cosine"] >= 0.99999 and parity["scaled_diff"] <= 1e-4
    assert runtime.precision == "fp32" and runtime.providers == ["openvino-CPU-fp32"]
    # OpenVINO's own default on a bf16 CPU is bf16: the runtime must have asked for f32 explicitly.
    assert str(runtime.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


def test_openvino_fp32_matches_onnx_runtime_on_real_sentences_through_the_encoder(minilm):
    texts = read_banking("test", limit=200)[0]
    ours = encoder_for(minilm, runtime="onnxruntime").encode(texts)
    ov = encoder_for(minilm, runtime="openvino").encode(texts)
    assert ov.ok.all() and np.abs(ours.vectors - ov.vectors).max() <= 1e-4
    assert cosine(ours.vectors, ov.vectors).min() >= 0.99999


@pytest.fixture
def cancelling(tmp_path, tiny_text):
    """The Cancelling network exported and registered (torch candidates need its module; the
    registry is reset with tiny_text's, at the end of the module)."""
    backbone = text_backbone("cancelling", Cancelling)
    register(backbone)
    return embedkit.export(backbone, tmp_path / "models")


def test_a_bf16_candidate_that_fails_the_gate_is_never_chosen(cancelling):
    artifact = cancelling
    items = [f"sentence number {i} about a card payment" for i in range(40)]
    record = embedkit.tune(artifact, items=items, seconds=0.05,
                           runtimes=("onnxruntime", "openvino", "openvino-bf16", "torch-bf16"))
    rows = record["candidates"]
    assert rows["onnxruntime"]["passes"] and rows["openvino"]["passes"]
    assert rows["torch-bf16"]["precision"] == "bf16" and not rows["torch-bf16"]["passes"]
    assert rows["torch-bf16"]["sample"]["min_cosine"] < BF16_LIMITS["min_cosine"]
    if has_bf16():  # else OpenVINO bf16 cannot run here at all (an error row), and is not chosen either
        assert rows["openvino-bf16"]["precision"] == "bf16" and not rows["openvino-bf16"]["passes"]
        assert rows["openvino-bf16"]["parity"]["min_cosine"] < BF16_LIMITS["min_cosine"]
    else:
        assert "error" in rows["openvino-bf16"]
    assert record["choice"] in ("onnxruntime", "openvino") and record["precision"] == "fp32"
    assert make_runtime(artifact).precision == "fp32"


def test_bf16_on_minilm_is_gated_on_probes_and_sample_and_the_record_names_the_cpu(minilm):
    texts = read_banking("test", limit=60)[0]
    record = embedkit.tune(minilm, items=texts, seconds=0.05, runtimes=("onnxruntime", "openvino-bf16"))
    row = record["candidates"]["openvino-bf16"]
    cpu = record["machine"]["cpu"]
    assert cpu["bf16"] == has_bf16() and set(cpu["matrix_flags"]).isdisjoint(cpu["absent"])
    if not has_bf16():
        assert "error" in row and record["choice"] == "onnxruntime"
        return
    assert "BF16" in record["machine"]["openvino"]["capabilities"]
    assert row["limits"] == BF16_LIMITS and row["sample"]["compared"] == len(texts)
    assert row["passes"] == (row["parity"]["min_cosine"] >= 0.9999 and row["sample"]["min_cosine"] >= 0.9999
                             and row["parity"]["scaled_diff"] <= BF16_LIMITS["max_abs_diff"])
    passing = {k: v["items_per_s"] for k, v in record["candidates"].items() if v["passes"]}
    assert record["choice"] == max(passing, key=passing.get)


def test_tune_record_and_compiled_model_cache_survive_a_second_process(tiny_text):
    record = embedkit.tune(tiny_text, items=["a card payment", "my top-up failed"] * 10, seconds=0.05,
                           runtimes=("openvino",))
    assert record["choice"] == "openvino" and record["precision"] == "fp32"
    assert any(cache_dir(tiny_text, "fp32").glob("*.blob"))  # the first start compiled and cached
    script = (
        "import json, sys, embedkit\n"
        "from embedkit.encoder import encoder_for\n"
        "from embedkit.runtimes.records import recorded\n"
        "a = embedkit.Artifact.open(sys.argv[1])\n"
        "rt = encoder_for(a).runtime\n"
        "print(json.dumps({'choice': recorded(a, 'cpu')['choice'], 'kind': type(rt).__name__, "
        "'precision': rt.precision, 'cache_hit': rt.cache_hit}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_text.path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"choice": "openvino", "kind": "OpenVINORuntime", "precision": "fp32", "cache_hit": True}
    assert recorded(tiny_text, "cpu")["choice"] == "openvino"


def test_per_item_errors_are_unchanged_through_openvino(tiny_text, tiny_image, tmp_path):
    texts = ["a card payment", b"\xff\xfe not utf-8", "", "my top-up failed", 42]
    ref = encoder_for(tiny_text, runtime="onnxruntime", empty="error").encode(texts)
    got = encoder_for(tiny_text, runtime="openvino", empty="error").encode(texts)
    assert [e.to_json() for e in got.errors] == [e.to_json() for e in ref.errors] and len(got.errors) == 3
    assert (got.ok == ref.ok).all() and np.allclose(got.vectors[got.ok], ref.vectors[ref.ok], atol=1e-5)

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(good)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = [str(good), str(tmp_path / "missing.png"), str(tmp_path / "broken.jpg"), str(good)]
    ref = encoder_for(tiny_image, runtime="onnxruntime").encode(images)
    got = encoder_for(tiny_image, runtime="openvino").encode(images)
    assert [e.to_json() for e in got.errors] == [e.to_json() for e in ref.errors] and len(got.errors) == 2
    assert got.ok.tolist() == [True, False, False, True]
    assert np.abs(got.vectors[got.ok] - ref.vectors[ref.ok]).max() <= 1e-4


def test_extraction_commit_records_name_the_precision(tiny_text, tmp_path):
    texts = [f"row {i} about cards" for i in range(12)]
    report = embedkit.extract(texts, str(tiny_text.path), str(tmp_path / "fs"), runtime="torch-bf16")
    assert report.computed == 12
    runtimes = [r["stats"]["runtime"] for r in embedkit.FeatureStore(tmp_path / "fs").find(tiny_text.name).commits()]
    assert runtimes and all(r["precision"] == "bf16" and r["kind"] == "TorchRuntime" for r in runtimes)
    embedkit.extract(texts[:3] + ["one more"], str(tiny_text.path), str(tmp_path / "fs"), runtime="openvino")
    runtimes = [r["stats"]["runtime"] for r in embedkit.FeatureStore(tmp_path / "fs").find(tiny_text.name).commits()]
    assert [r["precision"] for r in runtimes] == ["bf16", "fp32"] and runtimes[-1]["kind"] == "OpenVINORuntime"


def test_missing_openvino_is_a_typed_error_naming_the_extra(tiny_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets when it is not installed
    with pytest.raises(MissingDependencyError, match=r"embedkit\[openvino\]") as caught:
        OpenVINORuntime(tiny_text)
    assert isinstance(caught.value, ImportError) and caught.value.extra == "openvino"
    with pytest.raises(MissingDependencyError, match=r"embedkit\[openvino\]"):
        encoder_for(tiny_text, runtime="openvino")
    # runtime="auto" with a recorded choice of openvino falls back to ONNX Runtime instead
    record_dir = Path(tiny_text.path).parents[1] / "tuning"
    record_dir.mkdir(exist_ok=True)
    from embedkit.runtimes.records import device_key

    (record_dir / f"{tiny_text.digest}.json").write_text(json.dumps({device_key("cpu"): {"choice": "openvino"}}))
    try:
        assert type(encoder_for(tiny_text).runtime).__name__ == "Runtime"
    finally:
        (record_dir / f"{tiny_text.digest}.json").unlink()


def test_int8_variants_that_exist_are_candidates_gated_like_bf16(tiny_text):
    from embedkit.runtimes.candidates import candidates_for

    assert not any(c.startswith("int8-") for c in candidates_for("cpu", tiny_text))
    variant = embedkit.quantize(tiny_text, "dynamic", store=Path(tiny_text.path).parents[1])
    assert "int8-dynamic" in candidates_for("cpu", tiny_text)
    record = embedkit.tune(tiny_text, items=["a card payment", "my top-up failed"] * 10, seconds=0.05,
                           runtimes=("onnxruntime", "int8-dynamic"))
    row = record["candidates"]["int8-dynamic"]
    assert row["precision"] == "int8-dynamic" and row["limits"] == BF16_LIMITS
    assert row["passes"] == (row["parity"]["min_cosine"] >= 0.9999 and row["sample"]["min_cosine"] >= 0.9999
                             and row["parity"]["scaled_diff"] <= 1e-2)
    runtime = make_runtime(tiny_text, "int8-dynamic")
    assert runtime.model == str(variant.onnx_path) and runtime.precision == "int8-dynamic"
    with pytest.raises(embedkit.ArtifactError, match="int8-static"):
        make_runtime(tiny_text, "int8-static")
