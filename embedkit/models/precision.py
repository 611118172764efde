"""fp16 variants of an artifact, for GPUs: half the weights' memory, tensor-core matmuls.

The fp32 graph is converted with ONNX Runtime's float16 converter, keeping float32 inputs and
outputs (callers feed and receive the same arrays as for fp32).

Range first: the fp32 graph runs on the probe batches with every intermediate tensor exposed,
and each node whose output reaches half of fp16's largest value (65504) stays in fp32 (mixed
precision), so overflow becomes a slower node instead of inf features. ONNX Runtime's CPU
provider computes most fp16 nodes by casting them up to fp32, so a CPU parity run alone would
only see the weights' rounding and never an overflow; the range check is what catches it here,
and ``embedkit tune --device cuda`` measures the real fp16 arithmetic against fp32 on the GPU.

Then, like every export, the variant must pass a parity gate before it is kept: against the
fp32 artifact on the same padded probe batches, judged by :data:`embedkit.models.probes.FP16_LIMITS`
(min cosine 0.999, scaled max |diff| 1e-2).

A variant is an artifact of its own (``<name>-fp16``, its own digest), so its features get their
own namespace in a feature store.
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import numpy as np

from ..errors import ExportError, ExportParityError
from .probes import FP16_LIMITS, onnx_runner, passes, probes_for
from .resolve import resolve
from .store import MODEL, Artifact, ModelStore

logger = logging.getLogger(__name__)

FP16_FORMAT = 1  # bump when the conversion changes what it writes
FP16_SAFE = 65504.0 / 2  # a node whose probe outputs reach this stays fp32


def activation_peaks(model: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Largest |value| each node reads or writes over ``feeds`` (fp32 graph, CPU).

    Inputs count as well as outputs: a node fed an out-of-range tensor would overflow the
    moment that tensor is cast to fp16 for it.
    """
    import onnx
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in sorted(floats):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    tensors: dict[str, float] = {}
    for batch in feeds:
        for name, value in zip(names, session.run(names, {k: v for k, v in batch.items() if k in wanted})):
            if value.size and value.dtype.kind == "f":
                tensors[name] = max(tensors.get(name, 0.0), float(np.abs(value).max()))
    return {
        node.name: max((tensors.get(t, 0.0) for t in list(node.input) + list(node.output)), default=0.0)
        for node in model.graph.node
    }


def _fuse_round_trips(model: Any) -> Any:
    """Drop fp32 -> fp16 -> fp32 Cast pairs (the converter puts them between two fp32 nodes),
    so a tensor flowing between kept nodes is never squeezed through fp16's range."""
    import onnx

    graph = model.graph
    typed = onnx.shape_inference.infer_shapes(model).graph
    fp32 = {v.name for v in list(typed.value_info) + list(typed.input)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    # Casts from an fp32 tensor to fp16 (not e.g. the network's own int64 -> float mask cast).
    to = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input[0] in fp32 and
          next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT16}
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for k, node in enumerate(nodes):
        if node.op_type == "Cast" and node.input[0] in to and \
                next(a.i for a in node.attribute if a.name == "to") == onnx.TensorProto.FLOAT:
            original = to[node.input[0]].input[0]  # the fp32 tensor before the round trip
            if node.output[0] in outputs:
                node.input[0] = original  # a graph output keeps its name: fp32 -> fp32 Cast
            else:
                rename[node.output[0]] = original
                dropped.add(k)
    kept = [n for k, n in enumerate(nodes) if k not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for n in kept for name in n.input} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and n.output[0] in to and n.output[0] not in used)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in kept]
    del graph.node[:]
    graph.node.extend(copies)
    return model


def _json_number(value: float) -> float | str:
    """Plain JSON has no inf/NaN (attention masks reach -inf): those are written as strings."""
    return value if np.isfinite(value) else str(value)


def half(artifact: Artifact | str, store: ModelStore | str | None = None) -> Artifact:
    """The fp16 variant of an artifact, made and gated once, then reused from the model store.

    Raises:
        ExportParityError: the fp16 graph's features differ from fp32 beyond ``FP16_LIMITS``.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    store = store if isinstance(store, ModelStore) else ModelStore(store)
    base = resolve(artifact, store) if not isinstance(artifact, Artifact) else artifact
    if "precision" in base.manifest or "quantization" in base.manifest:
        raise ValueError(f"{base.name} is already a variant; make the fp16 variant from the fp32 artifact")
    name = f"{base.name}-fp16"
    key = f"{base.digest}:fp16:{FP16_FORMAT}"
    found = store.variants(name, "precision", key)
    if found is not None:
        return found
    started = time.perf_counter()
    staging = store.staging(name)
    try:
        fp32 = onnx.load(str(base.onnx_path))
        probes = probes_for(base)
        peaks = activation_peaks(fp32, [probes.feeds(b) for b in probes.batches()])
        keep = sorted(node for node, peak in peaks.items() if not peak < FP16_SAFE)  # NaN/inf kept too
        model = _fuse_round_trips(convert_float_to_float16(fp32, keep_io_types=True, node_block_list=keep or None))
        onnx.save(model, str(staging / MODEL))
        try:
            parity = probes.compare(onnx_runner(staging / MODEL, probes.rank),
                                    onnx_runner(base.onnx_path, probes.rank), "fp32", FP16_LIMITS)
        except ExportError as exc:
            raise ExportError(f"the fp16 variant of {base.name} is refused: {exc} "
                              "(activations beyond fp16's range of +-65504?)") from exc
        parity["exporter"] = "fp16"
        if not passes(parity, FP16_LIMITS):
            raise ExportParityError(name, "fp16", parity, FP16_LIMITS)
        result = store.commit_variant(base, staging, name, "precision", {
            "dtype": "fp16", "key": key, "parity": parity, "fp32_nodes": keep,
            "peak_activation": _json_number(max(peaks.values(), default=0.0)), "seconds": round(time.perf_counter() - started, 2)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fp16 %s -> %s (min cos %.6f)", base.name, result.digest[:12], parity["min_cosine"])
    return result
