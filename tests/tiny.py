"""Tiny torch backbones (text and image) for tests of the export, precision, runtime and service machinery."""
from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch

import embedkit
from embedkit_text import minilm_folder

TOKENIZER = str(minilm_folder() / "tokenizer.json")  # the real MiniLM tokenizer


class Pooled(torch.nn.Module):
    """A tiny honest text encoder: embedding + masked mean."""

    def __init__(self, dim=8, seed=0):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(30522, dim)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)


def text_backbone(name: str, builder: Callable[[], Any], dim: int = 8, **fields: Any) -> embedkit.Backbone:
    """A text backbone with random weights around ``builder``, tokenised by the real tokenizer."""
    return embedkit.Backbone(
        name=name, modality="text", dim=dim, weights="random", license="MIT",
        preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=64), builder=builder, **fields,
    )


class TinyConv(torch.nn.Module):
    """A tiny image encoder: one 3x3 convolution, then a global mean: (N, 3, H, W) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, pixel_values):
        return self.conv(pixel_values).mean((2, 3))


def png(seed: int, size=(40, 48)) -> bytes:
    """A random RGB picture of ``size`` (H, W) as PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def register(backbone: embedkit.Backbone) -> None:
    """Register ``backbone`` in this process (the torch candidates look its module up by name)."""

    class Plugin:
        @embedkit.hookimpl
        def register_backbones(self, register):
            register(backbone)

    embedkit.register_plugin(Plugin(), f"{backbone.name}-test")
