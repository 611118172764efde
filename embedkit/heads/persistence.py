"""One deployable model: backbone reference (artifact digest) + head, saved so loading runs no code.

A saved model is a folder::

    model.json      format, backbone name + digest, head kind + file + sha256, versions
    head.skops      scikit-learn heads (skops: loads only the types it is told to trust)
    head.json, head.npz, index.faiss
                    FAISS heads: parameters, classes and labels as plain arrays, the index

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
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..embedder import Embedder
from ..encoder import encoder_for
from ..errors import (
    ArtifactError,
    BackboneNotAvailableError,
    EmbedkitError,
    HeadBackboneMismatchError,
    StoreError,
    UnknownBackboneError,
    UnsafeModelError,
    UnsavableHeadError,
)
from ..features.store import FeatureStore
from ..fs.atomic import current, staged_folder
from ..fs.outputs import check_output, replaceable, stamp
from ..fs.paths import member
from ..models.exporter import export
from ..models.resolve import resolve
from ..models.store import ModelStore, sha256_file
from .knn import FaissKNNClassifier, FaissNearestNeighbors

FORMAT = 1
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _split(model: Any) -> tuple[Any, Any]:
    """(Embedder, head) from a Pipeline([Embedder, head]) or a (Embedder, head) pair."""

    steps = [s for _, s in model.steps] if hasattr(model, "steps") else list(model)
    if len(steps) != 2 or not isinstance(steps[0], Embedder):
        raise TypeError("save() takes Pipeline([Embedder, head]) or (Embedder, head), both fitted")
    return steps[0], steps[1]


HEAD_FILES = {"skops": ("head.skops",), "faiss-knn": ("head.json", "head.npz", "index.faiss")}


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
    """
    from sklearn.utils.validation import check_is_fitted

    embedder, head = _split(model)
    check_is_fitted(embedder, "digest_")
    check_is_fitted(head)
    final = check_output(path, "model", inputs=[getattr(embedder, "artifact_path_", None)])
    faiss_head = type(head) is FaissKNNClassifier
    if faiss_head and callable(head.weights):
        raise UnsavableHeadError("a FaissKNNClassifier with a callable weights cannot be saved (load would have to "
                                 "run code); use weights='uniform' or 'distance'")
    with staged_folder(final, replaceable("model")) as staging:
        if faiss_head:
            import faiss

            kind = "faiss-knn"
            (staging / "head.json").write_text(json.dumps(head.get_params(), sort_keys=True))
            np.savez(staging / "head.npz", classes=np.asarray(head.classes_).astype(str),
                     y=head._y, n_features=np.asarray(head.n_features_in_))
            faiss.write_index(head.nn_._index, str(staging / "index.faiss"))
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
            "format": FORMAT,
            "backbone": {"name": embedder.backbone_name_, "digest": embedder.digest_, "spec": portable_spec(embedder.backbone)},
            "embedder": {k: v for k, v in embedder.get_params().items() if k not in ("backbone", "store")},
            "head": {"kind": kind, "class": f"{type(head).__module__}.{type(head).__qualname__}",
                     "files": {f: sha256_file(staging / f) for f in HEAD_FILES[kind]}},
            "versions": {d: _version(d) for d in ("embedkit", "scikit-learn", "faiss-cpu", "skops", "onnxruntime")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MODEL_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return final


def _checked_files(folder: Path, recorded: Any, expected: tuple[str, ...] | None, what: str) -> dict[str, Path]:
    """Each file the metadata names, resolved inside ``folder`` and matching its recorded sha256.

    ``expected`` (when given) is the exact set of names the kind needs, so no file is read
    unchecked and no other file is named.
    """
    if not isinstance(recorded, dict) or not recorded:
        raise UnsafeModelError(f"{folder}: the {what} metadata lists no files")
    files = {name: member(folder, name) for name in recorded}  # before any byte is read
    if expected is not None and set(recorded) != set(expected):
        raise UnsafeModelError(f"{folder}: the {what} metadata names {sorted(recorded)}, expected {sorted(expected)}; refusing it")
    for name, digest in recorded.items():
        if sha256_file(files[name]) != digest:
            raise UnsafeModelError(f"{files[name]} changed since it was saved (sha256 mismatch); refusing it")
    return files


def _read_meta(folder: Path, marker: str, what: str) -> dict[str, Any]:
    try:
        meta = json.loads((folder / marker).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder} is not a saved embedkit {what} ({marker}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{folder}: {what} format {found}, this embedkit reads {FORMAT}")
    return meta


def portable_spec(spec: Any) -> str:
    """The backbone spec as recorded in ``model.json``: a local folder given by a relative path is
    recorded absolute, so the model re-exports it from any working directory."""
    text = str(spec)
    return str(Path(text).resolve()) if not Path(text).is_absolute() and Path(text).exists() else text


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
        ArtifactError: not a saved model.
        BackboneNotAvailableError: the backbone artifact is in no model store here and the
            recorded backbone does not export to the same digest (see :func:`backbone_artifact`).
        HeadBackboneMismatchError: ``backbone`` resolves to another artifact than the head's.
    """
    from sklearn.pipeline import Pipeline

    folder = current(Path(path), MODEL_FILE)
    manifest = _read_meta(folder, MODEL_FILE, "model")
    head_info = manifest.get("head") or {}
    kind = head_info.get("kind")
    if kind not in ("skops", "faiss-knn", "pickle"):
        raise ArtifactError(f"unknown head kind {kind!r} in {folder}")
    recorded = head_info.get("files")
    if kind == "pickle" and (not isinstance(recorded, dict) or len(recorded) != 1):
        raise UnsafeModelError(f"{folder}: a pickle head is one file, model.json names {recorded!r}")
    files = _checked_files(folder, recorded, HEAD_FILES.get(kind), "model")
    record = manifest["backbone"]
    if backbone is not None:
        _same_features(record, backbone, store)
    artifact = backbone_artifact(record, store, needed_by=str(folder))
    embedder = Embedder(artifact.digest, store=str(ModelStore.holding(artifact).root),
                        **manifest.get("embedder", {})).fit()
    if kind == "skops":
        import skops.io as sio

        file = files["head.skops"]
        refused = refused_types(file)
        if refused:
            raise UnsafeModelError(f"{file} holds types outside the trusted set: {', '.join(refused)}")
        head = sio.load(file, trusted=sio.get_untrusted_types(file=file) or None)
    elif kind == "faiss-knn":
        head = _load_faiss(folder, files)
    else:
        if not trust_pickle:
            raise UnsafeModelError(
                f"{folder} holds a pickle head ({', '.join(files)}); unpickling runs code from the file. "
                "Load it only if you made it: pass trust_pickle=True; its sha256 was checked."
            )
        import pickle

        with open(next(iter(files.values())), "rb") as f:
            head = pickle.load(f)  # noqa: S301 - explicit trust, sha256 verified above
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


def backbone_artifact(record: dict[str, Any], store: str | os.PathLike[str] | None = None,
                      needed_by: str = "") -> Any:
    """The artifact a saved model or index was made with, found from any working directory.

    ``record`` is ``{"digest", "name", "spec"}``. In order: the artifact with that digest in the
    model store (``store``, default ``$EMBEDKIT_HOME`` or the user cache folder); else the recorded
    backbone exported again, kept only if it gives that very digest (exports are deterministic).
    Nothing else is exported or left behind.

    Raises:
        BackboneNotAvailableError: neither works; the message says what is missing and how to get it.
    """

    models = ModelStore(store)
    digest, name = record["digest"], record.get("name")
    found = models.by_digest(digest)
    if found is not None:
        return found  # verified when the embedder opens it
    reasons = []
    for spec in dict.fromkeys(s for s in (record.get("spec"), name) if s):
        if spec == digest or (Path(spec) / "manifest.json").is_file():
            continue  # an artifact reference, not something to export again
        try:
            return export(spec, models, expect=digest)
        except UnknownBackboneError:
            reasons.append(f"{spec!r} is not a backbone here (is its plugin installed?)")
        except EmbedkitError as exc:
            reasons.append(f"re-exporting {spec!r} failed: {exc}")
    raise BackboneNotAvailableError(digest, name, models.root, " ".join(reasons), needed_by)


def _load_faiss(folder: Path, files: dict[str, Path]) -> Any:
    import faiss

    params = json.loads(files["head.json"].read_text())
    arrays = np.load(files["head.npz"], allow_pickle=False)
    known = set(FaissKNNClassifier().get_params())
    if not isinstance(params, dict) or not set(params) <= known or callable(params.get("weights")):
        raise ArtifactError(f"{files['head.json']}: not the parameters of a FaissKNNClassifier ({sorted(known)})")
    head = FaissKNNClassifier(**params)
    head.classes_ = arrays["classes"]
    head._y = arrays["y"]
    head.n_features_in_ = int(arrays["n_features"])
    nn = FaissNearestNeighbors.from_index(faiss.read_index(str(files["index.faiss"])), **head.neighbor_params())
    if nn.n_features_in_ != head.n_features_in_ or nn.n_samples_fit_ != len(head._y):
        raise ArtifactError(f"{folder}/index.faiss does not match its head (dimension or row count)")
    head.nn_ = nn
    return head


INDEX_FILE = "index.json"
INDEX_FILES = ("index.faiss", "ids.npy", "sources.npy")


def save_index(store: Any, backbone: str, path: str | os.PathLike[str], metric: str = "cosine",
               index: str = "auto", memory_budget_mb: float | None = None) -> Path:
    """A nearest-neighbour index over a feature store namespace, saved with ids and sources.

    ``path`` is checked before any work (its folder must exist; it must not be or lie inside
    the feature store; it must be new, an empty folder or an earlier index); an earlier index
    there is replaced crash-safely.

    Raises:
        OutputError: ``path`` is refused (see :func:`embedkit.fs.outputs.check_output`).
        StoreError: no features for ``backbone`` in ``store``.
    """
    import faiss

    is_namespace = hasattr(store, "load_with_sources")
    # (a pathlib.Path has a .root too: "/", which made every output "lie inside the input /")
    folder = store.path if is_namespace else store.root if isinstance(store, FeatureStore) else store
    final = check_output(path, "index", inputs=[folder])
    namespace = store if is_namespace else (store if isinstance(store, FeatureStore) else FeatureStore(store)).find(backbone)
    ids, X, sources = namespace.load_with_sources()
    if len(ids) == 0:  # every item of the extraction failed: nothing to search

        raise StoreError(f"{namespace.path} holds no vectors (0 rows; see `embedkit store failures`): "
                         "nothing to index")
    nn = FaissNearestNeighbors(metric=metric, index=index, memory_budget_mb=memory_budget_mb).fit(np.asarray(X))
    with staged_folder(final, replaceable("index")) as staging:
        faiss.write_index(nn._index, str(staging / "index.faiss"))
        np.save(staging / "ids.npy", ids, allow_pickle=False)
        np.save(staging / "sources.npy", sources, allow_pickle=False)
        meta = {
            **stamp("index"),
            "format": FORMAT, "backbone": {"name": namespace.name, "digest": namespace.digest,
                                          "spec": namespace.info.get("spec") or namespace.name},
            "metric": metric, "index_kind": nn.index_kind_, "rows": int(len(ids)), "dim": int(X.shape[1]),
            "files": {f: sha256_file(staging / f) for f in INDEX_FILES},
            "versions": {d: _version(d) for d in ("embedkit", "faiss-cpu")},
        }
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=2))
    return final


def search(path: str | os.PathLike[str], queries: list[Any], k: int = 10, store: str | None = None) -> list[list[dict[str, Any]]]:
    """The ``k`` nearest stored items (id, source, distance) for each raw query, nearest first.

    Raises:
        UnsafeModelError: a file ``index.json`` names is not one of the index's files, lies
            outside the folder, is not a regular file, or changed since it was saved.
        ArtifactError: not a saved index, or it does not match its ids or backbone.
    """
    import faiss

    folder = current(Path(path), INDEX_FILE)
    meta = _read_meta(folder, INDEX_FILE, "index")
    files = _checked_files(folder, meta.get("files"), INDEX_FILES, "index")
    artifact = backbone_artifact(meta["backbone"], store, needed_by=str(folder))
    index = faiss.read_index(str(files["index.faiss"]))
    ids = np.load(files["ids.npy"], allow_pickle=False)
    sources = np.load(files["sources.npy"], allow_pickle=False)
    if index.d != meta["dim"] or index.ntotal != len(ids) or artifact.dim != meta["dim"]:
        raise ArtifactError(f"{folder}: the index does not match its ids or its backbone (dimension or rows)")
    nn = FaissNearestNeighbors.from_index(index, metric=meta["metric"])
    options = {"empty": "error"} if artifact.modality == "text" else {}  # an empty query has no neighbours
    result = encoder_for(artifact, **options).encode(queries)
    out: list[list[dict[str, Any]]] = [[] for _ in queries]
    good = np.flatnonzero(result.ok)
    if len(good):
        distances, indices = nn.kneighbors(result.vectors[good], n_neighbors=min(k, len(ids)))
        for row, dist, idx in zip(good, distances, indices):
            out[row] = [{"id": str(ids[i]), "source": str(sources[i]), "distance": float(d)} for d, i in zip(dist, idx)]
    for error in result.errors:
        out[error.index] = [{"error": error.code, "message": error.message}]
    return out
