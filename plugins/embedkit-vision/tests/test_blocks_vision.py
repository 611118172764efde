"""Blocks of the vision plugin's networks (inferred) and what one fine-tuning step may change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import embedkit
from embedkit import ImageProcessor
from embedkit.blocks import blocks_of, infer_blocks, plan_freeze
from embedkit.errors import InvalidUnfreezeError
from embedkit.image import probe_images


def pixels(backbone, count=2):
    processor = ImageProcessor(backbone.preprocess)
    return torch.from_numpy(np.stack([processor(image)[0] for image in probe_images(count)]))


def param_names(module, prefixes):
    return [n for n, _ in module.named_parameters() if any(n.startswith(p + ".") for p in prefixes)]


def test_mobilenet_v2_blocks_are_its_19_features():
    backbone = embedkit.get_backbone("mobilenet-v2")
    module = backbone.build()
    assert backbone.blocks == () and infer_blocks(module) == ("net.features.*",)
    blocks = blocks_of(backbone, module)
    # Stem conv, 17 inverted residuals (1+2+3+4+3+3+1), the last 1x1 conv to 1280 channels.
    assert [name for name, _ in blocks] == [f"net.features.{i}" for i in range(19)]
    assert type(blocks[1][1]).__name__ == "InvertedResidual" and blocks[-1][1][0].out_channels == 1280


def test_efficientnet_lite0_blocks_are_stem_mbconvs_head():
    backbone = embedkit.get_backbone("efficientnet-lite0")
    blocks = blocks_of(backbone, backbone.build())
    names = [name for name, _ in blocks]
    assert names == ["net._conv_stem+net._bn0"] + [f"net._blocks.{i}" for i in range(16)] + ["net._conv_head+net._bn1"]


def test_mobilenet_last_2_one_step_changes_exactly_the_last_two_blocks():
    backbone = embedkit.get_backbone("mobilenet-v2")
    module = backbone.build()
    plan = plan_freeze(backbone, module, "last:2")
    last_two = param_names(module, ["net.features.17", "net.features.18"])
    # Trainable: the two last blocks, and the ImageNet classifier after them (depth 0), which the
    # pooled embedding never uses: it gets no gradient, so no step moves it.
    assert [n for n, _, _ in plan.trainable] == last_two + ["net.classifier.1.weight", "net.classifier.1.bias"]
    assert {d for n, _, d in plan.trainable if n.startswith("net.features.18.")} == {0}
    assert {d for n, _, d in plan.trainable if n.startswith("net.features.17.")} == {1}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimiser = torch.optim.AdamW([p for _, p, _ in plan.trainable], lr=1e-3)
    plan.train(module)
    assert module.training and not module.net.features[16].training and module.net.features[17].conv[0][0].training
    module(pixels(backbone)).square().mean().backward()
    optimiser.step()
    after = module.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(last_two)
    # Frozen BatchNorm statistics, byte for byte: in the frozen blocks and (Keras' advice, the
    # default) in the trained ones too.
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.BatchNorm2d):
            assert before[f"{name}.running_mean"].numpy().tobytes() == child.running_mean.numpy().tobytes()
            assert int(child.num_batches_tracked) == int(before[f"{name}.num_batches_tracked"])


def test_trained_batchnorm_updates_only_in_unfrozen_blocks():
    backbone = embedkit.get_backbone("mobilenet-v2")
    module = backbone.build()
    plan = plan_freeze(backbone, module, "last:1", train_batchnorm=True)
    before = {k: v.clone() for k, v in module.state_dict().items() if "running_mean" in k}
    plan.train(module)
    module(pixels(backbone))
    moved = sorted(k for k, v in before.items() if not torch.equal(v, module.state_dict()[k]))
    assert moved == ["net.features.18.1.running_mean"]


def test_last_n_beyond_mobilenet_blocks():
    backbone = embedkit.get_backbone("mobilenet-v2")
    with pytest.raises(InvalidUnfreezeError) as info:
        plan_freeze(backbone, backbone.build(), "last:99")
    assert "'mobilenet-v2' has: it has 19 blocks" in str(info.value)
