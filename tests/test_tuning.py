"""Runtime selection by measurement: the torch runtime, tune(), the record, and runtime='auto'."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import read_banking, run_cli
from tiny import Pooled, text_backbone

import embedkit
from embedkit.encoder import encoder_for
from embedkit.models.probes import cosine
from embedkit.runtimes.candidates import candidates_for
from embedkit.runtimes.records import device_key, recorded
from embedkit.runtimes.torch_runtime import TorchRuntime

pytestmark = pytest.mark.usefixtures("no_tuning_records_left")  # tests here run tune: drop its records


def test_torch_runtime_matches_onnx_runtime_on_real_sentences(minilm):
    texts, _ = read_banking("test", limit=300)
    ours = encoder_for(minilm, runtime="onnxruntime").encode(texts)
    torch_side = encoder_for(minilm, runtime="torch").encode(texts)
    assert isinstance(encoder_for(minilm, runtime="torch").runtime, TorchRuntime)
    assert np.abs(ours.vectors - torch_side.vectors).max() <= 1e-4
    assert cosine(ours.vectors, torch_side.vectors).min() >= 0.99999


def test_tune_records_the_fastest_passing_runtime_and_auto_uses_it(minilm):
    record = embedkit.tune(minilm, items=read_banking("test", limit=60)[0], seconds=0.1)
    rows = record["candidates"]
    rates = {k: v["items_per_s"] for k, v in rows.items() if "items_per_s" in v}
    assert set(rows) == set(candidates_for("cpu", minilm)) >= {"onnxruntime", "torch", "openvino"}
    assert all(rates[k] > 0 and rows[k]["passes"] and rows[k]["precision"] == "fp32"
               for k in ("onnxruntime", "torch", "openvino"))
    passing = {k: r for k, r in rates.items() if rows[k]["passes"]}
    assert record["choice"] == max(passing, key=passing.get) and record["device"] == device_key("cpu")
    assert recorded(minilm, "cpu") == record  # read back from the model store
    assert encoder_for(minilm).runtime.providers == rows[record["choice"]]["providers"]

    # Only torch measured: torch is recorded, and runtime="auto" now builds the torch runtime.
    torch_only = embedkit.tune(minilm, items=["a short sentence"] * 20, seconds=0.1, runtimes=("torch",))
    assert torch_only["choice"] == "torch"
    assert isinstance(encoder_for(minilm).runtime, TorchRuntime)
    embedkit.tune(minilm, items=["a short sentence"] * 20, seconds=0.1, runtimes=("onnxruntime",))
    assert isinstance(encoder_for(minilm).runtime, embedkit.Runtime)
    assert isinstance(encoder_for(minilm, runtime="torch").runtime, TorchRuntime)  # explicit beats the record


def test_torch_runtime_refuses_a_module_that_is_not_the_exported_network(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"v1")
    backbone = text_backbone("pooled", Pooled, weight_files=(str(weights),))
    artifact = embedkit.export(backbone, tmp_path / "models")
    TorchRuntime(artifact, backbone=backbone)  # the same network: accepted
    weights.write_bytes(b"v2")  # new weights since the export
    with pytest.raises(embedkit.ArtifactError, match="not the network"):
        TorchRuntime(artifact, backbone=backbone)


def test_fp16_variant_on_cpu_runs_on_onnx_runtime_only(minilm):
    fp16 = embedkit.half(minilm)
    with pytest.raises(embedkit.DeviceUnavailableError):
        TorchRuntime(fp16, device="cpu")
    record = embedkit.tune(fp16, items=["a short sentence"] * 20, seconds=0.1)
    assert record["choice"] == "onnxruntime" and "error" in record["candidates"]["torch"]
    assert record["candidates"]["onnxruntime"]["parity"]["limits"]["min_cosine"] == 0.999


def test_tune_cli_prints_both_runtimes_and_the_choice(minilm, tmp_path):
    data = tmp_path / "sample.txt"
    data.write_text("\n".join(read_banking("test", limit=50)[0]))
    both = ("--runtime", "onnxruntime", "--runtime", "torch")
    run = run_cli("tune", "minilm-l6", "--data", str(data), "--seconds", "0.1", "--json", *both)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["items"] == 50 and set(record["candidates"]) == {"onnxruntime", "torch"}
    assert "tune: 100%" in run.stderr and "2/2" in run.stderr  # progress per runtime, on stderr
    text = run_cli("tune", "minilm-l6", "--data", str(data), "--seconds", "0.1", *both)
    assert "choice:" in text.stdout and "onnxruntime" in text.stdout and "torch" in text.stdout
    assert "matrix engines:" in text.stdout and "sample min cos" in text.stdout


def test_cuda_requests_are_typed_errors_without_a_gpu(minilm):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(embedkit.DeviceUnavailableError):
        TorchRuntime(minilm, device="cuda")
    with pytest.raises(embedkit.EmbedkitError, match="no runtime ran"):
        embedkit.tune(minilm, "cuda", items=["x"], seconds=0.1)
