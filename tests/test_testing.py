"""check_backbone passes a good backbone and names the rule each broken one breaks."""
import pytest
import torch

import embedkit
from embedkit.testing import check_backbone
from tiny import Pooled, text_backbone


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
