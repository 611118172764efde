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
