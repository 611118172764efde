"""check_backbone passes a good backbone and names the rule each broken one breaks."""
import pytest
import torch
from tiny import Pooled, text_backbone

import embedkit
from embedkit.testing import check_backbone


class IgnoresMask(Pooled):
    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids).mean(1)


class Noisy(Pooled):
    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, attention_mask) + torch.rand(input_ids.shape[0], 8)


class FixedBatch(Pooled):
    def forward(self, input_ids, attention_mask):
        pooled = super().forward(input_ids, attention_mask)
        return pooled.new_zeros((int(input_ids.shape[0]), 8)) + pooled  # int() freezes the traced batch


class NonFinite(Pooled):
    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, attention_mask) / 0.0


def _backbone(builder, dim=8, name="probe-model"):
    return text_backbone(name, builder, dim)


def test_a_good_backbone_passes_every_rule(tmp_path):
    report = check_backbone(_backbone(Pooled), store=tmp_path)
    from embedkit.testing import RULES

    assert report["rules"] == list(RULES)
    assert report["skipped"] == {}  # a torch backbone: every rule applies


@pytest.mark.parametrize("builder,dim,rule", [
    (Pooled, 0, "spec"),
    (lambda: 1 / 0, 8, "build"),
    (lambda: "not a module", 8, "build"),
    (Pooled, 16, "output"),
    (NonFinite, 8, "output"),
    (Noisy, 8, "determinism"),
    (FixedBatch, 8, "dynamic-axes"),
    (IgnoresMask, 8, "batch-invariance"),
    (lambda: Pooled(seed=None), 8, "export-determinism"),
], ids=["spec", "build-raises", "build-type", "dim", "non-finite", "noisy", "fixed-batch", "ignores-mask", "unseeded"])
def test_broken_backbones_fail_the_named_rule(tmp_path, builder, dim, rule):
    with pytest.raises(embedkit.BackboneCheckError) as info:
        check_backbone(_backbone(builder, dim=dim), store=tmp_path)
    assert info.value.rule == rule, str(info.value)
    assert f"rule '{rule}'" in str(info.value)
    assert isinstance(info.value, AssertionError)


class TwoBlocks(Pooled):
    """Embedding (block 1), then a projection (block 2, the last)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.emb.register_buffer("calls", torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return self.proj(super().forward(input_ids, attention_mask))


class CountsCalls(TwoBlocks):
    def forward(self, input_ids, attention_mask):
        if self.training:
            self.emb.calls += 1  # a frozen block's buffer moves in training mode
        return super().forward(input_ids, attention_mask)


class ShrinksInTraining(TwoBlocks):
    def forward(self, input_ids, attention_mask):
        out = super().forward(input_ids, attention_mask)
        return out[:1] if self.training else out


def test_finetune_rule_trains_the_last_block_only(tmp_path):
    report = check_backbone(text_backbone("two-blocks", TwoBlocks, blocks=("emb", "proj")), store=tmp_path)
    # emb (frozen) is untouched, proj's weight and bias change, 'unused' (after the last block) gets no gradient.
    assert report["finetune"] == {"unfreeze": "last:1", "blocks": 2, "trainable": 4, "changed": 2}
    # Without blocks the rule trains everything: the same checks, with unfreeze='all'.
    report = check_backbone(_backbone(Pooled), store=tmp_path)
    assert report["finetune"] == {"unfreeze": "all", "blocks": 0, "trainable": 1, "changed": 1}


@pytest.mark.parametrize("builder,blocks,says", [
    (TwoBlocks, ("emb", "unused"), "changed no parameter of the last block: is 'unused' on the path"),
    (CountsCalls, ("emb", "proj"), "changed frozen parameters or buffers (BatchNorm statistics?): ['emb.calls']"),
    (ShrinksInTraining, ("emb", "proj"), "in training mode the module returned (1, 8), expected (2, 8)"),
    (TwoBlocks, ("emb", "encoder.layer.*"), "'encoder.layer.*' matches no submodule of TwoBlocks"),
], ids=["unused-last-block", "frozen-buffer-moves", "shape-in-training", "unmatched-pattern"])
def test_finetune_rule_names_what_broke(tmp_path, builder, blocks, says):
    with pytest.raises(embedkit.BackboneCheckError) as info:
        check_backbone(text_backbone("two-blocks", builder, blocks=blocks), store=tmp_path)
    assert info.value.rule == "finetune" and says in str(info.value), str(info.value)
