"""A backbone's ordered blocks, and which parameters fine-tuning trains.

``unfreeze`` says how much of the pretrained network a fine-tune trains:

- ``head``: nothing of the backbone (only the new head);
- ``last:N``: the last N blocks (input to output order), the hybrid of transfer learning;
- ``all``: every parameter.

A block is a module (or a few modules joined by ``+``) of what ``Backbone.build()`` returns. A
backbone declares them (``Backbone(blocks=(...))``), else :func:`infer_blocks` knows:

- transformers encoders and decoders (BERT, RoBERTa, XLM-R, DistilBERT, MPNet, DeBERTa, T5,
  GPT-2, Llama, ...): the embeddings first (one block: the modules before the layer stack that
  hold an ``nn.Embedding``), then each layer of the stack. all-MiniLM-L6-v2 thus has 7 blocks,
  ``model.embeddings`` and ``model.encoder.layer.0`` .. ``.5``;
- embedkit-vision's MobileNetV2 (``features``: stem conv, 17 inverted residuals, last 1x1 conv:
  19) and EfficientNet-Lite (``efficientnet-lite-pytorch``: stem, 16 MBConv blocks, head conv: 18);
- timm models: timm's own fine-grained grouping, ``model.group_matcher(coarse=False)``, the
  grouping timm's layer-wise learning-rate decay uses (timm merges a head conv or final norm
  into the last group);
- torchvision models: ResNets (stem, then each residual block, as timm groups them), ViTs (stem,
  each encoder layer, final norm), networks with ``features`` (MobileNetV2/V3, EfficientNet,
  ConvNeXt, Swin, VGG, DenseNet: each element, a stage of identical blocks split into its
  blocks, then what follows ``features``), others (Inception, GoogLeNet, ShuffleNet, RegNet,
  MNASNet) their top-level modules with Sequentials opened and auxiliary classifiers left out.

Blocks without parameters (a pooling layer) are skipped: there is nothing in them to train.
torch is imported inside functions only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import InvalidBackboneError, InvalidUnfreezeError, NoBlocksError
from ._known_blocks import infer_blocks

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .backbone import Backbone

__all__ = ["FreezePlan", "Group", "Unfreeze", "blocks_of", "infer_blocks", "parse_unfreeze", "plan_freeze",
           "resolve_blocks"]

KINDS = ("head", "last", "all")
_LAST = re.compile(r"^last:(\d+)$")


@dataclass(frozen=True)
class Unfreeze:
    """A parsed ``unfreeze`` value: ``kind`` is ``head`` | ``last`` | ``all``; ``n`` the block count of ``last``."""

    kind: str
    n: int = 0

    def __str__(self) -> str:
        return f"last:{self.n}" if self.kind == "last" else self.kind


def parse_unfreeze(spec: str | Unfreeze) -> Unfreeze:
    """``"head"`` | ``"all"`` | ``"last:N"`` (N >= 1) -> :class:`Unfreeze`.

    Raises:
        InvalidUnfreezeError: anything else (``last:0``, ``last:-1``, ``last``, ``top:2``, a number).
    """
    if isinstance(spec, Unfreeze):
        if spec.kind not in KINDS or (spec.kind == "last") != (spec.n > 0) or spec.n < 0:
            raise InvalidUnfreezeError(f"invalid Unfreeze{(spec.kind, spec.n)!r}: use parse_unfreeze('last:2')")
        return spec
    if not isinstance(spec, str):
        raise InvalidUnfreezeError(f"unfreeze must be a string, 'head', 'all' or 'last:N', got {spec!r}")
    text = spec.strip().lower()
    if text in ("head", "all"):
        return Unfreeze(text, 0)
    match = _LAST.match(text)
    if match is None:
        raise InvalidUnfreezeError(
            f"unfreeze must be 'head' (train only the head), 'last:N' (the last N blocks, N >= 1) or 'all', got {spec!r}")
    n = int(match.group(1))
    if n < 1:
        raise InvalidUnfreezeError(f"unfreeze={spec!r} trains no block: use 'head' for that, or 'last:N' with N >= 1")
    return Unfreeze("last", n)


# --------------------------------------------------------------------------- resolving patterns

def _expand(names: list[str], pattern: str) -> list[str]:
    """Module paths matching ``pattern`` (``*`` = one segment), in numeric order of the ``*`` segments."""
    if "*" not in pattern:
        return [pattern] if pattern in names else []
    parts = pattern.split(".")
    found = []
    for name in names:
        segments = name.split(".") if name else []
        if len(segments) == len(parts) and all(p == "*" or p == s for p, s in zip(parts, segments)):
            found.append(name)
    stars = [i for i, p in enumerate(parts) if p == "*"]
    if all(name.split(".")[i].isdigit() for name in found for i in stars):
        return sorted(found, key=lambda n: [int(n.split(".")[i]) for i in stars])
    return found  # named children (torchvision's 'encoder_layer_0'...): registration order


class Group:
    """Several modules (or bare parameters, such as a ViT's class token) that form one block (``a+b``)."""

    def __init__(self, members: list[Any]):
        self.members = members

    def parameters(self) -> Iterable[Any]:
        for member in self.members:
            if hasattr(member, "parameters"):
                yield from member.parameters()
            else:
                yield member

    def modules(self) -> Iterable[Any]:
        for member in self.members:
            if hasattr(member, "modules"):
                yield from member.modules()


def resolve_blocks(module: "nn.Module", patterns: Iterable[str]) -> list[tuple[str, Any]]:
    """The blocks ``patterns`` name in ``module``: ``[(path, submodule)]``, input to output.

    A joined entry ``a+b`` gives one block whose module is a :class:`Group`. Blocks without
    parameters are skipped.

    Raises:
        InvalidBackboneError: a pattern that matches no submodule, or a module in two blocks.
    """
    names = [name for name, _ in module.named_modules()]
    params = dict(module.named_parameters())
    blocks: list[tuple[str, Any]] = []
    for pattern in patterns:
        parts = pattern.split("+")
        if len(parts) > 1 or (pattern not in names and pattern in params):
            missing = [p for p in parts if p not in names and p not in params]
            if missing or any("*" in p for p in parts):
                raise InvalidBackboneError(
                    "blocks", f"block {pattern!r}: each part of a joined block must be a module or parameter "
                    f"path of {type(module).__name__}, without '*' (unknown: {missing})")
            members = [module.get_submodule(p) if p in names else params[p] for p in parts]
            blocks.append((pattern, Group(members)))
            continue
        paths = _expand(names, pattern)
        if not paths:
            raise InvalidBackboneError(
                "blocks", f"block pattern {pattern!r} matches no submodule of {type(module).__name__} "
                f"(its top-level modules: {[n for n in names if n and '.' not in n]})")
        blocks.extend((path, module.get_submodule(path)) for path in paths)
    blocks = [(name, block) for name, block in blocks if any(True for _ in block.parameters())]
    owner: dict[int, int] = {}
    for k, (name, block) in enumerate(blocks):
        for param in block.parameters():
            if owner.setdefault(id(param), k) != k:
                raise InvalidBackboneError(
                    "blocks", f"blocks {blocks[owner[id(param)]][0]!r} and {name!r} share parameters: "
                    "blocks must not overlap")
    return blocks


def blocks_of(backbone: "Backbone", module: "nn.Module | None") -> list[tuple[str, Any]]:
    """The ordered blocks of ``module`` (what ``backbone.build()`` returned), input to output.

    Returns ``[(path, block)]``: ``block`` is the submodule at ``path`` or, for a joined
    ``a+b`` entry, a :class:`Group` (``parameters()``, ``modules()``). Declared
    ``backbone.blocks`` win; else :func:`infer_blocks`.

    Raises:
        NoBlocksError: an ONNX-only backbone, or none declared and none inferable.
        InvalidBackboneError: a declared pattern that matches nothing, or overlapping blocks.
    """
    if getattr(backbone, "onnx", None) is not None:
        raise NoBlocksError(backbone.name, "an ONNX-only backbone has no torch module to train")
    patterns = tuple(backbone.blocks) or infer_blocks(module)
    if not patterns:
        raise NoBlocksError(backbone.name, f"none declared, and embedkit infers none for a {type(module).__name__}")
    blocks = resolve_blocks(module, patterns)
    if not blocks:
        raise NoBlocksError(backbone.name, f"the blocks {list(patterns)} hold no parameters")
    return blocks


@dataclass
class FreezePlan:
    """Which parameters a fine-tune trains, and how the module runs while training.

    Attributes:
        unfreeze: the parsed ``unfreeze`` value.
        blocks: block paths, input to output (empty for ``head`` / ``all`` on a backbone without blocks).
        trainable: ``[(name, parameter, depth)]`` in ``named_parameters`` order; depth 0 is the
            last block, 1 the one before... Parameters outside every block: after the last
            block depth 0, between two blocks the depth of the next one, before the first block
            ``len(blocks)`` (so ``last:len(blocks)`` leaves them frozen and ``all`` trains them).
        frozen: names of the parameters left frozen (``requires_grad=False``).
        frozen_modules: paths of the outermost modules whose parameters are all frozen; they run
            in inference mode (dropout off, BatchNorm statistics fixed).
        train_batchnorm: whether BatchNorm layers in the trained part update their running
            statistics (False by default, as Keras' fine-tuning guide advises).
    """

    unfreeze: Unfreeze
    blocks: list[str]
    trainable: list[tuple[str, Any, int]]
    frozen: list[str]
    frozen_modules: list[str] = field(default_factory=list)
    train_batchnorm: bool = False

    def train(self, module: "nn.Module | None") -> "nn.Module | None":
        """``module.train()``, then frozen modules and (unless ``train_batchnorm``) every BatchNorm back to eval."""
        if module is None:  # an ONNX-only backbone: nothing of it trains
            return None
        from torch import nn

        module.train()
        for path in self.frozen_modules:
            module.get_submodule(path).eval()
        if not self.train_batchnorm:
            for child in module.modules():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    child.eval()
        return module


def _depths(module: "nn.Module", blocks: list[tuple[str, Any]]) -> dict[str, int]:
    """Depth per parameter name (see :class:`FreezePlan`)."""
    count = len(blocks)
    block_of = {id(p): i for i, (_, block) in enumerate(blocks) for p in block.parameters()}
    named = list(module.named_parameters())
    index = [block_of.get(id(p)) for _, p in named]
    depths: dict[str, int] = {}
    for k, (name, _) in enumerate(named):
        if index[k] is not None:
            depths[name] = count - 1 - index[k]
            continue
        prev = next((i for i in reversed(index[:k]) if i is not None), None)
        nxt = next((i for i in index[k + 1:] if i is not None), None)
        if prev is None:
            depths[name] = count
        elif nxt is None or prev == count - 1:
            depths[name] = 0
        else:
            depths[name] = count - 1 - nxt
    return depths


def plan_freeze(backbone: "Backbone", module: "nn.Module | None", unfreeze: str | Unfreeze,
                *, train_batchnorm: bool = False) -> FreezePlan:
    """Freeze ``module`` for ``unfreeze`` (sets ``requires_grad``) and return the :class:`FreezePlan`.

    ``head``: no parameter of the backbone trains. ``last:N``: the parameters of the last N
    blocks (and those after the last block). ``all``: every parameter.

    Raises:
        InvalidUnfreezeError: a bad ``unfreeze`` value, or ``last:N`` beyond the number of blocks.
        NoBlocksError: ``last:N`` on a backbone without blocks (``head`` and ``all`` work).
    """
    spec = parse_unfreeze(unfreeze)
    if module is None:  # an ONNX-only backbone: a head on its frozen features is all that trains
        if spec.kind == "last":
            blocks_of(backbone, module)  # raises NoBlocksError naming the backbone
        if spec.kind != "head":
            raise InvalidUnfreezeError(
                f"unfreeze={str(spec)!r}: backbone {backbone.name!r} has no torch module, so none of it "
                "can train; use 'head'")
        return FreezePlan(spec, [], [], [])
    blocks: list[tuple[str, Any]] = []
    if spec.kind == "last":
        blocks = blocks_of(backbone, module)
        if spec.n > len(blocks):
            raise InvalidUnfreezeError(
                f"unfreeze='last:{spec.n}' asks for more blocks than backbone {backbone.name!r} has: "
                f"it has {len(blocks)} blocks; use last:1 .. last:{len(blocks)}, or 'all'")
    elif spec.kind == "all":
        try:
            blocks = blocks_of(backbone, module)
        except NoBlocksError:
            blocks = []  # every parameter trains; depth 0 for all
    depths = _depths(module, blocks) if blocks else {n: 0 for n, _ in module.named_parameters()}
    limit = {"head": 0, "last": spec.n, "all": len(blocks) + 1}[spec.kind]
    trainable, frozen = [], []
    for name, param in module.named_parameters():
        keep = spec.kind == "all" or depths[name] < limit
        param.requires_grad_(keep)
        (trainable.append((name, param, depths[name])) if keep else frozen.append(name))
    return FreezePlan(spec, [n for n, _ in blocks], trainable, frozen,
                      _frozen_modules(module), train_batchnorm)


def _frozen_modules(module: "nn.Module") -> list[str]:
    """Outermost modules whose parameters (at least one) are all frozen."""
    paths: list[str] = []
    for name, child in module.named_modules():
        if paths == [""]:
            break  # the whole module is frozen
        if any(name == p or name.startswith(p + ".") for p in paths):
            continue
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            paths.append(name)
    return paths
