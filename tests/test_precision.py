"""fp16 variants: gated against fp32 on the probes, their own artifacts, refused when they overflow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from support import read_banking, run_cli
from tiny import text_backbone

import embedkit
from embedkit.models.probes import cosine


def test_fp16_variant_is_its_own_gated_artifact_close_to_fp32(minilm):
    fp16 = embedkit.half(minilm)
    assert fp16.name == "minilm-l6-fp16" and fp16.digest != minilm.digest
    info = fp16.manifest["precision"]
    assert info["dtype"] == "fp16" and info["parent"] == minilm.digest
    assert info["parity"]["min_cosine"] >= 0.999 and "export_key" not in fp16.manifest
    assert "Infinity" not in (fp16.path / "manifest.json").read_text()  # strict JSON for other tools
    assert embedkit.half(minilm).digest == fp16.digest  # reused, not redone
    assert embedkit.resolve("minilm-l6-fp16").digest == fp16.digest
    import onnx

    graph = onnx.load(str(fp16.onnx_path))
    weights = [t.data_type for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t == onnx.TensorProto.FLOAT16 for t in weights)  # really half precision
    texts, _ = read_banking("test", limit=200)
    a = embedkit.embed(texts, backbone=minilm).vectors
    b = embedkit.embed(texts, backbone=fp16).vectors
    assert b.dtype == np.float32 and cosine(a, b).min() >= 0.999


class Overflows(torch.nn.Module):
    """Fine in fp32; an intermediate beyond fp16's 65504 would be inf in half precision."""

    def __init__(self, scale: float = 1000.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, 8)
        self.scale = scale

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * self.scale
        h = h * h  # ~1e6 for weights ~ 1
        m = attention_mask.unsqueeze(-1).float()
        return torch.sqrt((h * m).sum(1) / m.sum(1))


class Tiny(torch.nn.Module):
    """Weights below fp16's smallest subnormal: half precision cannot represent this network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, 8)
        with torch.no_grad():
            self.emb.weight.mul_(1e-9)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)


def test_nodes_whose_activations_exceed_fp16_range_stay_fp32(tmp_path):
    import onnx

    fp32 = embedkit.export(text_backbone("overflows", Overflows), tmp_path)
    fp16 = embedkit.half(fp32, tmp_path)
    info = fp16.manifest["precision"]
    assert info["peak_activation"] > 65504 and info["fp32_nodes"]  # found by running the probes
    model = onnx.load(str(fp16.onnx_path))
    typed = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.value_info) + list(typed.input) + list(typed.output)}
    kept = [n for n in model.graph.node if n.name in info["fp32_nodes"]]
    assert {n.op_type for n in kept} >= {"Mul", "ReduceSum", "Div", "Sqrt"}
    # Out-of-range values never pass through fp16: kept nodes read and write fp32 tensors only.
    for node in kept:
        for name in list(node.input) + list(node.output):
            assert types.get(name) != onnx.TensorProto.FLOAT16, (node.name, name)
    assert any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in model.graph.node)  # the rest is fp16
    assert info["parity"]["min_cosine"] >= 0.999
    small = embedkit.half(embedkit.export(text_backbone("in-range", lambda: Overflows(scale=1.0)), tmp_path), tmp_path)
    assert small.manifest["precision"]["fp32_nodes"] == []  # nothing kept when nothing is out of range


def test_a_network_fp16_cannot_represent_is_refused_with_numbers(tmp_path):
    fp32 = embedkit.export(text_backbone("tiny", Tiny), tmp_path)
    with pytest.raises(embedkit.ExportParityError) as info:
        embedkit.half(fp32, tmp_path)
    assert info.value.parity["min_cosine"] < 0.999 and "fp16" in str(info.value)
    assert not list(tmp_path.glob("tiny-fp16/*/model.onnx"))  # nothing half-written is kept


def test_variants_of_variants_are_refused(minilm):
    with pytest.raises(ValueError, match="already a variant"):
        embedkit.half(embedkit.half(minilm))


def test_export_cli_makes_the_fp16_variant(minilm):
    run = run_cli("export", "minilm-l6", "--fp16")
    assert run.returncode == 0, run.stderr
    assert "minilm-l6-fp16" in run.stdout and "fp16 vs fp32" in run.stdout

