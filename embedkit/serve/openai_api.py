"""OpenAI's ``/v1/embeddings`` for the service: its request checks and its response body."""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

from . import bodies
from .api_error import ApiError
from .settings import Limits


def check_request(body: dict[str, Any], served: Any, limits: Limits) -> tuple[list[str], str]:
    """``(texts, encoding format)`` of a request to ``served`` (a text backbone), or an ApiError."""
    if served.artifact.modality != "text":
        raise ApiError(422, "wrong_modality", f"{served.name} is an image backbone; send images to /embed")
    if "input" not in body:
        raise ApiError(422, "missing_input", "'input' is required: a string or a list of strings")
    raw = body["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_type", f"input must be a string or a list of strings, got {type(raw).__name__}")
    if texts and all(isinstance(t, int) or (isinstance(t, list) and all(isinstance(x, int) for x in t))
                     for t in texts):
        raise ApiError(422, "token_ids_unsupported", "token-id arrays are not accepted: tokens of another "
                       "tokenizer would embed as garbage; send the texts")
    texts = bodies.items({"input": texts}, "input", limits)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(422, "invalid_type", f"input[{i}] must be a string, got {type(text).__name__}")
        if not text:
            raise ApiError(422, "empty_input", f"input[{i}] is an empty string")
    bodies.check_chars(texts, "input", limits)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(422, "invalid_encoding_format", "encoding_format must be 'float' or 'base64'")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims != served.artifact.dim):
        raise ApiError(422, "unsupported_dimensions", f"{served.name} gives {served.artifact.dim} dimensions only "
                       "(it is not a Matryoshka model); omit 'dimensions'")
    return texts, fmt


def response(model: str, vectors: np.ndarray, tokens: int, fmt: str) -> dict[str, Any]:
    """OpenAI's response body: one embedding per text, as floats or little-endian float32 base64."""
    if fmt == "base64":
        data = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
