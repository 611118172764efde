"""Blocks in the backbone contract: unfreeze values, declared and inferred blocks, the freeze plan."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import Pooled, text_backbone
from torch import nn

import embedkit
from embedkit.backbones.blocks import FreezePlan, Unfreeze, blocks_of, infer_blocks, parse_unfreeze, plan_freeze
from embedkit.errors import InvalidBackboneError, InvalidUnfreezeError, NoBlocksError
from embedkit.models.exporter import export_key


class Stack(nn.Module):
    """Input projection, 11 numbered layers (10 after 9: numeric order matters), a norm between, an output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30522, 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)) for _ in range(11))
        self.out = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids).mean(1)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def stack_backbone(**fields):
    return text_backbone("stack", Stack, dim=4, **fields)


# ----------------------------------------------------------------------------- parse_unfreeze

@pytest.mark.parametrize("spec,expected", [
    ("head", Unfreeze("head", 0)), ("all", Unfreeze("all", 0)), ("last:2", Unfreeze("last", 2)),
    ("last:12", Unfreeze("last", 12)), (" LAST:3 ", Unfreeze("last", 3)),
])
def test_parse_unfreeze(spec, expected):
    assert parse_unfreeze(spec) == expected
    assert str(parse_unfreeze(spec)) == str(expected) == spec.strip().lower()


@pytest.mark.parametrize("spec,says", [
    ("last:0", "use 'head'"), ("last:-1", "'last:N'"), ("last", "'last:N'"), ("last:two", "'last:N'"),
    ("top:2", "'last:N'"), ("", "'last:N'"), (2, "must be a string"), (None, "must be a string"),
])
def test_bad_unfreeze_values_are_typed_errors(spec, says):
    with pytest.raises(InvalidUnfreezeError) as info:
        parse_unfreeze(spec)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, embedkit.errors.EmbedkitError)


# ----------------------------------------------------------------------------- declared blocks

def test_declared_blocks_expand_in_numeric_order():
    backbone = stack_backbone(blocks=("emb", "layers.*"))
    backbone.validate()
    blocks = blocks_of(backbone, backbone.build())
    assert [name for name, _ in blocks] == ["emb"] + [f"layers.{i}" for i in range(11)]
    assert isinstance(blocks[-1][1], nn.Sequential)


def test_declared_blocks_are_json_and_not_in_the_export_key():
    plain, declared = stack_backbone(), stack_backbone(blocks=("emb", "layers.*"))
    assert "blocks" not in plain.spec()
    assert json.loads(json.dumps(declared.spec()))["blocks"] == ["emb", "layers.*"]
    assert stack_backbone(blocks=["emb", "layers.*"]).blocks == ("emb", "layers.*")  # JSON lists become tuples
    # Which blocks fine-tuning may train does not change the network: same export, same digest.
    assert export_key(plain) == export_key(declared)


@pytest.mark.parametrize("blocks,says", [
    ("layers.*", "tuple of module-path patterns"), (("layers.*", ""), "tuple of module-path patterns"),
    ((" layers.*",), "tuple of module-path patterns"), ((3,), "tuple of module-path patterns"),
])
def test_malformed_block_declarations(blocks, says):
    with pytest.raises(InvalidBackboneError) as info:
        stack_backbone(blocks=blocks).validate()
    assert says in str(info.value) and info.value.rule == "blocks"


@pytest.mark.parametrize("blocks,says", [
    (("encoder.layer.*",), "matches no submodule of Stack"),
    (("layers.*", "layers.3"), "share parameters"),
    (("emb+nothing",), "unknown: ['nothing']"),
])
def test_declared_blocks_that_do_not_fit_the_module(blocks, says):
    backbone = stack_backbone(blocks=blocks)
    with pytest.raises(InvalidBackboneError) as info:
        blocks_of(backbone, backbone.build())
    assert says in str(info.value)


def test_joined_block_is_one_block():
    backbone = stack_backbone(blocks=("emb+layers.0", "layers.1"))
    module = backbone.build()
    blocks = blocks_of(backbone, module)
    assert [n for n, _ in blocks] == ["emb+layers.0", "layers.1"]
    params = {id(p) for p in blocks[0][1].parameters()}
    assert params == {id(p) for p in module.emb.parameters()} | {id(p) for p in module.layers[0].parameters()}


# ----------------------------------------------------------------------------- the freeze plan

def names_under(module, *prefixes):
    return [n for n, _ in module.named_parameters() if any(n.startswith(p + ".") for p in prefixes)]


def test_last_n_trains_the_last_n_blocks_and_what_follows():
    backbone = stack_backbone(blocks=("layers.*",))
    module = backbone.build()
    plan = plan_freeze(backbone, module, "last:2")
    assert isinstance(plan, FreezePlan) and plan.unfreeze == Unfreeze("last", 2)
    trainable = [n for n, _, _ in plan.trainable]
    assert trainable == names_under(module, "layers.9", "layers.10", "out")
    depths = {n: d for n, _, d in plan.trainable}
    assert {depths[n] for n in names_under(module, "layers.10", "out")} == {0}
    assert {depths[n] for n in names_under(module, "layers.9")} == {1}
    assert all(p.requires_grad == (n in trainable) for n, p in module.named_parameters())
    assert plan.frozen == [n for n, _ in module.named_parameters() if n not in trainable]
    # Before the first block: deeper than every block, so only 'all' trains the embedding.
    assert "emb.weight" not in {n for n, _, _ in plan_freeze(backbone, module, "last:11").trainable}
    every = {n: d for n, _, d in plan_freeze(backbone, module, "all").trainable}
    assert every["emb.weight"] == 11 and every["layers.0.0.weight"] == 10
    assert all(p.requires_grad for p in module.parameters())


def test_head_trains_nothing_of_the_backbone():
    backbone = stack_backbone(blocks=("layers.*",))
    module = backbone.build()
    plan = plan_freeze(backbone, module, "head")
    assert plan.trainable == [] and not any(p.requires_grad for p in module.parameters())
    plan.train(module)
    assert not any(m.training for m in module.modules())


def test_last_n_beyond_the_blocks_names_the_count():
    backbone = stack_backbone(blocks=("layers.*",))
    with pytest.raises(InvalidUnfreezeError) as info:
        plan_freeze(backbone, backbone.build(), "last:99")
    assert "has 11 blocks" in str(info.value) and "last:1 .. last:11" in str(info.value)


def test_frozen_modules_run_in_inference_mode():
    backbone = stack_backbone(blocks=("layers.*",))
    module = backbone.build()
    plan = plan_freeze(backbone, module, "last:2")
    assert plan.train(module) is module and module.training
    assert [m.training for m in module.layers[8]] == [False] * 3
    # Unfrozen: the Linear and Dropout train; the BatchNorm keeps its statistics (Keras' advice)...
    assert [m.training for m in module.layers[10]] == [True, False, True]
    plan_freeze(backbone, module, "last:2", train_batchnorm=True).train(module)
    # ...unless asked: then the unfrozen block's BatchNorm trains, the frozen ones still not.
    assert [m.training for m in module.layers[10]] == [True, True, True]
    assert [m.training for m in module.layers[8]] == [False] * 3


# ----------------------------------------------------------------------------- no blocks

def test_a_custom_module_has_no_blocks_but_head_and_all_work():
    backbone = text_backbone("custom", Pooled)
    module = backbone.build()
    assert infer_blocks(module) == ()
    with pytest.raises(NoBlocksError) as info:
        plan_freeze(backbone, module, "last:1")
    message = str(info.value)
    assert "'custom'" in message and "Pooled" in message and "blocks=(" in message
    assert isinstance(info.value, ValueError)
    assert plan_freeze(backbone, module, "head").trainable == []
    every = plan_freeze(backbone, module, "all")
    assert [(n, d) for n, _, d in every.trainable] == [("emb.weight", 0)] and every.blocks == []


def test_an_onnx_only_backbone_has_no_blocks():
    from embedkit_paraphrase_onnx import backbone as onnx_backbone

    backbone = onnx_backbone()
    with pytest.raises(NoBlocksError) as info:
        plan_freeze(backbone, None, "last:2")
    assert "ONNX-only" in str(info.value) and backbone.name in str(info.value)
    plan = plan_freeze(backbone, None, "head")  # a head on its frozen features still trains
    assert plan.trainable == [] and plan.train(None) is None
    with pytest.raises(InvalidUnfreezeError) as info:
        plan_freeze(backbone, None, "all")
    assert "use 'head'" in str(info.value)
    with pytest.raises(InvalidBackboneError) as info:
        embedkit.Backbone(**{**{k: getattr(backbone, k) for k in ("name", "modality", "dim", "preprocess",
                                                                   "weights", "license", "onnx")},
                             "blocks": ("encoder.layer.*",)}).validate()
    assert info.value.rule == "blocks"


def test_the_manifest_records_declared_or_inferred_blocks(tmp_path):
    declared = embedkit.export(stack_backbone(blocks=("emb", "layers.*")), tmp_path)
    assert declared.manifest["blocks"] == ["emb", "layers.*"]
    assert embedkit.export(text_backbone("custom", Pooled), tmp_path).manifest["blocks"] == []
    # Blocks are not in the export key: the same network, declared or not, is one artifact.
    assert embedkit.export(stack_backbone(), tmp_path).digest == declared.digest


class WithToken(Stack):
    """A bare parameter (a ViT's class token) that belongs to the first block."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, attention_mask) + self.token


def test_a_bare_parameter_joins_a_block():
    backbone = text_backbone("token", WithToken, dim=4, blocks=("emb+token", "layers.*"))
    module = backbone.build()
    blocks = blocks_of(backbone, module)
    assert blocks[0][0] == "emb+token" and len(blocks) == 12
    assert {id(p) for p in blocks[0][1].parameters()} == {id(module.emb.weight), id(module.token)}
    depths = {n: d for n, _, d in plan_freeze(backbone, module, "all").trainable}
    assert depths["token"] == depths["emb.weight"] == 11 and depths["out.weight"] == 0
