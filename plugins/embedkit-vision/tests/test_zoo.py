"""Generic timm / torchvision architectures with local checkpoints (``timm:ARCH@FILE``).

timm and torchvision need torch 2.14.1 + torchvision 0.29.1 (a large CUDA build); ``make test``
runs this file in a second virtual environment that has them (``.venv-zoo``). In the main
environment only the missing-dependency behaviour is tested.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import embedkit
from embedkit.errors import InvalidBackboneError, MissingDependencyError
from embedkit.blocks import blocks_of, plan_freeze
from embedkit.testing import check_backbone

HAVE_ZOO = importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torchvision") is not None
zoo = pytest.mark.skipif(not HAVE_ZOO, reason="timm/torchvision are installed in .venv-zoo (make test runs it there)")


@pytest.mark.skipif(HAVE_ZOO, reason="timm is installed here")
def test_missing_library_names_the_extra():
    with pytest.raises(MissingDependencyError) as info:
        embedkit.get_backbone("timm:resnet18@random")
    message = str(info.value)
    assert "pip install 'embedkit-vision[zoo]'" in message and "embedkit[zoo]" not in message
    assert info.value.install == "pip install 'embedkit-vision[zoo]'"


def test_a_spec_without_weights_is_refused():
    with pytest.raises(InvalidBackboneError) as info:
        embedkit.get_backbone("timm:resnet18")
    assert "@random" in str(info.value) and "checkpoint" in str(info.value)


# The families the seed names, and a ViT; random weights (seed 0) are enough for the contract.
@zoo
@pytest.mark.parametrize("arch", [
    "vgg11", "resnet18", "inception_v3", "mobilenetv2_100", "efficientnet_b0", "vit_tiny_patch16_224",
])
def test_timm_family_passes_check_backbone(arch, tmp_path):
    backbone = embedkit.get_backbone(f"timm:{arch}@random")
    report = check_backbone(backbone, store=tmp_path)
    assert report["rules"][-1] == "preprocess-roundtrip"
    # The finetune rule ran on timm's own grouping: one step moved the last group, nothing frozen.
    assert report["finetune"]["unfreeze"] == "last:1" and report["finetune"]["changed"] >= 1
    # Random weights: inception's activations reach ~1e11, so the gate scales by the output.
    assert report["parity"]["scaled_diff"] <= 1e-4 and report["parity"]["min_cosine"] >= 0.99999


@zoo
@pytest.mark.parametrize("arch", ["resnet18", "inception_v3"])
def test_torchvision_family_passes_check_backbone(arch, tmp_path):
    backbone = embedkit.get_backbone(f"torchvision:{arch}@random")
    expected = {"resnet18": 512, "inception_v3": 2048}[arch]
    assert backbone.dim == expected
    if arch == "inception_v3":
        assert backbone.preprocess.crop == (299, 299) and backbone.preprocess.resize == 342
    report = check_backbone(backbone, store=tmp_path)
    assert report["rules"][-1] == "preprocess-roundtrip"
    assert report["finetune"]["unfreeze"] == "last:1" and report["finetune"]["changed"] >= 1


@zoo
def test_timm_checkpoint_is_loaded(tmp_path):
    import timm
    import torch

    torch.manual_seed(7)
    model = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    backbone = embedkit.get_backbone(f"timm:resnet18@{path}")
    assert backbone.weight_files == (str(path.resolve()),)
    x = torch.randn(2, 3, 224, 224)
    model.reset_classifier(0)
    with torch.inference_mode():
        np.testing.assert_allclose(backbone.build()(x).numpy(), model(x).numpy(), atol=1e-5)
        random = embedkit.get_backbone("timm:resnet18@random").build()(x).numpy()
        assert not np.allclose(random, model(x).numpy(), atol=1e-2)


@zoo
def test_torchvision_mobilenet_equals_the_builtin_on_the_same_checkpoint(tmp_path):
    """Our plain-torch MobileNetV2 and torchvision's give the same features from the same file."""
    import torch

    builtin = embedkit.get_backbone("mobilenet-v2")
    checkpoint = builtin.weight_files[0]
    generic = embedkit.get_backbone(f"torchvision:mobilenet_v2@{checkpoint}")
    assert generic.dim == builtin.dim == 1280
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(generic.build()(x).numpy(), builtin.build()(x).numpy(), atol=1e-4)


@zoo
def test_checkpoint_with_other_keys_is_refused(tmp_path):
    import torch

    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(Exception) as info:
        embedkit.get_backbone(f"timm:resnet18@{path}")
    assert "Missing key" in str(info.value) or "Unexpected key" in str(info.value)


@zoo
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100", "efficientnet_b0", "vit_tiny_patch16_224", "vgg11"])
def test_timm_blocks_are_timm_s_own_groups(arch):
    """Each block holds exactly the parameters of one of timm's fine-grained groups, in timm's order."""
    from timm.models import group_parameters

    backbone = embedkit.get_backbone(f"timm:{arch}@random")
    module = backbone.build()
    blocks = blocks_of(backbone, module)
    groups = group_parameters(module, module.group_matcher(coarse=False))
    params = dict(module.named_parameters())
    assert len(blocks) == len(groups) >= 9
    for (name, block), names in zip(blocks, groups.values()):
        assert {id(p) for p in block.parameters()} == {id(params[n]) for n in names}, name


@zoo
def test_the_same_network_has_the_same_blocks_from_timm_torchvision_and_the_plugin():
    timm_resnet = [n for n, _ in blocks_of(*_built("timm:resnet18@random"))]
    tv_resnet = [n for n, _ in blocks_of(*_built("torchvision:resnet18@random"))]
    assert tv_resnet == timm_resnet == ["conv1+bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    tv_mobilenet = blocks_of(*_built("torchvision:mobilenet_v2@random"))
    ours = blocks_of(*_built("mobilenet-v2"))
    assert [n for n, _ in ours] == ["net." + n for n, _ in tv_mobilenet] and len(ours) == 19
    for (_, a), (_, b) in zip(ours, tv_mobilenet):
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


@zoo
@pytest.mark.parametrize("arch,count,first,last", [
    ("efficientnet_b0", 18, "features.0", "features.8"),  # stem, the 16 MBConv blocks of the 7 stages, head conv
    ("convnext_tiny", 23, "features.0", "classifier"),  # stem, 18 blocks, 3 downsamplers, the head's norm
    ("vit_b_32", 14, "conv_proj+class_token+encoder.pos_embedding", "encoder.ln"),
    ("googlenet", 12, "conv1", "inception5b"),  # the auxiliary classifiers are no blocks
    ("inception_v3", 16, "Conv2d_1a_3x3", "Mixed_7c"),
])
def test_torchvision_families(arch, count, first, last):
    backbone, module = _built(f"torchvision:{arch}@random")
    names = [n for n, _ in blocks_of(backbone, module)]
    assert (len(names), names[0], names[-1]) == (count, first, last)
    plan = plan_freeze(backbone, module, "last:2")
    assert {d for _, _, d in plan.trainable} == {0, 1}


def _built(spec):
    backbone = embedkit.get_backbone(spec)
    return backbone, backbone.build()
