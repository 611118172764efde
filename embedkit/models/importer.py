"""The importer: ONNX-only backbones into the model store, with no torch anywhere.

An :class:`~embedkit.backbones.backbone.OnnxModel` names an ONNX file, the output to use, whether that
output is already pooled, and optional reference outputs. Importing keeps only the part of the
graph that computes that output, feeds ``token_type_ids`` (if the graph has it) with zeros,
appends the declared pooling and L2 normalisation, names the result ``embeddings`` (N, dim)
float32, writes the preprocessing into the metadata and stores the file under its sha256, as an
export does. The gate measures what can be measured without torch:

- ``dynamic-axes``: the graph's batch and sequence axes are dynamic (declared and in fact);
- ``output``: (N, dim) float32, finite, on padded probe batches of size 1 and 7;
- ``parity``: equal to the source file's own output (ONNX Runtime) with the appended steps
  done in numpy, so the graph surgery cannot change a number;
- ``determinism``: two runs of the stored graph agree bit for bit;
- ``batch-invariance``: a text alone and inside padded batches of 7 gives the same vector;
- ``reference``: equal to the plugin's reference outputs, when it ships them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.backbone import Backbone, OnnxModel, TextPreprocess
from ..errors import ExportError, InvalidBackboneError
from ..hookspecs import hookimpl
from ..inputs.text import TextTokenizer, pad
from ._commit import check_expected, commit_artifact, finish_graph, manifest
from .probes import LIMITS, TextProbes, cosine, onnx_runner, passes
from .store import MODEL, Artifact, ModelStore, sha256_file

logger = logging.getLogger(__name__)

EXPORTER = "onnx-import"
ROLES = ("input_ids", "attention_mask", "token_type_ids")
FOLDER_CONFIG = "embedkit.json"
INVARIANCE_LIMIT = 1e-5  # as check_backbone's batch-invariance rule


def gate_error(rule: str, message: str) -> ExportError:
    """An :class:`ExportError` that names the gate rule it broke (``check_backbone`` reports it)."""
    exc = ExportError(f"[{rule}] {message}")
    exc.rule = rule  # type: ignore[attr-defined]
    return exc


# -- the graph ---------------------------------------------------------------------------------
def _needed(graph: Any, output: str) -> tuple[list[Any], set[str]]:
    """The nodes that compute ``output`` (in order) and every tensor name they read."""
    needed, keep = {output}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # If/Loop bodies read outer names
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    return keep[::-1], needed


def compose(backbone: Backbone) -> Any:
    """The stored graph: the source pruned to its output, then pooling/normalisation, as ``embeddings``."""
    import onnx
    from onnx import TensorProto, helper

    spec: OnnxModel = backbone.onnx  # type: ignore[assignment]
    pre: TextPreprocess = backbone.preprocess  # type: ignore[assignment]
    try:
        source = onnx.load(spec.path)
    except Exception as exc:
        raise ExportError(f"cannot read the ONNX file {spec.path}: {type(exc).__name__}: {exc}") from exc
    graph = source.graph
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ExportError(f"{spec.path} uses ONNX opset {opset}; embedkit needs >= 13 (onnx.version_converter converts it)")
    outputs = {o.name: o for o in graph.output}
    name = spec.output or graph.output[0].name
    if name not in outputs:
        raise ExportError(f"{spec.path} has no output {name!r}; its outputs are {', '.join(outputs)}")
    rank = len(outputs[name].type.tensor_type.shape.dim)
    if rank != (2 if spec.pooled else 3):
        want = "(N, dim): set pooled=False if it holds token states" if spec.pooled else "(N, L, dim) token states"
        raise ExportError(f"output {name!r} of {spec.path} has rank {rank}; pooled={spec.pooled} needs {want}")
    nodes, needed = _needed(graph, name)

    by_role = {spec.input_name(r): r for r in ROLES}
    new_nodes: list[Any] = []
    constants = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name not in needed or value.name in constants:  # old IRs list initializers as inputs
            continue
        role = by_role.get(value.name)
        if role is None:
            raise ExportError(
                f"{spec.path} needs input {value.name!r}, which embedkit does not feed "
                f"(it feeds {', '.join(ROLES[:2])}, and zeros for token_type_ids); map roles with OnnxModel(inputs=...)"
            )
        dims = value.type.tensor_type.shape.dim
        static = [axis for axis in (0, 1) if axis < len(dims) and dims[axis].HasField("dim_value")]
        if len(dims) != 2 or static:
            raise gate_error("dynamic-axes", f"input {value.name!r} of {spec.path} has {len(dims)} axes, static axes {static}; "
                             "its batch and sequence axes must be dynamic")
        dtype = value.type.tensor_type.elem_type
        if role == "token_type_ids":
            zeros = helper.make_tensor("embedkit_zero", TensorProto.INT64, [1], [0])
            new_nodes += [helper.make_node("Shape", ["input_ids"], ["embedkit_ids_shape"]),
                          helper.make_node("ConstantOfShape", ["embedkit_ids_shape"], ["embedkit_token_types"], value=zeros)]
            src = "embedkit_token_types"
        else:
            src = role
        if dtype != TensorProto.INT64:
            new_nodes.append(helper.make_node("Cast", [src], [value.name], to=dtype))
        elif src != value.name:
            new_nodes.append(helper.make_node("Identity", [src], [value.name]))

    tail, current = _tail(name, outputs[name].type.tensor_type.elem_type, spec.pooled, pre, opset)
    inits = [t for t in graph.initializer if t.name in needed]
    int64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info(r, int64, ["batch", "sequence"]) for r in ROLES[:2]]
    result = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", backbone.dim])
    new_graph = helper.make_graph(new_nodes + list(nodes) + tail, "embedkit", inputs, [result], initializer=inits)
    new_graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
    model = helper.make_model(new_graph, opset_imports=list(source.opset_import), ir_version=source.ir_version)
    model.functions.extend(source.functions)
    model.producer_name = "embedkit"
    return model


def _tail(name: str, dtype: int, pooled: bool, pre: TextPreprocess, opset: int) -> tuple[list[Any], str]:
    """Nodes from the source output to ``embeddings``: cast, pooling, L2 normalisation."""
    from onnx import TensorProto, helper

    nodes: list[Any] = []
    n = 0

    def add(op: str, inputs: list[str], **attrs: Any) -> str:
        nonlocal n
        n += 1
        out = f"embedkit_{op.lower()}_{n}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(value: Any, dtype: int = TensorProto.FLOAT) -> str:
        arr = np.asarray(value)
        return add("Constant", [], value=helper.make_tensor(f"embedkit_c{n}", dtype, list(arr.shape), arr.flatten().tolist()))

    def reduce(op: str, x: str, axis: int, keepdims: int) -> str:
        if op == "ReduceSum" or opset >= 18:  # axes became an input (ReduceSum at 13, the others at 18)
            return add(op, [x, const([axis], TensorProto.INT64)], keepdims=keepdims)
        return add(op, [x], axes=[axis], keepdims=keepdims)

    x = name if dtype == TensorProto.FLOAT else add("Cast", [name], to=TensorProto.FLOAT)
    if not pooled:
        mask3 = add("Unsqueeze", ["attention_mask", const([2], TensorProto.INT64)])
        if pre.pooling == "mean":
            maskf = add("Cast", [mask3], to=TensorProto.FLOAT)
            total = reduce("ReduceSum", add("Mul", [x, maskf]), 1, 0)
            count = add("Max", [reduce("ReduceSum", maskf, 1, 0), const(1e-9)])
            x = add("Div", [total, count])
        elif pre.pooling == "cls":
            x = add("Gather", [x, const(0, TensorProto.INT64)], axis=1)
        elif pre.pooling == "max":
            keep = add("Cast", [mask3], to=TensorProto.BOOL)
            x = reduce("ReduceMax", add("Where", [keep, x, const(-1e9)]), 1, 0)
        else:  # last real token (right padding)
            last = add("Sub", [reduce("ReduceSum", mask3, 1, 1), const([[[1]]], TensorProto.INT64)])  # (N, 1, 1)
            shape = add("Shape", [x])
            target = add("Concat", [add("Slice", [shape, const([0], TensorProto.INT64), const([1], TensorProto.INT64)]),
                                    const([1], TensorProto.INT64),
                                    add("Slice", [shape, const([2], TensorProto.INT64), const([3], TensorProto.INT64)])], axis=0)
            picked = add("GatherElements", [x, add("Expand", [last, target])], axis=1)
            x = add("Squeeze", [picked, const([1], TensorProto.INT64)])
    if pre.normalize:
        norm = reduce("ReduceL2", x, 1, 1)
        x = add("Div", [x, add("Max", [norm, const(1e-12)])])
    nodes.append(helper.make_node("Identity", [x], ["embeddings"]))
    return nodes, "embeddings"


def numpy_tail(out: np.ndarray, mask: np.ndarray, pooled: bool, pre: TextPreprocess) -> np.ndarray:
    """The appended steps in numpy (float64): the reference the composed graph is gated against."""
    x = out.astype(np.float64)
    if not pooled:
        m = mask[:, :, None].astype(np.float64)
        if pre.pooling == "mean":
            x = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        elif pre.pooling == "cls":
            x = x[:, 0]
        elif pre.pooling == "max":
            x = np.where(m > 0, x, -1e9).max(1)
        else:
            x = x[np.arange(len(x)), mask.sum(1) - 1]
    if pre.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _source_runner(spec: OnnxModel, pre: TextPreprocess) -> Any:
    """``feeds -> numpy_tail(source output)``: the source file run by ONNX Runtime as it is."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(spec.path, options, providers=["CPUExecutionProvider"])
    output = spec.output or session.get_outputs()[0].name
    names = {i.name: i for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        given = {}
        for role in ROLES:
            graph_name = spec.input_name(role)
            if graph_name in names:
                value = feeds.get(role, np.zeros_like(feeds["input_ids"]))
                given[graph_name] = value.astype(np.int32) if names[graph_name].type == "tensor(int32)" else value
        out = session.run([output], given)[0]
        return numpy_tail(out, feeds["attention_mask"], spec.pooled, pre)

    return run


# -- the gate ----------------------------------------------------------------------------------
def gate(backbone: Backbone, path: Path, probes: TextProbes) -> dict[str, Any]:
    """Measure the stored graph at ``path``; raise :func:`gate_error` naming the first rule broken."""
    spec: OnnxModel = backbone.onnx  # type: ignore[assignment]
    stored = onnx_runner(path, probes.rank)
    try:
        parity = probes.compare(stored, _source_runner(spec, backbone.preprocess), "the source ONNX file")  # type: ignore[arg-type]
    except ExportError as exc:
        text = str(exc)
        rule = "dynamic-axes" if "dynamic" in text else "output"
        raise gate_error(rule, text) from exc
    parity["exporter"] = EXPORTER
    parity["against"] = "the source ONNX file (ONNX Runtime) with the appended steps in numpy"
    if not passes(parity):
        raise gate_error("parity", f"the stored graph differs from the source file: max |diff| {parity['max_abs_diff']:.3g}, "
                         f"min cosine {parity['min_cosine']:.8f} (limits {LIMITS})")
    for batch in probes.batches()[-2:]:
        feeds = probes.feeds(batch)
        if not np.array_equal(stored(feeds), stored(feeds)):
            raise gate_error("determinism", "two runs of the stored graph on the same batch differ")
    rows = probes.rows()
    alone = np.concatenate([stored(probes.feeds([r])) for r in rows])
    worst = max(float(np.abs(stored(probes.feeds(rows[:7])) - alone[:7]).max()),
                float(np.abs(stored(probes.feeds(rows[-7:][::-1])) - alone[-7:][::-1]).max()))
    parity["batch_invariance_max_abs_diff"] = worst
    if not worst <= INVARIANCE_LIMIT:
        raise gate_error("batch-invariance", f"a text alone and inside a padded batch of 7 differs by {worst:.3g} "
                         f"(limit {INVARIANCE_LIMIT:g}): does the graph ignore attention_mask, or mix the batch's rows?")
    parity["reference"] = reference_check(backbone, stored) if spec.reference else None
    return parity


def reference_check(backbone: Backbone, run: Any) -> dict[str, Any]:
    """The stored graph vs the plugin's reference outputs (``texts``, ``embeddings`` in a .npz)."""

    spec: OnnxModel = backbone.onnx  # type: ignore[assignment]
    with np.load(spec.reference, allow_pickle=False) as data:
        texts, expected = [str(t) for t in data["texts"]], data["embeddings"].astype(np.float64)
    ids = TextTokenizer(backbone.preprocess).encode(texts).ids  # type: ignore[arg-type]
    got = np.concatenate([run(pad(ids[i:i + 16])) for i in range(0, len(ids), 16)])
    if got.shape != expected.shape:
        raise gate_error("reference", f"{len(texts)} reference texts gave shape {got.shape}, the reference holds {expected.shape}")
    diff = float(np.abs(got - expected).max())
    result = {"texts": len(texts), "max_abs_diff": diff, "min_cosine": float(cosine(got, expected).min())}
    if diff > LIMITS["max_abs_diff"]:
        raise gate_error("reference", f"the outputs differ from the plugin's reference by {diff:.3g} (limit {LIMITS['max_abs_diff']:g})")
    return result


def import_onnx(backbone: Backbone, store: ModelStore, key: str, expect: str | None = None) -> Artifact:
    """Compose, gate and store an ONNX-only backbone (see the module docstring); no torch.

    Raises:
        ExportError: the graph cannot be composed or breaks a gate rule (``.rule`` names it).
        ArtifactMismatchError: ``expect`` is given and the stored graph would have another digest
            (nothing is kept).
    """
    import onnx

    started = time.perf_counter()
    probes = TextProbes(backbone)
    staging = store.staging(backbone.name)
    try:
        model = compose(backbone)
        path = staging / MODEL
        onnx.save(model, str(path))
        del model
        finish_graph(path, backbone, probes)
        parity = gate(backbone, path, probes)
        digest = sha256_file(path)
        check_expected(backbone, digest, expect)
        record = manifest(backbone, probes, digest, key, parity, 0, time.perf_counter() - started)
        record["opset"] = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                                  if o.domain in ("", "ai.onnx")), None)
        record["source_onnx"] = {"path": backbone.onnx.path, "sha256": sha256_file(backbone.onnx.path),  # type: ignore[union-attr]
                                   "output": backbone.onnx.output, "pooled": backbone.onnx.pooled}  # type: ignore[union-attr]
        artifact = commit_artifact(store, staging, backbone.name, digest, record, probes)
    finally:
        store.discard(staging)
    logger.info("imported ONNX-only %s -> %s (vs source max|diff| %.2e)", backbone.name, artifact.digest[:12],
                parity["max_abs_diff"])
    return artifact


# -- a bare folder: model.onnx + tokenizer.json (+ embedkit.json) -------------------------------
def folder_backbone(folder: str | Path) -> Backbone | None:
    """The ONNX-only backbone of a folder holding ``model.onnx`` and ``tokenizer.json``, else None.

    Declarations come from an optional ``embedkit.json`` beside them, all keys optional:
    ``name`` (default: the folder's name, lower-cased), ``output`` (default: the first output),
    ``pooled`` (default: True when that output has rank 2), ``pooling`` (default ``mean``),
    ``normalize`` (default False: vectors as the graph gives them), ``max_length`` (default: the
    tokenizer's truncation length, else 512), ``dim`` (default: the output's last axis),
    ``inputs``, ``reference`` (relative to the folder), ``weights``, ``license``, ``description``.

    Raises:
        InvalidBackboneError: ``embedkit.json`` is unreadable or the dimension cannot be known.
    """
    import re

    import onnx

    root = Path(folder)
    if not ((root / MODEL).is_file() and (root / "tokenizer.json").is_file()):
        return None
    config: dict[str, Any] = {}
    if (root / FOLDER_CONFIG).is_file():
        try:
            config = json.loads((root / FOLDER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidBackboneError("onnx", f"unreadable {root / FOLDER_CONFIG}: {exc}") from exc
    graph = onnx.load(str(root / MODEL), load_external_data=False).graph
    outputs = {o.name: o for o in graph.output}
    output = config.get("output") or graph.output[0].name
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in outputs[output].type.tensor_type.shape.dim] if output in outputs else []
    dim = config.get("dim") or (dims[-1] if dims else None)
    if not dim:
        raise InvalidBackboneError("dim", f"the dimension of output {output!r} of {root / MODEL} is not static: "
                                   f"write {{\"dim\": D}} in {root / FOLDER_CONFIG}")
    tokenizer = json.loads((root / "tokenizer.json").read_text())
    max_length = config.get("max_length") or ((tokenizer.get("truncation") or {}).get("max_length")) or 512
    name = config.get("name") or re.sub(r"[^a-z0-9._-]+", "-", root.resolve().name.lower()).strip("-._") or "onnx-model"
    reference = str(root / config["reference"]) if config.get("reference") else ""
    return Backbone(
        name=name, modality="text", dim=int(dim),
        preprocess=TextPreprocess(tokenizer=str(root / "tokenizer.json"), max_length=int(max_length),
                                  pooling=config.get("pooling", "mean"), normalize=bool(config.get("normalize", False))),
        weights=config.get("weights", str(root.resolve())), license=config.get("license", "unknown"),
        description=config.get("description", f"ONNX-only model from {root.resolve()}"),
        onnx=OnnxModel(path=str(root / MODEL), output=output, pooled=config.get("pooled", len(dims) == 2),
                       inputs=config.get("inputs", {}), reference=reference),
    )


@hookimpl(tryfirst=True)
def resolve_backbone(spec: str) -> Backbone | None:
    """embedkit's own resolver (a default plugin, see :data:`embedkit.backbones.registry.DEFAULT_PLUGINS`):
    a folder holding ``model.onnx`` and ``tokenizer.json`` (see :func:`folder_backbone`)."""
    return folder_backbone(spec) if os.path.isdir(spec) else None
