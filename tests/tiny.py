"""Tiny torch text backbones for tests of the export, precision and runtime machinery."""
from __future__ import annotations

from typing import Any, Callable

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
