"""``check_backbone``: the executable plugin contract, as ``check_estimator`` is for estimators.

Plugin authors call it from their own tests::

    from embedkit.testing import check_backbone
    def test_my_backbone(tmp_path):
        check_backbone(MY_BACKBONE, store=tmp_path)

Each rule raises :class:`BackboneCheckError` naming the rule it found broken. The report lists
the rules that applied (``rules``) and those that did not, with the reason (``skipped``): an
ONNX-only backbone has no torch module, so ``build`` is skipped and its graph is checked against
the source file and, when the plugin ships them, reference outputs instead.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .backbones.backbone import Backbone, preprocess_from_json
from .backbones.blocks import blocks_of, plan_freeze
from .backbones.registry import get_backbone
from .encoder import ImageEncoder, TextEncoder
from .errors import BackboneCheckError, ExportError, ExportParityError, InvalidBackboneError, NoBlocksError
from .models.exporter import export
from .models.probes import TextProbes, probes_for
from .models.store import ModelStore

INVARIANCE_LIMIT = 1e-5
RULES = (
    "spec",
    "build",
    "output",
    "determinism",
    "finetune",
    "export",
    "dynamic-axes",
    "parity",
    "batch-invariance",
    "export-determinism",
    "preprocess-roundtrip",
)
# An ONNX-only backbone's rules, in order; ``reference`` applies when the plugin ships reference outputs.
ONNX_RULES = (
    "spec",
    "export",
    "dynamic-axes",
    "output",
    "parity",
    "determinism",
    "reference",
    "batch-invariance",
    "export-determinism",
    "preprocess-roundtrip",
)


def check_backbone(backbone: Backbone | str, store: str | Path | None = None) -> dict[str, Any]:
    """Run every rule of the backbone contract; returns a report of what was measured.

    Args:
        backbone: the backbone (or a registered name).
        store: model store for the exports (default: a temporary folder, removed afterwards).

    Raises:
        BackboneCheckError: the first rule broken, with the measured numbers.
    """
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    if store is None:
        with tempfile.TemporaryDirectory(prefix="embedkit-check-") as tmp:
            return _check(backbone, Path(tmp))
    return _check(backbone, Path(store))


def _fail(backbone: Backbone, rule: str, message: str) -> BackboneCheckError:
    return BackboneCheckError(getattr(backbone, "name", "?"), rule, message)


def _check(backbone: Backbone, root: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"backbone": getattr(backbone, "name", "?"), "rules": [], "skipped": {}}
    try:
        backbone.validate()
    except InvalidBackboneError as exc:
        raise _fail(backbone, "spec", str(exc)) from exc
    report["rules"].append("spec")
    if backbone.onnx is not None:
        return _check_onnx(backbone, root, report)
    return _check_torch(backbone, root, report)


def _check_onnx(backbone: Backbone, root: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The rules that hold without torch: the import gate's, then those on the stored artifact."""

    report["skipped"]["build"] = "ONNX-only backbone: there is no torch module to build or compare with"
    report["skipped"]["finetune"] = "ONNX-only backbone: there is no torch module to fine-tune (unfreeze='head' only)"
    try:
        artifact = export(backbone, ModelStore(root / "a"), force=True)
    except ExportError as exc:
        raise _fail(backbone, getattr(exc, "rule", "export"), str(exc)) from exc
    report["rules"] += ["export", "dynamic-axes", "output", "parity", "determinism"]
    if backbone.onnx.reference:  # type: ignore[union-attr]
        report["rules"].append("reference")
        report["reference"] = artifact.manifest["parity"]["reference"]
    else:
        report["skipped"]["reference"] = "the plugin ships no reference outputs (OnnxModel.reference)"
    report["digest"] = artifact.digest
    report["parity"] = artifact.manifest["parity"]
    return _check_artifact(backbone, artifact, TextProbes(backbone), root, report)


def _check_torch(backbone: Backbone, root: Path, report: dict[str, Any]) -> dict[str, Any]:
    import torch

    try:
        module = backbone.build()
    except Exception as exc:
        raise _fail(backbone, "build", f"build() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise _fail(backbone, "build", f"build() returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    report["rules"].append("build")

    probes = probes_for(backbone)
    feeds = probes.feeds(probes.rows())
    tensors = [torch.from_numpy(v) for v in feeds.values()]
    with torch.inference_mode():
        first = module(*tensors)
        second = module(*tensors)
    n = len(probes.items)
    kind = "texts" if backbone.modality == "text" else "images"
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != (n, backbone.dim):
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise _fail(backbone, "output", f"expected a tensor of shape ({n}, {backbone.dim}) (declared dim), got {shape}")
    if not torch.isfinite(first).all():
        raise _fail(backbone, "output", f"the module output NaN or inf on the probe {kind}")
    report["rules"].append("output")
    if not torch.equal(first, second):
        diff = float((first - second).abs().max())
        raise _fail(backbone, "determinism", f"two forward passes on the same input differ by {diff:.3g} (max abs)")
    report["rules"].append("determinism")
    report["finetune"] = _check_finetune(backbone, module, [t[:2] for t in tensors])
    report["rules"].append("finetune")

    try:
        artifact = export(backbone, ModelStore(root / "a"), force=True)
    except ExportParityError as exc:
        raise _fail(backbone, "parity", str(exc)) from exc
    except ExportError as exc:
        rule = "dynamic-axes" if "dynamic" in str(exc) else "export"
        raise _fail(backbone, rule, str(exc)) from exc
    report["rules"] += ["export", "dynamic-axes", "parity"]
    report["digest"] = artifact.digest
    report["parity"] = artifact.manifest["parity"]
    return _check_artifact(backbone, artifact, probes, root, report)


def _check_finetune(backbone: Backbone, module: Any, tensors: list[Any]) -> dict[str, Any]:
    """One Adam step with ``unfreeze="last:1"`` (``"all"`` without blocks) on a copy of the module.

    Only trainable parameters may change, and the last block's must; frozen parameters and
    every buffer (BatchNorm statistics) stay byte-identical; the output keeps its shape.
    """
    import copy

    import torch

    clone = copy.deepcopy(module)  # a builder may hand out one shared module: never train it
    try:
        plan = plan_freeze(backbone, clone, "last:1")
    except NoBlocksError:
        plan = plan_freeze(backbone, clone, "all")
    except InvalidBackboneError as exc:
        raise _fail(backbone, "finetune", str(exc)) from exc
    state = clone.state_dict(keep_vars=True)  # tied weights: two keys, one parameter
    before = {k: v.detach().clone() for k, v in state.items()}
    trainable = {id(p) for _, p, _ in plan.trainable}
    optimiser = torch.optim.Adam([p for _, p, _ in plan.trainable], lr=1e-3)
    plan.train(clone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = clone(*tensors)
        shape = (int(tensors[0].shape[0]), backbone.dim)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _fail(backbone, "finetune", f"in training mode the module returned {got}, expected {shape}")
        weights = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        (out.float() * weights).sum().backward()
    optimiser.step()
    after = clone.state_dict(keep_vars=True)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].detach())]
    wrong = [k for k in changed if id(state[k]) not in trainable]
    if wrong:
        raise _fail(backbone, "finetune", f"one step with unfreeze={str(plan.unfreeze)!r} changed frozen parameters "
                    f"or buffers (BatchNorm statistics?): {wrong[:5]}")
    last = {id(p) for p in (_last_block(backbone, clone, plan) or [p for _, p, _ in plan.trainable])}
    moved = [k for k in changed if id(state[k]) in last]
    if not moved:
        raise _fail(backbone, "finetune", f"one step with unfreeze={str(plan.unfreeze)!r} changed no parameter of "
                    f"the last block: is {(plan.blocks or ['the module'])[-1]!r} on the path to the output?")
    clone.eval()
    with torch.inference_mode():
        if tuple(clone(*tensors).shape) != shape:
            raise _fail(backbone, "finetune", "after one training step the output shape changed")
    return {"unfreeze": str(plan.unfreeze), "blocks": len(plan.blocks), "trainable": len(trainable),
            "changed": len(changed)}


def _last_block(backbone: Backbone, module: Any, plan: Any) -> list[Any]:

    return list(blocks_of(backbone, module)[-1][1].parameters()) if plan.blocks else []


def _check_artifact(backbone: Backbone, artifact: Any, probes: Any, root: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The rules on the stored artifact, whatever made it: batch invariance, export determinism, round trip."""

    items = probes.items
    encoder = _encoder(artifact)
    alone = np.stack([encoder.encode([x]).vectors[0] for x in items])
    together = encoder.encode(items).vectors
    shuffled_order = np.random.default_rng(0).permutation(len(items))
    shuffled = encoder.encode([items[i] for i in shuffled_order]).vectors[np.argsort(shuffled_order)]
    tiny = _encoder(artifact, small=True).encode(items).vectors
    worst = max(float(np.abs(alone - other).max()) for other in (together, shuffled, tiny))
    report["batch_invariance_max_abs_diff"] = worst
    if not worst <= INVARIANCE_LIMIT:
        raise _fail(
            backbone, "batch-invariance",
            f"the same item embedded alone and inside batches differs by {worst:.3g} (limit {INVARIANCE_LIMIT:g}); "
            + ("does the module ignore attention_mask?" if backbone.modality == "text"
               else "does the module mix samples (BatchNorm in training mode?)"),
        )
    report["rules"].append("batch-invariance")

    again = export(backbone, ModelStore(root / "b"), force=True)
    if again.digest != artifact.digest:
        raise _fail(
            backbone, "export-determinism",
            f"two exports of the same backbone gave different files ({artifact.digest[:12]} vs {again.digest[:12]})",
        )
    report["rules"].append("export-determinism")

    spec = backbone.preprocess.to_json()
    if preprocess_from_json(spec) != backbone.preprocess:
        raise _fail(backbone, "preprocess-roundtrip", "preprocess.to_json() does not rebuild an equal preprocessing")
    if artifact.preprocess != _resolved(backbone, artifact):
        raise _fail(backbone, "preprocess-roundtrip", "the artifact's manifest does not rebuild the backbone's preprocessing")
    if backbone.modality == "text":
        same = probes.tokenizer.encode(items).ids == encoder.tokenizer.encode(items).ids
    else:
        same = all(np.array_equal(a, encoder.processor(x)[0]) for a, x in zip(probes.rows(), items))
    if not same:
        raise _fail(backbone, "preprocess-roundtrip", "the artifact's preprocessing gives other model inputs than the backbone's")
    report["rules"].append("preprocess-roundtrip")
    return report


def _encoder(artifact: Any, small: bool = False) -> Any:

    if artifact.modality == "image":
        return ImageEncoder(artifact, threads=1, batch_size=2 if small else None)
    return TextEncoder(artifact, threads=1, batch_tokens=8 if small else None)


def _resolved(backbone: Backbone, artifact: Any) -> Any:
    """The backbone's preprocessing with file references pointing into the artifact."""
    spec = backbone.preprocess.to_json()
    if "tokenizer" in spec:
        spec["tokenizer"] = str(artifact.path / "tokenizer.json")
    return preprocess_from_json(spec)


def torch_preprocess(image: Any, preprocess: Any) -> Any:
    """The torch-side reference of an :class:`ImagePreprocess`: a ``(3, H, W)`` float tensor.

    Shorter side resized with ``torch.nn.functional.interpolate`` on float values (antialiased,
    as embedkit's own float resize), centre crop, scale to [0, 1], normalise. ``image`` is a path
    or an ``(H, W, 3)`` uint8 array. Plugin authors compare their training transform against it;
    embedkit's tests and benchmarks use it as the reference for its numpy/PIL preprocessing.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            image = np.asarray(img.convert("RGB"))
    t = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    h, w = image.shape[:2]
    size = preprocess.resize
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    if preprocess.interpolation == "nearest":
        t = F.interpolate(t, size=(nh, nw), mode="nearest-exact")[0]
    else:
        t = F.interpolate(t, size=(nh, nw), mode=preprocess.interpolation, antialias=True, align_corners=False)[0]
    ch, cw = preprocess.crop
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    t = t[:, top:top + ch, left:left + cw] / 255.0
    return (t - torch.tensor(preprocess.mean)[:, None, None]) / torch.tensor(preprocess.std)[:, None, None]
