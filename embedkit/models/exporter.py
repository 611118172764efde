"""The exporter: torch -> ONNX export with a checker, a parity gate and a manifest.

Text and image backbones share this path; what differs per modality (probe inputs, dynamic
axes, side files such as ``tokenizer.json``) lives in :mod:`embedkit.models.probes`.

The legacy TorchScript exporter is tried first: traced with an all-ones attention mask it
gave exact BERT graphs that ran faster on CPU than the dynamo exporter's. Tracing bakes
data-dependent branches into the graph, so every candidate must pass the parity gate on
padded probes (batch 1 and 7) before it is kept; the first candidate that passes wins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from ..backbones.backbone import Backbone
from ..backbones.blocks import infer_blocks
from ..backbones.registry import get_backbone
from ..errors import ExportError, ExportParityError, MissingDependencyError
from ._commit import check_expected, commit_artifact, finish_graph, manifest, package_version
from .finetuned import find
from .importer import import_onnx
from .probes import LIMITS, Probes, passes, probes_for
from .store import MODEL, Artifact, ModelStore, sha256_file

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
OPSET = 17
FORMAT = 1  # bump when the export procedure changes what it writes


def export_key(backbone: Backbone, exporter: str = "auto", opset: int = OPSET) -> str:
    """A hash of everything that determines the exported file, computed without torch."""
    spec = backbone.spec()
    spec["preprocess"] = dict(spec["preprocess"])
    if "tokenizer" in spec["preprocess"]:
        spec["preprocess"]["tokenizer"] = sha256_file(spec["preprocess"]["tokenizer"])
    spec.pop("description", None)
    spec.pop("blocks", None)  # which blocks fine-tuning may train does not change the graph
    spec["weight_files"] = [sha256_file(p) for p in backbone.weight_files]
    if "onnx" in spec:  # ONNX-only: the file's content, not its path; no torch involved
        spec["onnx"] = dict(spec["onnx"], path=sha256_file(spec["onnx"]["path"]))
        if spec["onnx"]["reference"]:
            spec["onnx"]["reference"] = sha256_file(spec["onnx"]["reference"])
        exporter, opset = "onnx-import", 0
    payload = {
        "format": FORMAT,
        "spec": spec,
        "exporter": exporter,
        "opset": opset,
        "torch": package_version("torch") if "onnx" not in spec else None,
        "onnx": package_version("onnx"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "export", "exporting a backbone") from exc
    return torch


def export(
    backbone: Backbone | str,
    store: ModelStore | str | None = None,
    exporter: str = "auto",
    force: bool = False,
    opset: int = OPSET,
    expect: str | None = None,
) -> Artifact:
    """Export a backbone to the model store, or return the artifact already exported.

    An ONNX-only backbone (``Backbone(onnx=OnnxModel(...))``) is imported instead, without
    torch (:mod:`embedkit.models.importer`).

    Args:
        backbone: a :class:`Backbone` or a registered name / resolvable spec.
        store: the model store (default: ``$EMBEDKIT_HOME``, else the user cache folder).
        exporter: ``auto`` (TorchScript, then dynamo if it fails the gate),
            ``torchscript`` or ``dynamo``.
        force: export again even when an artifact with the same export key exists.
        expect: the sha256 the artifact must have (a saved model's backbone): any other
            result raises before anything is kept in the store.

    Raises:
        ExportParityError: no candidate export matched torch within ``LIMITS``.
        ExportError: export or ``onnx.checker`` failed.
        ArtifactMismatchError: ``expect`` is given and the export has another digest.
    """
    source = backbone if isinstance(backbone, str) else None
    if isinstance(backbone, str):
        root = store.root if isinstance(store, ModelStore) else store
        backbone = (find(backbone, root) if root is not None else None) or get_backbone(backbone)
    backbone.validate()
    if exporter not in ("auto",) + EXPORTERS:
        raise ValueError(f"exporter must be auto, {' or '.join(EXPORTERS)}; got {exporter!r}")
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    key = export_key(backbone, exporter, opset)
    if not force:
        found = store.find(backbone.name, key)
        if found is not None:
            found.verify_once()  # a corrupted model.onnx is refused, never served under its recorded digest
            check_expected(backbone, found.digest, expect)
            logger.info("reusing export %s/%s", backbone.name, found.digest[:12])
            return found
    if backbone.onnx is not None:
        return import_onnx(backbone, store, key, expect)
    torch = _import_torch()
    started = time.perf_counter()
    module = backbone.build()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{backbone.name}.build() returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    probes = probes_for(backbone)
    staging = store.staging(backbone.name)
    try:
        candidates = EXPORTERS if exporter == "auto" else (exporter,)
        failure: ExportError | None = None
        mismatch: ExportParityError | None = None
        for name in candidates:
            path = staging / MODEL
            try:
                _export_once(torch, module, probes, path, name, opset)
                finish_graph(path, backbone, probes)
                parity = probes.parity(torch, module, path)
            except ExportError as exc:
                failure = failure or exc  # the first candidate's error is the most telling
                logger.warning("%s export of %s failed: %s", name, backbone.name, exc)
                continue
            finally:
                module.eval()  # exporting can leave submodules in training mode
            parity["exporter"] = name
            if passes(parity):
                break
            mismatch = ExportParityError(backbone.name, name, parity, LIMITS)
            logger.warning("%s", mismatch)
        else:
            # A measured mismatch says more than a later candidate's crash: report it first.
            raise mismatch or failure  # type: ignore[misc]
        digest = sha256_file(staging / MODEL)
        check_expected(backbone, digest, expect)  # before anything is kept
        record = manifest(backbone, probes, digest, key, parity, opset, time.perf_counter() - started)
        record["blocks"] = _block_patterns(backbone, module)
        if source is not None and source != backbone.name:
            record["source"] = source  # the spec (a path, timm:...) that builds it again, e.g. for the torch runtime
        artifact = commit_artifact(store, staging, backbone.name, digest, record, probes)
    finally:
        store.discard(staging)
    logger.info(
        "exported %s -> %s (%s, max|diff| %.2e, min cos %.8f)", backbone.name, artifact.digest[:12],
        parity["exporter"], parity["max_abs_diff"], parity["min_cosine"],
    )
    return artifact


def _export_once(torch: Any, module: Any, probes: Probes, path: Path, exporter: str, opset: int) -> None:
    example = probes.example(torch)
    # Tracer warnings ("might not generalize") are what the parity gate settles by measurement;
    # they go to the debug log instead of the user's terminal.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_exporter(torch, module, example, probes, path, exporter, opset)
    for w in caught:
        logger.debug("%s exporter warning: %s", exporter, w.message)


def _run_exporter(torch: Any, module: Any, example: Any, probes: Probes, path: Path, exporter: str, opset: int) -> None:
    names = probes.input_names
    try:
        if exporter == "torchscript":
            dynamic: dict[str, dict[int, str]] = {n: dict(probes.dynamic_axes) for n in names}
            dynamic["embeddings"] = {0: "batch"}
            torch.onnx.export(
                module, example, str(path), input_names=names, output_names=["embeddings"],
                dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        else:
            dims = {0: torch.export.Dim("batch", min=1)}
            if 1 in probes.dynamic_axes:
                dims[1] = torch.export.Dim("sequence", min=2)
            program = torch.onnx.export(
                module, example, input_names=names, output_names=["embeddings"],
                dynamic_shapes=tuple(dict(dims) for _ in names), opset_version=max(opset, 18),
                dynamo=True, external_data=False, optimize=True, verbose=False,
            )
            program.save(str(path))
    except Exception as exc:
        raise ExportError(f"{exporter} export failed: {type(exc).__name__}: {exc}") from exc


def _block_patterns(backbone: Backbone, module: Any) -> list[str]:
    """The declared blocks, else those embedkit infers for the module (fine-tuning's ``last:N``); [] when none."""

    if backbone.blocks:
        return list(backbone.blocks)
    try:
        return list(infer_blocks(module))
    except Exception as exc:  # a record for people; the export itself does not depend on it
        logger.warning("could not infer the blocks of %s: %s: %s", backbone.name, type(exc).__name__, exc)
        return []
