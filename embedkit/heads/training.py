"""Train a head on cached features: labels joined to the store, metrics, a confusion matrix, a saved model.

The pieces live beside this module (heads by name in :mod:`.catalog`, labels in :mod:`.labels`,
splits in :mod:`.splits`, learning curves in :mod:`.curves`); their public names are importable
from here too, where they were defined before the split.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embedder import Embedder
from ..errors import DatasetError
from ..fs.atomic import staged_folder
from ..fs.outputs import check_output, replaceable, stamp
from .catalog import HEADS, Progress, check_head, check_neighbors, fit_head, make_head
from .compacted import CompactHead
from .curves import baseline_features, learning_curve
from .labels import is_labelled, labels_for
from .namespaces import find, long_of
from .persistence import save
from .plots import plot_confusion
from .splits import check_classes, holdout_split

__all__ = ["HEADS", "HeadReport", "Progress", "baseline_features", "check_classes", "check_head", "evaluate",
           "holdout_split", "is_labelled", "labels_for", "learning_curve", "make_head", "train_head"]


@dataclass
class HeadReport:
    """What :func:`evaluate` measured: holdout accuracy and macro-F1 (fractions in [0, 1]), the fit's
    wall time (s), scikit-learn's per-class report and k-fold accuracies."""

    head: str
    n_train: int
    n_test: int
    classes: int
    accuracy: float
    macro_f1: float
    fit_seconds: float
    per_class: dict[str, Any] = field(default_factory=dict)
    cv_accuracy: list[float] = field(default_factory=list)
    unlabelled: int = 0
    notes: list[str] = field(default_factory=list)  # how a small or lopsided dataset was handled

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate(X: np.ndarray, y: np.ndarray, kind: str, params: dict[str, Any], cv: int = 0,
             test_size: float = 0.2, seed: int = 0, confusion_png: Path | None = None,
             progress: Progress | None = None) -> HeadReport:
    """Holdout metrics (and k-fold accuracy when ``cv``), and a confusion-matrix PNG.

    ``progress(done, total)`` is called after each fit (the holdout fit, then each fold).

    Raises:
        DatasetError: fewer than 2 classes, no class with 2 examples, or ``cv`` larger than a class.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(cv, int) or cv < 0 or cv == 1:
        raise ValueError(f"cv must be 0 (off) or a number of folds >= 2, got {cv!r}")
    check_classes(y, cv)
    train_idx, test_idx, notes = holdout_split(y, test_size, seed)
    total = 1 + cv
    head = check_head(kind, params)
    check_neighbors(head, kind, len(train_idx))
    if cv:
        check_neighbors(head, kind, min(len(a) for a, _ in StratifiedKFold(n_splits=cv).split(X, y)))
    start = time.perf_counter()
    fit_head(head, kind, X[train_idx], y[train_idx])
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(1, total)
    pred = head.predict(X[test_idx])
    y_test = y[test_idx]
    report = HeadReport(
        head=kind, n_train=len(train_idx), n_test=len(test_idx), classes=len(np.unique(y)),
        accuracy=float(accuracy_score(y_test, pred)),
        macro_f1=float(f1_score(y_test, pred, average="macro", zero_division=0)),
        fit_seconds=seconds, per_class=classification_report(y_test, pred, output_dict=True, zero_division=0),
        notes=notes,
    )
    if cv:  # the folds of cross_val_score (StratifiedKFold, no shuffle), one at a time for the progress bar
        for k, (a, b) in enumerate(StratifiedKFold(n_splits=cv).split(X, y), start=2):
            fold = make_head(kind, params).fit(X[a], y[a])
            report.cv_accuracy.append(float((fold.predict(X[b]) == y[b]).mean()))
            if progress is not None:
                progress(k, total)
    if confusion_png is not None:
        Path(confusion_png).parent.mkdir(parents=True, exist_ok=True)
        labels = np.unique(y)
        plot_confusion(confusion_matrix(y_test, pred, labels=labels), labels, confusion_png,
                       f"{kind}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
    return report


def train_head(
    features: str | Path, backbone: str, labels: str, head: str = "logreg", params: dict[str, Any] | None = None,
    out: str | Path | None = None, label_column: str = "label", id_column: str | None = None,
    column: str | None = None, cv: int = 0, test_size: float = 0.2, store: str | None = None,
    progress: Progress | None = None, precision: str = "float32", dimensions: int | None = None,
    long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
) -> tuple[HeadReport, Path | None]:
    """Train a head on a feature store's cached (memory-mapped) features.

    ``precision`` / ``dimensions`` choose a compact namespace of ``backbone`` (int8 / uint8 /
    binary rows, or ``dimensions`` truncated ones; see :mod:`embedkit.encoders.compact`): the head
    is trained and measured on ``Compact.restore(rows)`` (float32 ``(N, d)``: the middle of each
    int8 step, -1 / +1 per bit), and the saved model is a :class:`CompactHead` that records the
    namespace's Compact, calibration included, so every item it predicts is made compact the same
    way first (see :mod:`embedkit.heads.compacted`). ``long="chunk"`` (with ``chunk_overlap`` /
    ``max_chunks`` when the store holds several chunk settings) trains on the namespace of
    chunked texts (windows embedded and pooled), and the saved model's Embedder chunks every
    new text the same way (its ``long``, ``chunk_overlap`` and ``max_chunks`` are those the
    namespace records, written in ``model.json``).

    Measures holdout accuracy, macro-F1 and a per-class report (plus k-fold accuracy with
    ``cv``), then fits on every labelled item. With ``out``: writes the folder ``out`` with
    ``report.json`` (its marker, ``"kind": "train-head"``), ``confusion.png`` and the deployable
    model (``out/model``, see :func:`embedkit.load`), all at once: an earlier run's folder is
    replaced only when the new one is complete. ``progress(done, total)`` follows the fits
    (holdout, then each fold).

    Raises:
        OutputError: ``out`` is refused before any work (its folder is missing; it is, holds
            or lies inside ``features`` or ``labels``; it exists and is not an earlier
            train-head output, nor empty).
        DatasetError: fewer than 2 labelled items or classes, or too few items for ``cv``
            (see :func:`holdout_split` for how classes with one example are handled).
    """

    folder = None
    if out is not None:
        folder = check_output(out, "train-head", inputs=[features] + ([] if labels == "folder" else [labels]))
    namespace = find(features, backbone, precision=precision, dimensions=dimensions, long=long,
                     chunk_overlap=chunk_overlap, max_chunks=max_chunks)
    chunked = long_of(namespace.variant)  # the policy new items are embedded with, as the stored ones were
    ids, X, sources, contents = namespace.load_all()
    compact = namespace.compact
    if not compact.is_float:
        X = compact.restore(np.asarray(X))  # what the head sees, at training and at predict time
    y = labels_for(ids, sources, labels, namespace.info.get("modality", "text"), label_column, id_column, column,
                   contents=contents)
    known = is_labelled(y)
    if known.sum() < 2:
        raise DatasetError(f"only {int(known.sum())} of {len(ids)} stored items have a label in {labels} "
                           f"(column {label_column!r}); check the label column and that the table is the one extracted")
    X_known, y_known = np.asarray(X)[known], np.asarray(y[known]).astype(str)
    check_head(head, params)  # refused before any output is written
    check_classes(y_known, cv)
    holdout_split(y_known, test_size)
    if folder is None:
        report = evaluate(X_known, y_known, head, params or {}, cv=cv, test_size=test_size, progress=progress)
        report.unlabelled = int((~known).sum())
        return report, None
    with staged_folder(folder, replaceable("train-head")) as staging:  # the earlier run's folder stays until this one is whole
        report = evaluate(X_known, y_known, head, params or {}, cv=cv, test_size=test_size,
                          confusion_png=staging / "confusion.png", progress=progress)
        report.unlabelled = int((~known).sum())
        fitted = make_head(head, params).fit(X_known, y_known)
        if not compact.is_float:
            fitted = CompactHead.wrap(fitted, compact)
        embedder = Embedder(namespace.digest, store=store, **chunked).fit()
        save((embedder, fitted), staging / "model")
        features_of = {"precision": compact.precision, "dimensions": compact.dimensions,
                       "calibration": compact.calibration.digest if compact.calibration is not None else None,
                       "long": chunked.get("long", "truncate"), "chunk_overlap": chunked.get("chunk_overlap"),
                       "max_chunks": chunked.get("max_chunks")}
        (staging / "report.json").write_text(json.dumps({**stamp("train-head"), **report.to_json(),
                                                         "features": features_of}, indent=2))
    return report, folder / "model"
