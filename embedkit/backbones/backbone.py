"""The Backbone contract and its declarative preprocessing."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ..errors import InvalidBackboneError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")  # "+": fine-tunes, <base>+ft-<hash>
MODALITIES = ("text", "image")
POOLINGS = ("mean", "cls", "max", "last")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class TextPreprocess:
    """How raw text becomes model input.

    Attributes:
        tokenizer: path to a Hugging Face ``tokenizer.json`` (its content, not its path,
            is part of the artifact's identity).
        max_length: tokens kept per text (special tokens included); longer texts are truncated.
        pooling: ``mean`` | ``cls`` | ``max`` | ``last`` (last real token, for decoders).
        normalize: the embedding is L2-normalised. For a torch backbone (``builder``) this
            *declares* what the module does: embedkit does not normalise for you. For an
            ONNX-only backbone (``onnx``) embedkit appends the normalisation to the graph.
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


@dataclass(frozen=True)
class ImagePreprocess:
    """How a decoded image becomes model input: (3, H, W) float32, RGB, channels first.

    The steps, as timm's ``pretrained_cfg`` and torchvision's eval transforms declare them:
    resize so the shorter side is ``resize`` (aspect kept), centre-crop ``crop`` (height,
    width), then ``(pixel / 255 - mean) / std`` per channel. A scale/offset rule such as
    EfficientNet-Lite's ``(x - 127) / 128`` is ``mean=127/255``, ``std=128/255`` (see
    :meth:`from_scale_offset`). Transparent pixels are composited on ``background``.

    Resizing is antialiased and done in float (no uint8 rounding between passes), so it
    equals torch's ``interpolate(..., antialias=True)`` on float tensors.
    """

    crop: tuple[int, int] = (224, 224)
    resize: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    background: tuple[int, int, int] = (255, 255, 255)
    kind: str = field(default="image", init=False)

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the dataclass hashable and equal after a round trip.
        for name in ("crop", "mean", "std", "background"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_scale_offset(cls, scale: float, offset: float, **kwargs: Any) -> "ImagePreprocess":
        """The preprocessing for ``y = x * scale + offset`` on 0..255 pixels."""
        std = 1.0 / (255.0 * scale)
        mean = -offset * std
        return cls(mean=(mean,) * 3, std=(std,) * 3, **kwargs)

    @classmethod
    def from_timm_config(cls, config: dict[str, Any]) -> "ImagePreprocess":
        """From a timm data config (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``)."""
        _, height, width = config.get("input_size", (3, 224, 224))
        crop_pct = float(config.get("crop_pct") or 0.875)
        return cls(
            crop=(int(height), int(width)),
            resize=int(math.floor(min(height, width) / crop_pct)),
            interpolation=str(config.get("interpolation") or "bilinear"),
            mean=tuple(float(m) for m in config.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(s) for s in config.get("std", cls.std)),  # type: ignore[arg-type]
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImagePreprocess":
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(**data)

    def validate(self) -> None:
        def ints(value: Any, n: int) -> bool:
            return (
                isinstance(value, tuple) and len(value) == n
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            )

        if not ints(self.crop, 2) or min(self.crop) < 1:
            raise InvalidBackboneError("preprocess", f"crop must be (height, width) positive ints, got {self.crop!r}")
        if not isinstance(self.resize, int) or isinstance(self.resize, bool) or self.resize < min(self.crop):
            raise InvalidBackboneError(
                "preprocess", f"resize (shorter side) must be an int >= the crop's shorter side, got {self.resize!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidBackboneError(
                "preprocess", f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                raise InvalidBackboneError("preprocess", f"{name} must be 3 numbers (R, G, B), got {value!r}")
        if not all(s > 0 for s in self.std):
            raise InvalidBackboneError("preprocess", f"std must be positive, got {self.std!r}")
        if not ints(self.background, 3) or not all(0 <= v <= 255 for v in self.background):
            raise InvalidBackboneError("preprocess", f"background must be 3 ints in 0..255, got {self.background!r}")


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX file that already is the network: the source of an ONNX-only backbone (no torch).

    The graph must take ``input_ids`` and ``attention_mask`` (int64, shape (N, L), both axes
    dynamic; a ``token_type_ids`` input, if any, is fed zeros). embedkit keeps only the part of
    the graph that computes ``output``, then appends what the backbone declares:

    - ``pooled=True``: ``output`` already is one vector per text, shape (N, dim); the text
      preprocessing's ``pooling`` records how the graph pooled and embedkit pools nothing.
    - ``pooled=False``: ``output`` holds token states, shape (N, L, dim); embedkit appends the
      preprocessing's ``pooling`` (``mean`` | ``cls`` | ``max`` | ``last``, padding masked).
    - the preprocessing's ``normalize=True``: embedkit appends an L2 normalisation (harmless
      when the graph already normalises); ``False`` leaves the vectors as the graph gives them.

    Attributes:
        path: the ``.onnx`` file (its content, not its path, is part of the identity).
        output: name of the graph output to use (e.g. ``"461"``); empty: the first output.
        pooled: whether ``output`` is already pooled (see above).
        inputs: graph input name per role, for graphs that name them differently, e.g.
            ``{"input_ids": "ids"}``; roles are ``input_ids``, ``attention_mask``, ``token_type_ids``.
        reference: optional ``.npz`` with ``texts`` (strings) and ``embeddings`` (float32, (n, dim)):
            the backbone's expected outputs, checked by the export gate and ``check_backbone``.
    """

    path: str
    output: str = ""
    pooled: bool = True
    inputs: tuple[tuple[str, str], ...] = ()
    reference: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, dict):
            object.__setattr__(self, "inputs", tuple(sorted(self.inputs.items())))
        elif isinstance(self.inputs, list):
            object.__setattr__(self, "inputs", tuple(tuple(x) for x in self.inputs))

    def input_name(self, role: str) -> str:
        return dict(self.inputs).get(role, role)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "output": self.output, "pooled": self.pooled,
                "inputs": dict(self.inputs), "reference": self.reference}

    def validate(self, modality: str) -> None:
        if modality != "text":
            raise InvalidBackboneError("onnx", "ONNX-only backbones are text backbones (image graphs need a builder for now)")
        if not isinstance(self.path, str) or not self.path.endswith(".onnx"):
            raise InvalidBackboneError("onnx", f"OnnxModel.path must be a path to a .onnx file, got {self.path!r}")
        if not isinstance(self.output, str) or not isinstance(self.pooled, bool):
            raise InvalidBackboneError("onnx", "OnnxModel.output must be a string and pooled a bool")
        roles = {"input_ids", "attention_mask", "token_type_ids"}
        unknown = [r for r, _ in self.inputs if r not in roles]
        if unknown:
            raise InvalidBackboneError("onnx", f"OnnxModel.inputs roles must be among {sorted(roles)}, got {unknown}")


Preprocess = Union[TextPreprocess, ImagePreprocess]
PREPROCESS_TYPES: dict[str, type] = {"text": TextPreprocess, "image": ImagePreprocess}


def preprocess_from_json(data: dict[str, Any]) -> Preprocess:
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
    int64 tensors of shape (N, L), padding on the right; for images as ``module(pixel_values)``
    with a float32 tensor of shape (N, 3, H, W) made by :class:`ImagePreprocess`.

    Attributes:
        name: registry name, ``[a-z0-9][a-z0-9._+-]*``.
        modality: ``text`` or ``image``.
        dim: embedding dimension.
        preprocess: declarative, JSON-serialisable preprocessing.
        weights: where the weights come from (package, path or URL, for people to read).
        license: the weights' license.
        weight_files: files whose *content* identifies the weights; hashed into the
            export key so new weights give a new artifact.
        description: one line for ``embedkit backbones``.
        onnx: an :class:`OnnxModel` instead of a builder: an ONNX-only backbone, stored and
            gated without torch.
        blocks: the module's ordered blocks, input to output, as module-path patterns relative
            to what :meth:`build` returns, e.g. ``("model.embeddings", "model.encoder.layer.*")``
            or ``("net.features.*",)``. ``*`` stands for one path segment and expands in numeric
            order; ``a+b`` makes one block of several modules (a stem's conv and its norm).
            Fine-tuning's ``unfreeze="last:N"`` trains the last N of them. Empty: embedkit infers
            them for the networks it knows (see :mod:`embedkit.backbones.blocks`). Not part of the export
            key: blocks do not change what the network computes.
    """

    name: str
    modality: str
    dim: int
    preprocess: Preprocess
    weights: str
    license: str
    weight_files: tuple[str, ...] = ()
    description: str = ""
    builder: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    onnx: OnnxModel | None = None
    blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.blocks, list):  # JSON gives lists
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def build(self) -> Any:
        """Return the torch module (``eval()`` mode is set by the exporter)."""
        if self.builder is None:
            kind = " (an ONNX-only backbone has no torch module)" if self.onnx is not None else ""
            raise NotImplementedError(
                f"backbone {self.name!r} has no builder{kind}: pass builder=... or override build()"
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
            **({"onnx": self.onnx.to_json()} if self.onnx is not None else {}),
            **({"blocks": list(self.blocks)} if self.blocks else {}),
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
        if not isinstance(self.blocks, tuple) or not all(
                isinstance(b, str) and b.strip() and b == b.strip() for b in self.blocks):
            raise InvalidBackboneError(
                "blocks", f"blocks must be a tuple of module-path patterns such as 'encoder.layer.*', got {self.blocks!r}")
        if self.blocks and self.onnx is not None:
            raise InvalidBackboneError("blocks", "an ONNX-only backbone has no torch module, so it cannot declare blocks")
        try:
            json.dumps(self.spec())
        except (TypeError, ValueError) as exc:
            raise InvalidBackboneError("json", f"the declaration is not JSON-serialisable: {exc}") from exc
        if self.onnx is not None:
            if not isinstance(self.onnx, OnnxModel):
                raise InvalidBackboneError("onnx", f"onnx must be an embedkit.OnnxModel, got {type(self.onnx).__name__}")
            self.onnx.validate(self.modality)
            if self.builder is not None:
                raise InvalidBackboneError("build", "pass either builder=... (torch) or onnx=... (ONNX-only), not both")
        elif self.builder is None and type(self).build is Backbone.build:
            raise InvalidBackboneError("build", "pass builder=... (a torch module) or onnx=embedkit.OnnxModel(...)")
