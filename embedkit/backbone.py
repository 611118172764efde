"""The Backbone contract and its declarative preprocessing."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InvalidBackboneError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MODALITIES = ("text",)
POOLINGS = ("mean", "cls", "max", "last")


@dataclass(frozen=True)
class TextPreprocess:
    """How raw text becomes model input.

    Attributes:
        tokenizer: path to a Hugging Face ``tokenizer.json`` (its content, not its path,
            is part of the artifact's identity).
        max_length: tokens kept per text (special tokens included); longer texts are truncated.
        pooling: ``mean`` | ``cls`` | ``max`` | ``last`` (last real token, for decoders).
        normalize: L2-normalise the pooled embedding.
    """

    tokenizer: str
    max_length: int = 256
    pooling: str = "mean"
    normalize: bool = True
    kind: str = field(default="text", init=False)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TextPreprocess":
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(**data)

    def validate(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise InvalidBackboneError("preprocess", "TextPreprocess.tokenizer must be a path to tokenizer.json")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise InvalidBackboneError("preprocess", f"max_length must be an int >= 2, got {self.max_length!r}")
        if self.pooling not in POOLINGS:
            raise InvalidBackboneError(
                "preprocess", f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"
            )
        if not isinstance(self.normalize, bool):
            raise InvalidBackboneError("preprocess", f"normalize must be a bool, got {self.normalize!r}")


PREPROCESS_TYPES: dict[str, type] = {"text": TextPreprocess}


def preprocess_from_json(data: dict[str, Any]) -> TextPreprocess:
    """Rebuild a preprocessing dataclass from its JSON form."""
    kind = data.get("kind")
    if kind not in PREPROCESS_TYPES:
        raise InvalidBackboneError("preprocess", f"unknown preprocessing kind {kind!r}")
    return PREPROCESS_TYPES[kind].from_json(data)


@dataclass(frozen=True, kw_only=True)
class Backbone:
    """A frozen pretrained network that a plugin offers.

    Either pass ``builder`` (a zero-argument callable returning the torch module) or
    subclass and override :meth:`build`. The module maps preprocessed batches to (N, dim)
    float32 embeddings; for text it is called as ``module(input_ids, attention_mask)`` with
    int64 tensors of shape (N, L), padding on the right.

    Attributes:
        name: registry name, ``[a-z0-9][a-z0-9._-]*``.
        modality: ``text``.
        dim: embedding dimension.
        preprocess: declarative, JSON-serialisable preprocessing.
        weights: where the weights come from (package, path or URL, for people to read).
        license: the weights' license.
        weight_files: files whose *content* identifies the weights; hashed into the
            export key so new weights give a new artifact.
        description: one line for ``embedkit backbones``.
    """

    name: str
    modality: str
    dim: int
    preprocess: TextPreprocess
    weights: str
    license: str
    weight_files: tuple[str, ...] = ()
    description: str = ""
    builder: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    def build(self) -> Any:
        """Return the torch module (``eval()`` mode is set by the exporter)."""
        if self.builder is None:
            raise NotImplementedError(
                f"backbone {self.name!r} has no builder: pass builder=... or override build()"
            )
        return self.builder()

    def spec(self) -> dict[str, Any]:
        """The JSON-serialisable declaration (everything but the builder)."""
        return {
            "name": self.name,
            "modality": self.modality,
            "dim": self.dim,
            "preprocess": self.preprocess.to_json(),
            "weights": self.weights,
            "license": self.license,
            "weight_files": list(self.weight_files),
            "description": self.description,
        }

    def validate(self) -> None:
        """Raise :class:`InvalidBackboneError` naming the first broken rule."""
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise InvalidBackboneError("name", f"name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.modality not in MODALITIES:
            raise InvalidBackboneError(
                "modality", f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}"
            )
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise InvalidBackboneError("dim", f"dim must be a positive int, got {self.dim!r}")
        expected = PREPROCESS_TYPES[self.modality]
        if not isinstance(self.preprocess, expected):
            raise InvalidBackboneError(
                "preprocess",
                f"a {self.modality} backbone needs a {expected.__name__}, got {type(self.preprocess).__name__}",
            )
        self.preprocess.validate()
        for attr in ("weights", "license"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr).strip():
                raise InvalidBackboneError(attr, f"{attr} must be a non-empty string")
        if not all(isinstance(p, str) for p in self.weight_files):
            raise InvalidBackboneError("weight_files", "weight_files must be a tuple of path strings")
        try:
            json.dumps(self.spec())
        except (TypeError, ValueError) as exc:
            raise InvalidBackboneError("json", f"the declaration is not JSON-serialisable: {exc}") from exc
        if self.builder is None and type(self).build is Backbone.build:
            raise InvalidBackboneError("build", "pass builder=... or override build()")
