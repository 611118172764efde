"""OpenAI's ``/v1/embeddings`` for the service: its request checks and its response body.

Beyond OpenAI's fields, a request may ask for compact vectors (:mod:`embedkit.encoders.compact`):

- ``dimensions``: an int ``1..D``: the first ``dimensions`` of each vector, renormalised to unit
  L2 norm (OpenAI's ``dimensions``; a backbone not trained for it, Matryoshka-style, loses
  quality). Not an int, below 1, above D, or sent to an image backbone: 422
  ``unsupported_dimensions``.
- ``encoding_format``: ``float`` (default) and ``base64`` (little-endian float32) as OpenAI's;
  ``int8`` / ``uint8`` (lists of ints; per-dimension ranges of a calibration the server was
  started with, ``embedkit serve --calibration FILE``; without one, 422 ``calibration_required``;
  one of another dimension count than the vectors asked for, 422 ``calibration_mismatch``) and
  ``binary`` (packed sign bits, lists of uint8 ints, ``ceil(d / 8)`` per vector, big-endian as
  ``np.packbits``). The names are sentence-transformers' ``precision`` and infinity's
  ``embedding_dtype``.

Every response says how its vectors were made, beside OpenAI's fields (which OpenAI's clients
read; they ignore the others): ``"embedkit": {"precision", "dimensions", "calibration" (the
calibration's sha256, or null), "digest" (the backbone artifact's)}``.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..encoders.calibrations import policy_record
from ..encoders.compact import Calibration, Compact
from . import bodies
from .api_error import ApiError
from .settings import Limits

FORMATS = ("float", "base64", "int8", "uint8", "binary")


@dataclass(frozen=True)
class Encoding:
    """How a request's vectors are sent: ``format`` (one of :data:`FORMATS`) and the Compact that makes them."""

    format: str = "float"
    compact: Compact = field(default_factory=Compact)
    digest: str = ""
    # the served backbone's long-text policy: {"long", "chunk_overlap", "max_chunks"} (policy_record)
    policy: dict[str, Any] = field(default_factory=lambda: policy_record({}))

    def provenance(self, dim: int) -> dict[str, Any]:
        cal = self.compact.calibration
        return {"precision": self.compact.precision, "dimensions": self.compact.output_dim(dim),
                "calibration": cal.digest if cal is not None else None, "digest": self.digest, **self.policy}


def calibration_for(calibrations: Any, digest: str, dims: int) -> Calibration:
    """The server's calibration for the artifact ``digest`` at ``dims`` dimensions, or a 422.

    ``calibrations`` are ``(digest or a prefix of one, or None, Calibration)`` pairs (None: the record
    names no artifact, offered to every backbone of its dimension count); one recorded for ``digest``
    is preferred, one recorded for another artifact is never used.
    """
    pairs = list(calibrations or ())
    mine = [c for d, c in pairs if d is not None and digest.startswith(d)] or [c for d, c in pairs if d is None]
    if not mine:
        others = "" if not calibrations else " (its --calibration records belong to other backbones)"
        raise ApiError(422, "calibration_required", "encoding_format int8 / uint8 needs per-dimension ranges "
                       f"fitted on this backbone's vectors: start the server with --calibration FILE{others}")
    fits = [c for c in mine if c.dim == dims]
    if not fits:
        have = ", ".join(str(c.dim) for c in mine)
        raise ApiError(422, "calibration_mismatch", f"the server's calibration has {have} dimensions, these vectors "
                       f"{dims}; ask for dimensions={mine[0].dim} (or a float / base64 / binary encoding_format)")
    return fits[0]


IMAGE_COMPACT = ("compact image vectors (dimensions, int8 / uint8 / binary) are a library and command-line "
                 "feature: embedkit.embed(images, backbone, dimensions=..., precision=...) or `embedkit embed "
                 "--dimensions N --precision P`")


def refuse_dimensions(served: Any) -> None:
    """422 ``unsupported_dimensions`` for an image backbone: ``/v1/embeddings`` takes texts only, and
    ``/embed`` answers float32 vectors of every dimension, so the service makes no compact image
    vectors (the library and the CLI do)."""
    if served.artifact.modality != "text":
        raise ApiError(422, "unsupported_dimensions", f"{served.name} is an image backbone and the service "
                       f"answers its {served.artifact.dim} float32 dimensions only (/v1/embeddings takes texts); "
                       f"{IMAGE_COMPACT}")


def refuse_precision(body: dict[str, Any]) -> None:
    """422 ``invalid_encoding_format`` for a ``precision`` field: OpenAI's route names it
    ``encoding_format``, and a request is never answered with floats it did not ask for."""
    if "precision" in body:
        raise ApiError(422, "invalid_encoding_format", "/v1/embeddings takes no 'precision': ask for "
                       f"'encoding_format' ({', '.join(FORMATS)}) instead", param="precision")


def check_encoding(body: dict[str, Any], served: Any, calibrations: Any = None) -> Encoding:
    """The :class:`Encoding` of a request's ``dimensions`` and ``encoding_format``, or an ApiError."""
    dim = served.artifact.dim
    dims = body.get("dimensions")
    if dims is not None:
        refuse_dimensions(served)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= dim:
            raise ApiError(422, "unsupported_dimensions", f"dimensions must be an integer from 1 to {dim} "
                           f"({served.name} gives {dim}); a backbone not trained for truncation (Matryoshka) "
                           "loses quality below it")
    fmt = body.get("encoding_format") or "float"
    if fmt not in FORMATS:
        raise ApiError(422, "invalid_encoding_format", f"encoding_format must be one of {', '.join(FORMATS)}")
    kept = dim if dims is None or dims == dim else dims
    truncate = None if kept == dim else kept
    precision = fmt if fmt in ("int8", "uint8", "binary") else "float32"
    cal = calibration_for(calibrations, served.artifact.digest, kept) if precision in ("int8", "uint8") else None
    encoder = served.encoder
    policy = policy_record(encoder.identity(), encoder.long) if hasattr(encoder, "identity") else policy_record({})
    return Encoding(fmt, Compact(truncate, precision, cal), served.artifact.digest, policy)


def check_request(body: dict[str, Any], served: Any, limits: Limits,
                  calibrations: Any = None) -> tuple[list[str], Encoding]:
    """``(texts, encoding)`` of a request to ``served`` (a text backbone), or an ApiError.

    ``calibrations``: the server's ``(digest or None, Calibration)`` pairs (``--calibration``).
    """
    refuse_precision(body)
    if body.get("dimensions") is not None:
        refuse_dimensions(served)
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
    return texts, check_encoding(body, served, calibrations)


def response(model: str, vectors: np.ndarray, tokens: int, encoding: Any) -> dict[str, Any]:
    """OpenAI's response body: one embedding per text, as ``encoding`` says (see the module
    docstring), and the ``embedkit`` record of how they were made. ``vectors``: float32 ``(N, D)``.
    ``encoding`` may be a bare format name (``float`` / ``base64``)."""
    if isinstance(encoding, str):
        encoding = Encoding(encoding)
    rows = encoding.compact.apply(vectors)
    if encoding.format == "base64":
        data: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in rows]
    else:
        data = rows.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "embedkit": encoding.provenance(vectors.shape[1])}
