"""What an export and an import share: the graph's final check and metadata, the manifest,
and the commit of a staged folder into the model store. Both :mod:`.exporter` (torch) and
:mod:`.importer` (ONNX-only) end here, so the two cannot drift in what an artifact holds."""
from __future__ import annotations

import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ..backbones.backbone import Backbone
from ..backbones.registry import registry
from ..errors import ArtifactMismatchError, ExportError
from ..version import __version__
from .probes import Probes
from .store import MANIFEST, SCHEMA, Artifact, ModelStore, sha256_file


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def finish_graph(path: Path, backbone: Backbone, probes: Probes) -> None:
    """Check the graph, insist on dynamic axes, and write the preprocessing into its metadata."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        static = [axis for axis in probes.dynamic_axes if axis < len(dims) and dims[axis].HasField("dim_value")]
        if len(dims) != probes.rank or static:
            axes = " and ".join(probes.dynamic_axes.values())
            raise ExportError(f"input {value.name!r} has shape {shape}; its {axes} axes must be dynamic")
    # The name is left out on purpose: the same network exported under two names is one artifact.
    meta = {
        "embedkit.dim": str(backbone.dim),
        "embedkit.preprocess": json.dumps(probes.preprocess_identity(), sort_keys=True),
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the graph: {exc}") from exc
    onnx.save(model, str(path))


def manifest(
    backbone: Backbone, probes: Probes, digest: str, key: str, parity: dict[str, Any], opset: int, seconds: float
) -> dict[str, Any]:

    preprocess = probes.manifest_preprocess()
    reg = registry()
    return {
        "schema": SCHEMA,
        "name": backbone.name,
        "digest": digest,
        "modality": backbone.modality,
        "dim": backbone.dim,
        "preprocess": preprocess,
        "weights": backbone.weights,
        "license": backbone.license,
        "description": backbone.description,
        "plugin": reg.owner.get(backbone.name),
        "export_key": key,
        "exporter": parity["exporter"],
        "opset": opset,
        "parity": parity,
        "inputs": probes.input_names,
        "outputs": ["embeddings"],
        "export_seconds": round(seconds, 2),
        **({"lineage": backbone.lineage, "parent": backbone.parent} if getattr(backbone, "lineage", None) else {}),
        "versions": {
            "embedkit": __version__,
            "torch": package_version("torch"),
            "onnx": package_version("onnx"),
            "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
            "transformers": package_version("transformers"),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def commit_artifact(store: ModelStore, staging: Path, name: str, digest: str, manifest: dict[str, Any],
                    probes: Any) -> Artifact:
    """Copy the preprocessing files beside the graph, write the manifest (with each file's sha256)
    and commit the staged folder as ``<store>/<name>/<digest>``: the last step of an export or import."""
    manifest["files"] = {}
    for file, source in probes.files().items():
        shutil.copyfile(source, staging / file)
        manifest["files"][file] = sha256_file(staging / file)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return store.commit(staging, name, digest)


def check_expected(backbone: Backbone, digest: str, expect: str | None) -> None:
    """Raise :class:`ArtifactMismatchError` when ``expect`` is given and ``digest`` is another."""
    if expect is not None and digest != expect:
        raise ArtifactMismatchError(backbone.name, expect, digest)
