"""The torch side: a transformers encoder plus pooling and normalisation in one module.

Pooling lives inside the exported graph so that the artifact digest covers it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

T5_TYPES = {"t5", "mt5", "umt5"}


class PooledEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (N, D)`` pooled (and optionally L2-normalised) embeddings."""

    def __init__(self, model: nn.Module, pooling: str, normalize: bool, token_types: bool):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.token_types = token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.model(**kwargs).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        else:  # last real token (right padding)
            last = (attention_mask.sum(1) - 1).clamp(min=0)
            index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            pooled = hidden.gather(1, index).squeeze(1)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


def build_encoder(folder: str, pooling: str, normalize: bool) -> PooledEncoder:
    """Load a local transformers folder (never the hub) and wrap it with pooling."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    loader = T5EncoderModel if config.model_type in T5_TYPES else AutoModel
    # transformers draws a "Loading weights" bar on stderr; an export is embedkit's step, reported
    # by embedkit, so the bar is off while loading and the caller's setting is restored after.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = loader.from_pretrained(folder, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    token_types = getattr(config, "type_vocab_size", 0) and config.model_type not in T5_TYPES
    return PooledEncoder(model, pooling, normalize, bool(token_types)).eval()
