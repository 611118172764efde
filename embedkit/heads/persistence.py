"""One deployable model: backbone reference (artifact digest) + head, saved so loading runs no code.

A saved model is a folder::

    model.json      format, backbone name + digest, head kind + file + sha256, versions;
                    ``compact`` for a head trained on compact features (see below)
    head.skops      scikit-learn heads (skops: loads only the types it is told to trust)
    head.json, head.npz, index.faiss
                    FAISS heads: parameters, classes and labels as plain arrays, the index
                    (:mod:`embedkit.heads.faiss_files`)

A head trained on compact features (int8 / uint8 / binary / truncated, a
:class:`~embedkit.heads.compacted.CompactHead`) is saved as its inner head plus ``"compact"`` in
``model.json``: precision, dimensions and the int8 calibration with its sha256, format 2 (an
embedkit that reads format 1 only refuses it instead of feeding it floats). ``load`` rebuilds the
same Compact (the calibration's sha256 checked) and wraps the head again, so new items are made
compact exactly as the training rows were.

``load`` checks every file's sha256, refuses a model whose backbone resolves to another digest
(naming both), loads skops heads with no untrusted types, and never opens a pickle or joblib
file unless the caller passes ``trust_pickle=True`` (and its sha256 still matches). Every file
the metadata names must be the file expected for the head kind, a regular file inside the
folder (:func:`embedkit.fs.paths.member`, shared with ``search`` and the model store).

``save`` refuses up front (:class:`UnsavableHeadError`) a head that ``load`` would refuse, so
every saved model loads back. ``save`` and ``save_index`` check their target before any work
(:func:`embedkit.fs.outputs.check_output`) and replace an earlier model or index crash-safely
(:func:`embedkit.fs.atomic.publish`); ``load`` and ``search`` read the earlier version back when a
replacement was interrupted between its two renames (:func:`embedkit.fs.atomic.current`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..embedder import Embedder
from ..encoders.compact import Compact
from ..errors import ArtifactError, HeadBackboneMismatchError, UnsafeModelError, UnsavableHeadError, UsageError
from ..fs.atomic import current, staged_folder
from ..fs.outputs import check_output, replaceable, stamp
from ..models.resolve import resolve
from ..models.store import ModelStore, sha256_file
from . import faiss_files
from .compacted import CompactHead
from .indexes import INDEX_FILE, INDEX_FILES, save_index, search
from .records import COMPACT_FORMAT, FORMAT, backbone_artifact, checked_files, portable_spec, read_meta, version_of

__all__ = ["INDEX_FILE", "INDEX_FILES", "MODEL_FILE", "backbone_artifact", "load", "portable_spec", "refused_types",
           "save", "save_index", "search"]

MODEL_FILE = "model.json"
# scikit-learn's own helper classes that fitted heads hold (MLP optimisers, k-NN trees and
# metrics, the trees of forests and boosting, calibrators); skops rebuilds them from their
# state like any trusted type (no code from the file runs), but does not list them as trusted.
# Exact names only: anything else (os.system, a user's class) stays refused.
SKLEARN_INTERNALS = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
})


def embedder_params(embedder: Any) -> dict[str, Any]:
    """The Embedder's parameters as ``model.json`` records them (JSON): its calibration, given or
    fitted in ``fit(X)``, as its record, so ``load`` makes rows compact with the very same ranges."""
    params = {k: v for k, v in embedder.get_params().items() if k not in ("backbone", "store")}
    embedded = getattr(embedder, "compact_", None)
    if "calibration" in params:
        cal = embedded.calibration if embedded is not None else None
        params["calibration"] = cal.to_dict() if cal is not None else None
    return params


def _split(model: Any) -> tuple[Any, Any]:
    """(Embedder, head) from a Pipeline([Embedder, head]) or a (Embedder, head) pair."""

    steps = [s for _, s in model.steps] if hasattr(model, "steps") else list(model)
    if len(steps) != 2 or not isinstance(steps[0], Embedder):
        raise TypeError("save() takes Pipeline([Embedder, head]) or (Embedder, head), both fitted")
    return steps[0], steps[1]


HEAD_FILES = {"skops": ("head.skops",), **{kind: faiss_files.FILES for kind in faiss_files.KINDS}}


def refused_types(file: Path) -> list[str]:
    """The types in a skops file outside scikit-learn's trusted set (empty: it loads safely).

    Raises:
        UnsafeModelError: ``file`` is not a skops archive (e.g. a pickle renamed); never unpickled.
    """
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=file)
    except Exception as exc:
        raise UnsafeModelError(f"{file} is not a skops file: {type(exc).__name__}: {exc}") from exc
    return [t for t in untrusted if t not in SKLEARN_INTERNALS]


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save a fitted embedder + head pipeline as a folder that :func:`load` reads back.

    ``path`` is checked before anything is written (its folder must exist; it must be new, an
    empty folder or an earlier saved model); an earlier model there is replaced crash-safely.

    Raises:
        OutputError: ``path`` is refused (see :func:`embedkit.fs.outputs.check_output`).
        UnsavableHeadError: ``load`` could not read this head back safely (a type outside
            scikit-learn's trusted set, a FAISS head with a callable ``weights``).
        UsageError: a CompactHead whose Compact does not fit the backbone's dimensions.
    """
    from sklearn.utils.validation import check_is_fitted

    embedder, head = _split(model)
    check_is_fitted(embedder, "digest_")
    check_is_fitted(head)
    final = check_output(path, "model", inputs=[getattr(embedder, "artifact_path_", None)])
    compact = None
    embedded = getattr(embedder, "compact_", None)  # an Embedder that makes compact rows itself
    if isinstance(head, CompactHead):
        compact, head = head.compact, head.head_
        if not isinstance(compact, Compact):
            raise UnsavableHeadError(f"a CompactHead's compact must be an embedkit Compact, got {type(compact).__name__}")
        if embedded is not None and embedded.describe() != compact.describe():
            raise UnsavableHeadError("the Embedder makes other compact rows than its CompactHead was trained on: "
                                     f"{embedded.tag()} vs {compact.tag()}")
        if embedded is None:
            compact.output_dim(embedder.n_features_out_)  # UsageError when it cannot apply to this backbone
    if faiss_files.kind_of(head) and callable(head.weights):
        raise UnsavableHeadError(f"a {type(head).__name__} with a callable weights cannot be saved (load would have "
                                 "to run code); use weights='uniform' or 'distance'")
    with staged_folder(final, replaceable("model")) as staging:
        if faiss_files.kind_of(head):
            kind = faiss_files.write(head, staging)
        else:
            import skops.io as sio

            kind = "skops"
            sio.dump(head, staging / "head.skops")
            refused = refused_types(staging / "head.skops")
            if refused:  # load would refuse it: say so now, not when the model is needed
                raise UnsavableHeadError(
                    f"{type(head).__name__} holds types that load() does not trust: {', '.join(refused)}; "
                    "use a scikit-learn head (embedkit.heads.training.HEADS, forests, boosting, calibration) or a FaissKNNClassifier"
                )
        manifest = {
            **stamp("model"),
            "format": FORMAT if compact is None and embedded is None else COMPACT_FORMAT,
            "backbone": {"name": embedder.backbone_name_, "digest": embedder.digest_, "spec": portable_spec(embedder.backbone)},
            "embedder": embedder_params(embedder),
            "head": {"kind": kind, "class": f"{type(head).__module__}.{type(head).__qualname__}",
                     "files": {f: sha256_file(staging / f) for f in HEAD_FILES[kind]}},
            "versions": {d: version_of(d) for d in ("embedkit", "scikit-learn", "faiss-cpu", "skops", "onnxruntime")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if compact is not None:
            manifest["compact"] = compact.describe()
        (staging / MODEL_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return final


def load(path: str | os.PathLike[str], store: str | None = None, trust_pickle: bool = False,
         backbone: str | None = None) -> Any:
    """A ``Pipeline([Embedder, head])`` that predicts from raw inputs.

    ``backbone`` (a name, spec or digest) asks for the head on that backbone's features; it must
    resolve to the very artifact the head was trained on: any other (a fine-tune of it, another
    export) is refused naming both digests.

    Raises:
        UnsafeModelError: a file's sha256 differs from the record, a file named in
            ``model.json`` is not the expected one or lies outside the folder, the head is a
            pickle and ``trust_pickle`` is False, or a skops file holds types outside the
            trusted set.
        ArtifactError: not a saved model, or its ``compact`` record is malformed, altered or
            does not fit the backbone.
        BackboneNotAvailableError: the backbone artifact is in no model store here and the
            recorded backbone does not export to the same digest (see :func:`backbone_artifact`).
        HeadBackboneMismatchError: ``backbone`` resolves to another artifact than the head's.
    """
    from sklearn.pipeline import Pipeline

    folder = current(Path(path), MODEL_FILE)
    manifest = read_meta(folder, MODEL_FILE, "model")
    head_info = manifest.get("head") or {}
    kind = head_info.get("kind")
    if kind not in ("skops", "pickle", *faiss_files.KINDS):
        raise ArtifactError(f"unknown head kind {kind!r} in {folder}")
    recorded = head_info.get("files")
    if kind == "pickle" and (not isinstance(recorded, dict) or len(recorded) != 1):
        raise UnsafeModelError(f"{folder}: a pickle head is one file, model.json names {recorded!r}")
    files = checked_files(folder, recorded, HEAD_FILES.get(kind), "model")
    compact = None
    if "compact" in manifest:
        try:
            compact = Compact.from_record(manifest.get("compact"))
        except UsageError as exc:
            raise ArtifactError(f"{folder}/{MODEL_FILE}: its compact record cannot be used: {exc}") from None
    record = manifest["backbone"]
    if backbone is not None:
        _same_features(record, backbone, store)
    artifact = backbone_artifact(record, store, needed_by=str(folder))
    embedder = Embedder(artifact.digest, store=str(ModelStore.holding(artifact).root),
                        **manifest.get("embedder", {})).fit()
    if compact is not None:
        try:
            compact.output_dim(artifact.dim)
        except UsageError as exc:
            raise ArtifactError(f"{folder}: the head's compact vectors do not fit its backbone: {exc}") from None
    if kind == "skops":
        import skops.io as sio

        file = files["head.skops"]
        refused = refused_types(file)
        if refused:
            raise UnsafeModelError(f"{file} holds types outside the trusted set: {', '.join(refused)}")
        head = sio.load(file, trusted=sio.get_untrusted_types(file=file) or None)
    elif kind in faiss_files.KINDS:
        head = faiss_files.read(kind, folder, files)
    else:
        if not trust_pickle:
            raise UnsafeModelError(
                f"{folder} holds a pickle head ({', '.join(files)}); unpickling runs code from the file. "
                "Load it only if you made it: pass trust_pickle=True; its sha256 was checked."
            )
        import pickle

        with open(next(iter(files.values())), "rb") as f:
            head = pickle.load(f)  # noqa: S301 - explicit trust, sha256 verified above
    if compact is not None:
        head = CompactHead.wrap(head, compact)
    return Pipeline([("embed", embedder), ("head", head)])


def _same_features(record: dict[str, Any], backbone: str, store: str | os.PathLike[str] | None) -> None:
    """Refuse running a head on another backbone's features (:class:`HeadBackboneMismatchError`)."""

    artifact = resolve(backbone, store)
    if artifact.digest == record["digest"]:
        return
    lineage = artifact.manifest.get("lineage") or {}
    parent = (lineage.get("parent") or {}).get("digest")
    detail = f", a fine-tune of {record.get('name')!r} (artifact {parent})" if parent == record["digest"] else ""
    raise HeadBackboneMismatchError(record["digest"], artifact.name, artifact.digest, detail)
