"""Backbones from local Hugging Face / sentence-transformers folders (no hub access)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from embedkit import Backbone, TextPreprocess

DECODER_TYPES = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "opt", "bloom", "falcon"}
T5_TYPES = {"t5", "mt5", "umt5"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "model"


def sentence_transformers_settings(folder: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers folder, if it is one."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return {}
    found: dict[str, Any] = {"normalize": False}
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            cfg = _read_json(folder / module.get("path", "") / "config.json")
            for mode, name in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                               ("mean", "pooling_mode_mean_tokens"), ("last", "pooling_mode_lasttoken")):
                if cfg.get(name):
                    found["pooling"] = mode
        elif kind.endswith("Normalize"):
            found["normalize"] = True
    st = _read_json(folder / "sentence_bert_config.json")
    if "max_seq_length" in st:
        found["max_length"] = int(st["max_seq_length"])
    return found


def folder_backbone(
    folder: str | Path,
    name: str | None = None,
    dim: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    weights: str | None = None,
    license: str | None = None,
    description: str = "",
) -> Backbone:
    """A text backbone over a local folder with ``config.json`` and ``tokenizer.json``.

    Unset options come from the folder: sentence-transformers' pooling/normalize/max length
    when present, else mean pooling (last-token for decoders), L2 normalisation on, and the
    model's position limit (at most 512) as max length.
    """
    folder = Path(folder).resolve()
    config = _read_json(folder / "config.json")
    model_type = str(config.get("model_type", ""))
    st = sentence_transformers_settings(folder)
    if pooling is None:
        pooling = st.get("pooling") or ("last" if model_type in DECODER_TYPES else "mean")
    if normalize is None:
        normalize = bool(st.get("normalize", True)) if st else True
    if max_length is None:
        limit = config.get("max_position_embeddings") or config.get("n_positions") or 512
        if model_type in {"roberta", "xlm-roberta", "camembert"}:
            limit -= 2  # positions start after the padding index
        max_length = int(st.get("max_length") or min(int(limit), 512))
    if dim is None:
        dim = int(config.get("hidden_size") or config.get("d_model") or config.get("n_embd") or 0)
    weight_files = tuple(
        sorted(str(p) for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    return FolderBackbone(
        name=name or _slug(folder.name),
        modality="text",
        dim=dim,
        preprocess=TextPreprocess(
            tokenizer=str(folder / "tokenizer.json"), max_length=max_length, pooling=pooling, normalize=normalize
        ),
        weights=weights or f"local folder {folder}",
        license=license or str(config.get("license") or "see the model folder"),
        weight_files=weight_files,
        description=description or f"{model_type or 'transformer'} from {folder.name}",
        folder=str(folder),
    )


class FolderBackbone(Backbone):
    """A backbone whose torch module is built from a local transformers folder."""

    def __init__(self, *, folder: str, **fields: Any):
        super().__init__(**fields)
        object.__setattr__(self, "folder", folder)

    def build(self) -> Any:
        from .module import build_encoder

        return build_encoder(self.folder, self.preprocess.pooling, self.preprocess.normalize)
