"""One deployable model: backbone reference (artifact digest) + head, saved so loading runs no code.

A saved model is a folder::

    model.json      format, backbone name + digest, head kind + file + sha256, versions
    head.skops      scikit-learn heads (skops: loads only the types it is told to trust)
    head.json, head.npz, index.faiss
                    FAISS heads: parameters, classes and labels as plain arrays, the index

``load`` checks every file's sha256, refuses a model whose backbone resolves to another digest
(naming both), loads skops heads with no untrusted types, and never opens a pickle or joblib
file unless the caller passes ``trust_pickle=True`` (and its sha256 still matches).
"""
from __future__ import annotations

import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import ModelStore, sha256_file
from .atomic import staged_folder
from .errors import ArtifactError, EmbedkitError, UnsafeModelError

FORMAT = 1
MODEL_FILE = "model.json"
# scikit-learn's own helper classes that fitted MLP and k-NN heads hold; skops rebuilds them
# from their state like any trusted type (no code from the file runs), but does not list them.
SKLEARN_INTERNALS = frozenset({
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
    from .embedder import Embedder

    steps = [s for _, s in model.steps] if hasattr(model, "steps") else list(model)
    if len(steps) != 2 or not isinstance(steps[0], Embedder):
        raise TypeError("save() takes Pipeline([Embedder, head]) or (Embedder, head), both fitted")
    return steps[0], steps[1]


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save a fitted embedder + head pipeline as a folder (atomically: written beside, then renamed)."""
    from sklearn.utils.validation import check_is_fitted

    from .heads import FaissKNNClassifier

    embedder, head = _split(model)
    check_is_fitted(embedder, "digest_")
    check_is_fitted(head)
    final = Path(path)
    with staged_folder(final) as staging:
        if isinstance(head, FaissKNNClassifier):
            import faiss

            kind, files = "faiss-knn", ["head.json", "head.npz", "index.faiss"]
            (staging / "head.json").write_text(json.dumps(head.get_params(), sort_keys=True))
            np.savez(staging / "head.npz", classes=np.asarray(head.classes_).astype(str),
                     y=head._y, n_features=np.asarray(head.n_features_in_))
            faiss.write_index(head.nn_._index, str(staging / "index.faiss"))
        else:
            import skops.io as sio

            kind, files = "skops", ["head.skops"]
            sio.dump(head, staging / "head.skops")
        manifest = {
            "format": FORMAT,
            "backbone": {"name": embedder.backbone_name_, "digest": embedder.digest_, "spec": str(embedder.backbone)},
            "embedder": {k: v for k, v in embedder.get_params().items() if k not in ("backbone", "store")},
            "head": {"kind": kind, "class": f"{type(head).__module__}.{type(head).__qualname__}",
                     "files": {f: sha256_file(staging / f) for f in files}},
            "versions": {d: _version(d) for d in ("embedkit", "scikit-learn", "faiss-cpu", "skops", "onnxruntime")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MODEL_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return final


def load(path: str | os.PathLike[str], store: str | None = None, trust_pickle: bool = False) -> Any:
    """A ``Pipeline([Embedder, head])`` that predicts from raw inputs.

    Raises:
        UnsafeModelError: a file's sha256 differs from the record, the head is a pickle and
            ``trust_pickle`` is False, or a skops file holds types outside the trusted set.
        BackboneNotAvailableError: the backbone artifact is in no model store here and the
            recorded backbone does not export to the same digest (see :func:`backbone_artifact`).
    """
    from sklearn.pipeline import Pipeline

    from .embedder import Embedder

    folder = Path(path)
    try:
        manifest = json.loads((folder / MODEL_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{folder} is not a saved embedkit model ({MODEL_FILE}: {exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder}: model format {manifest.get('format')}, this embedkit reads {FORMAT}")
    head_info = manifest["head"]
    for name, digest in head_info["files"].items():
        target = (folder / name).resolve()
        if folder.resolve() not in target.parents:
            raise UnsafeModelError(f"{name!r} points outside {folder}")
        if not target.is_file() or sha256_file(target) != digest:
            raise UnsafeModelError(f"{target} is missing or changed since it was saved (sha256 mismatch); refusing it")
    backbone = manifest["backbone"]
    artifact = backbone_artifact(backbone, store, needed_by=str(folder))
    embedder = Embedder(artifact.digest, store=str(ModelStore.holding(artifact).root),
                        **manifest.get("embedder", {})).fit()
    kind = head_info["kind"]
    if kind == "skops":
        import skops.io as sio

        file = folder / "head.skops"
        try:
            untrusted = sio.get_untrusted_types(file=file)
        except Exception as exc:  # not a skops archive (e.g. a pickle renamed): never unpickled
            raise UnsafeModelError(f"{file} is not a skops file: {type(exc).__name__}: {exc}") from exc
        refused = [t for t in untrusted if t not in SKLEARN_INTERNALS]
        if refused:
            raise UnsafeModelError(f"{file} holds types outside the trusted set: {', '.join(refused)}")
        head = sio.load(file, trusted=untrusted or None)
    elif kind == "faiss-knn":
        head = _load_faiss(folder)
    elif kind == "pickle":
        if not trust_pickle:
            raise UnsafeModelError(
                f"{folder} holds a pickle head ({', '.join(head_info['files'])}); unpickling runs code from the file. "
                "Load it only if you made it: pass trust_pickle=True (--trust-pickle); its sha256 was checked."
            )
        import pickle

        with open(folder / next(iter(head_info["files"])), "rb") as f:
            head = pickle.load(f)  # noqa: S301 - explicit trust, sha256 verified above
    else:
        raise ArtifactError(f"unknown head kind {kind!r} in {folder}")
    return Pipeline([("embed", embedder), ("head", head)])


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
    from .artifacts import ModelStore
    from .errors import BackboneNotAvailableError, UnknownBackboneError
    from .exporter import export

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


def _load_faiss(folder: Path) -> Any:
    import faiss

    from .heads import FaissKNNClassifier, FaissNearestNeighbors

    params = json.loads((folder / "head.json").read_text())
    arrays = np.load(folder / "head.npz", allow_pickle=False)
    head = FaissKNNClassifier(**params)
    head.classes_ = arrays["classes"]
    head._y = arrays["y"]
    head.n_features_in_ = int(arrays["n_features"])
    nn = FaissNearestNeighbors.from_index(faiss.read_index(str(folder / "index.faiss")), **head.neighbor_params())
    if nn.n_features_in_ != head.n_features_in_ or nn.n_samples_fit_ != len(head._y):
        raise ArtifactError(f"{folder}/index.faiss does not match its head (dimension or row count)")
    head.nn_ = nn
    return head


INDEX_FILE = "index.json"


def save_index(store: Any, backbone: str, path: str | os.PathLike[str], metric: str = "cosine",
               index: str = "auto", memory_budget_mb: float | None = None) -> Path:
    """A nearest-neighbour index over a feature store namespace, saved atomically with ids and sources."""
    import faiss

    from .heads import FaissNearestNeighbors
    from .store import FeatureStore

    namespace = FeatureStore(store).find(backbone) if not hasattr(store, "load_with_sources") else store
    ids, X, sources = namespace.load_with_sources()
    nn = FaissNearestNeighbors(metric=metric, index=index, memory_budget_mb=memory_budget_mb).fit(np.asarray(X))
    final = Path(path)
    with staged_folder(final) as staging:
        faiss.write_index(nn._index, str(staging / "index.faiss"))
        np.save(staging / "ids.npy", ids, allow_pickle=False)
        np.save(staging / "sources.npy", sources, allow_pickle=False)
        files = ["index.faiss", "ids.npy", "sources.npy"]
        meta = {
            "format": FORMAT, "backbone": {"name": namespace.name, "digest": namespace.digest},
            "metric": metric, "kind": nn.index_kind_, "rows": int(len(ids)), "dim": int(X.shape[1]),
            "files": {f: sha256_file(staging / f) for f in files},
            "versions": {d: _version(d) for d in ("embedkit", "faiss-cpu")},
        }
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=2))
    return final


def search(path: str | os.PathLike[str], queries: list[Any], k: int = 10, store: str | None = None) -> list[list[dict[str, Any]]]:
    """The ``k`` nearest stored items (id, source, distance) for each raw query, nearest first."""
    import faiss

    from .encoder import encoder_for
    from .exporter import resolve
    from .heads import FaissNearestNeighbors

    folder = Path(path)
    try:
        meta = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{folder} is not a saved embedkit index ({INDEX_FILE}: {exc})") from exc
    for name, digest in meta["files"].items():
        if sha256_file(folder / name) != digest:
            raise UnsafeModelError(f"{folder / name} changed since it was saved (sha256 mismatch); refusing it")
    artifact = resolve(meta["backbone"]["digest"], store)
    index = faiss.read_index(str(folder / "index.faiss"))
    ids = np.load(folder / "ids.npy", allow_pickle=False)
    sources = np.load(folder / "sources.npy", allow_pickle=False)
    if index.d != meta["dim"] or index.ntotal != len(ids) or artifact.dim != meta["dim"]:
        raise ArtifactError(f"{folder}: the index does not match its ids or its backbone (dimension or rows)")
    nn = FaissNearestNeighbors.from_index(index, metric=meta["metric"])
    result = encoder_for(artifact).encode(queries)
    out: list[list[dict[str, Any]]] = [[] for _ in queries]
    good = np.flatnonzero(result.ok)
    if len(good):
        distances, indices = nn.kneighbors(result.vectors[good], n_neighbors=min(k, len(ids)))
        for row, dist, idx in zip(good, distances, indices):
            out[row] = [{"id": str(ids[i]), "source": str(sources[i]), "distance": float(d)} for d, i in zip(dist, idx)]
    for error in result.errors:
        out[error.index] = [{"error": error.code, "message": error.message}]
    return out
