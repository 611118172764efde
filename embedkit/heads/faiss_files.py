"""FAISS heads in a saved model folder, written and read without pickle.

``head.json`` (the estimator's parameters), ``head.npz`` (classes, labels as class numbers, the
feature count; a binary head's rescoring vectors too) and ``index.faiss`` (the FAISS index:
``faiss.write_index`` / ``write_index_binary``). Kinds: ``faiss-knn``
(:class:`~embedkit.heads.knn.FaissKNNClassifier`) and ``faiss-binary-knn``
(:class:`~embedkit.heads.binary.BinaryKNNClassifier`: its rescoring vectors, when it has any, are
copied into ``head.npz``, so a memory-mapped array becomes part of the saved model).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.compact import Compact
from ..errors import ArtifactError, UnsavableHeadError
from .binary import BinaryKNNClassifier, BinaryNearestNeighbors
from .knn import FaissKNNClassifier, FaissNearestNeighbors

FILES = ("head.json", "head.npz", "index.faiss")
KINDS = {"faiss-knn": FaissKNNClassifier, "faiss-binary-knn": BinaryKNNClassifier}


def kind_of(head: Any) -> str | None:
    """The saved-model kind of a FAISS head, None for any other head."""
    return next((kind for kind, cls in KINDS.items() if type(head) is cls), None)


def write(head: Any, folder: Path) -> str:
    """Write a fitted FAISS head's files into ``folder``; its kind.

    Raises:
        UnsavableHeadError: a callable ``weights`` (loading it would have to run code).
    """
    import faiss

    kind = kind_of(head)
    if kind is None:
        raise TypeError(f"not a FAISS head: {type(head).__name__}")
    if callable(head.weights):
        raise UnsavableHeadError(f"a {type(head).__name__} with a callable weights cannot be saved (load would have "
                                 "to run code); use weights='uniform' or 'distance'")
    (folder / "head.json").write_text(json.dumps(head.get_params(), sort_keys=True))
    arrays: dict[str, Any] = {"classes": np.asarray(head.classes_).astype(str), "y": head._y,
                              "n_features": np.asarray(head.n_features_in_)}
    if kind == "faiss-knn":
        faiss.write_index(head.nn_._index, str(folder / "index.faiss"))
    else:
        nn = head.nn_
        if nn._rescore_vectors is not None:
            nn._check_reference()
            arrays["rescore"] = np.asarray(nn._rescore_vectors)
            if nn._rescore_rows is not None:
                arrays["rescore_rows"] = nn._rescore_rows
            if nn._rescore_compact is not None:
                arrays["rescore_compact"] = np.asarray(json.dumps(nn._rescore_compact.describe()))
        arrays["n_bits"] = np.asarray(nn.n_bits_)
        faiss.write_index_binary(nn._index, str(folder / "index.faiss"))
    np.savez(folder / "head.npz", **arrays)
    return kind


def read(kind: str, folder: Path, files: dict[str, Path]) -> Any:
    """The FAISS head of ``kind`` from its checked files.

    Raises:
        ArtifactError: parameters of another estimator, or an index that does not match its head.
    """
    import faiss

    cls = KINDS[kind]
    params = json.loads(files["head.json"].read_text())
    arrays = np.load(files["head.npz"], allow_pickle=False)
    known = set(cls().get_params())
    if not isinstance(params, dict) or not set(params) <= known or callable(params.get("weights")):
        raise ArtifactError(f"{files['head.json']}: not the parameters of a {cls.__name__} ({sorted(known)})")
    head = cls(**params)
    head.classes_ = arrays["classes"]
    head._y = arrays["y"]
    head.n_features_in_ = int(arrays["n_features"])
    nn: Any
    if kind == "faiss-knn":
        nn = FaissNearestNeighbors.from_index(faiss.read_index(str(files["index.faiss"])), **head.neighbor_params())
    else:
        nn = BinaryNearestNeighbors.from_index(faiss.read_index_binary(str(files["index.faiss"])),
                                               n_bits=int(arrays["n_bits"]), **head.neighbor_params())
        if "rescore" in arrays:
            compact = Compact.from_record(json.loads(str(arrays["rescore_compact"]))) if "rescore_compact" in arrays else None
            try:
                nn.set_rescore(arrays["rescore"], compact, arrays["rescore_rows"] if "rescore_rows" in arrays else None)
            except ValueError as exc:
                raise ArtifactError(f"{folder}/head.npz: its rescoring vectors do not match the index: {exc}") from None
    if nn.n_features_in_ != head.n_features_in_ or nn.n_samples_fit_ != len(head._y):
        raise ArtifactError(f"{folder}/index.faiss does not match its head (dimension or row count)")
    head.nn_ = nn
    return head
