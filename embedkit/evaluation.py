"""``embedkit.report``: how many labels a head on frozen features needs, against a from-scratch baseline.

Learning curves on one fixed stratified held-out split (see
:func:`embedkit.heads.curves.learning_curve`), optionally with a fine-tuned backbone beside
them (:class:`embedkit.finetuning.curves.FinetunedCurve`), written as CSV, JSON and a plot.

The module is not named ``report``: a submodule named like a public function would shadow it
on the package.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import numbers
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError, UnsupportedInputError
from .features.store import FeatureStore
from .finetuning.curves import FinetunedCurve
from .finetuning.finetune import OBJECTIVES
from .fs.atomic import staged_folder
from .fs.outputs import check_output, replaceable, stamp
from .heads.catalog import Progress, check_head
from .heads.curves import baseline_features, learning_curve
from .heads.labels import is_labelled, labels_for
from .heads.plots import plot_learning_curve
from .inputs.sources import iter_items

__all__ = ["FILES", "CurveReport", "report"]

logger = logging.getLogger(__name__)

FILES = {"csv": "learning_curve.csv", "png": "learning_curve.png", "json": "learning_curve.json"}
DEFAULT_FINETUNE_MAX_ITEMS = 256


@dataclass
class CurveReport:
    """What :func:`report` measured, and where it wrote it.

    Attributes:
        backbone: the backbone's name, as the feature store records it.
        digest: the sha256 of its ONNX artifact (the feature namespace the curve was read from).
        head: the head's name (``logreg``, ``knn``...).
        rows: one dict per fit, in the order fitted: ``per_class`` (labelled examples per class,
            an int, or ``"all"``), ``train_items`` (items trained on), ``repeat`` (0-based
            subset number), ``model`` (``"<head> on frozen features"``, ``"from-scratch
            baseline"`` or the fine-tuned line's name), ``accuracy`` (share of the held-out
            items predicted right, in [0, 1]) and ``train_seconds`` (the fit's wall time, s).
        finetune: the fine-tuned line's settings (``objective``, ``unfreeze``, ``max_items``
            and the :func:`embedkit.finetune` options used), or None without one.
        files: ``"csv"``, ``"png"``, ``"json"`` -> the file written; empty when nothing was written.
    """

    backbone: str
    digest: str
    head: str
    rows: list[dict[str, Any]]
    finetune: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The content of ``learning_curve.json`` (its marker ``"kind": "report"`` included)."""
        return {**stamp("report"), "backbone": self.backbone, "digest": self.digest, "head": self.head,
                "rows": self.rows, **({"finetune": self.finetune} if self.finetune is not None else {})}

    def summary(self) -> list[dict[str, Any]]:
        """One row per (size, model), in the order fitted: ``per_class``, ``train_items`` (of
        the first subset), ``model``, ``subsets`` (how many were fitted), and ``accuracy`` and
        ``train_seconds`` averaged over them."""
        groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault((row["per_class"], row["model"]), []).append(row)
        return [{"per_class": size, "train_items": group[0]["train_items"], "model": model, "subsets": len(group),
                 "accuracy": float(np.mean([g["accuracy"] for g in group])),
                 "train_seconds": float(np.mean([g["train_seconds"] for g in group]))}
                for (size, model), group in groups.items()]


def _positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def report(
    features: str | Path, backbone: str, labels: str | Path, out: str | Path | None = None, *,
    head: str = "logreg", params: dict[str, Any] | None = None, label_column: str = "label",
    column: str | None = None, repeats: int = 3, finetune: str | None = None, unfreeze: str | None = None,
    epochs: int | None = None, iterations: int | None = None, finetune_max_items: int | None = None,
    progress: Progress | None = None,
) -> CurveReport:
    """Learning curves of a head on a feature store's cached features vs a from-scratch baseline.

    Held-out accuracy and training time vs labelled examples per class (1, 2, 4, ... up to the
    median class size, then all), ``repeats`` random subsets per size, on one fixed stratified
    held-out split (30% of the labelled items). The head trains on the stored features, shape
    ``(N, D)``, so its time is the fit alone (extraction was paid once); the baseline trains on
    the raw inputs: TF-IDF + logistic regression for texts, 32x32 raw pixels + logistic
    regression for images. With ``finetune`` a third line fine-tunes the backbone itself (one
    subset per size of at most ``finetune_max_items`` items; each is a real
    :func:`embedkit.finetune` into a scratch model store deleted afterwards).

    Args:
        features: a feature store folder, as :func:`embedkit.extract` writes it.
        backbone: the backbone whose features to use: its name (the newest namespace) or a
            digest prefix (>= 8 hex).
        labels: the labelled table that was extracted (CSV/TSV/JSONL/Parquet: a payload column,
            ``column``, and a label column, ``label_column``; rows are matched to stored items
            by content), or ``"folder"`` for images: each image's class is its parent folder.
        out: a folder to write ``learning_curve.csv`` (the rows), ``learning_curve.png`` (the
            plot) and ``learning_curve.json`` (:meth:`CurveReport.to_json`) into, all at once:
            an earlier report there is replaced only when the new one is complete. None: write
            nothing.
        head: the head's name (``logreg``, ``linear-svm``, ``ridge``, ``mlp``, ``knn``, ``faiss-knn``).
        params: the head's parameters, e.g. ``{"C": 10}``.
        label_column: the label column of ``labels``.
        column: the payload column of ``labels`` (default ``text`` or ``path``).
        repeats: random subsets per size (the ``"all"`` size has one).
        finetune: also fine-tune the backbone: ``"contrastive"`` (SetFit, texts) or ``"classify"``;
            needs the backbone's torch module.
        unfreeze: with ``finetune``: ``head``, ``last:N`` or ``all`` (default ``all`` for
            contrastive, ``last:2`` for classify).
        epochs: with ``finetune``: epochs (default 1 contrastive, 3 classify).
        iterations: with ``finetune="contrastive"``: sentence pairs per item and kind (SetFit's
            ``num_iterations``; default 5).
        finetune_max_items: with ``finetune``: fine-tune only at sizes of at most this many
            training items (default 256).
        progress: ``progress(done, total)``, called after each fit.

    Returns:
        A :class:`CurveReport`: the rows (accuracy in [0, 1], training time in seconds), the
        backbone's name and digest, and the files written.

    Raises:
        OutputError: ``out`` is refused before any work (its folder is missing; it is, holds or
            lies inside ``features`` or ``labels``; it exists and is not an earlier report).
        StoreError: ``features`` holds no features of ``backbone``.
        UnsupportedInputError: ``labels`` is not a file (nor ``"folder"`` for images), the head
            refuses ``params`` (the message starts ``params:``), or the fine-tune settings do
            not go together (an option without ``finetune``, ``iterations`` without
            ``finetune="contrastive"``, an unknown ``finetune``).
        DatasetError: fewer than 2 labelled items, or fewer than 2 classes with 2 or more
            labelled examples.
        ValueError: ``repeats``, ``epochs``, ``iterations`` or ``finetune_max_items`` is not a
            positive int.
    """
    for name, value in (("repeats", repeats), ("epochs", epochs), ("iterations", iterations),
                        ("finetune_max_items", finetune_max_items)):
        _positive(name, value)
    if finetune is None:
        given = [n for n, v in (("unfreeze", unfreeze), ("epochs", epochs), ("iterations", iterations),
                                ("finetune_max_items", finetune_max_items)) if v is not None]
        if given:
            raise UnsupportedInputError(f"{', '.join(given)} set how the report fine-tunes: pass finetune="
                                        f"{' or '.join(map(repr, sorted(OBJECTIVES)))} too")
    elif finetune not in OBJECTIVES:
        raise UnsupportedInputError(f"finetune: must be one of {', '.join(sorted(OBJECTIVES))}, got {finetune!r}")
    if iterations is not None and finetune != "contrastive":
        raise UnsupportedInputError("iterations: only finetune='contrastive' uses it (sentence pairs per item)")
    labels = str(labels)
    folder = None
    if out is not None:
        folder = check_output(out, "report", inputs=[features] + ([] if labels == "folder" else [labels]))
    check_head(head, params)  # refused before the features are read
    namespace = FeatureStore(features).find(backbone)
    modality = namespace.info.get("modality", "text")
    if modality != "image" and labels == "folder":
        raise UnsupportedInputError("labels: text reports need a labels table, not 'folder' (its text column feeds "
                                    "the TF-IDF baseline)")
    ids, X, sources, contents = namespace.load_all()
    y = labels_for(ids, sources, labels, modality, label_column, None, column, contents=contents)
    if modality == "image":
        payloads = [str(s) for s in sources]
    else:  # the baseline reads the texts themselves: stored ids are content ids of the table's rows
        by_id = {item.id: item.payload for item in iter_items(Path(labels), modality, column)}
        payloads = [by_id.get(str(i)) for i in ids]
    known = is_labelled(y) & np.asarray([p is not None for p in payloads], dtype=bool)
    if known.sum() < 2:
        raise DatasetError(f"only {int(known.sum())} of {len(ids)} stored items have a label in {labels} "
                           f"(column {label_column!r}); a learning curve needs labelled items of 2 classes or more")
    items = [p for p, k in zip(payloads, known) if k]
    y_known = np.asarray(y[known]).astype(str)
    max_items = finetune_max_items or DEFAULT_FINETUNE_MAX_ITEMS
    with contextlib.ExitStack() as stack:
        tuned = None
        if finetune is not None:
            options: dict[str, Any] = {"epochs": epochs or (1 if finetune == "contrastive" else 3)}
            if finetune == "contrastive":
                options.update(iterations=iterations or 5, batch_size=16)
            # the fine-tuned backbones are the report's scratch work: a store thrown away at the end
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="embedkit-report-"))
            tuned = FinetunedCurve(namespace.name, items, y_known, scratch, finetune, unfreeze, options)
        rows = learning_curve(np.asarray(X)[known], baseline_features(modality, items), y_known, modality, head,
                              params, repeats=repeats, progress=progress, finetuned=tuned,
                              finetune_max_items=max_items)
    result = CurveReport(namespace.name, namespace.digest, head, rows, finetune=None if tuned is None else {
        "objective": tuned.objective, "unfreeze": tuned.unfreeze, "max_items": max_items, **tuned.options})
    if folder is None:
        return result
    with staged_folder(folder, replaceable("report")) as staging:  # the earlier report stays until this one is whole
        with open(staging / FILES["csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        line = f", {tuned.name}" if tuned is not None else ""
        plot_learning_curve(rows, staging / FILES["png"], f"{namespace.name}: {head} vs from-scratch baseline{line}")
        (staging / FILES["json"]).write_text(json.dumps(result.to_json(), indent=2))
    result.files = {kind: folder / name for kind, name in FILES.items()}
    logger.info("report: %d fits of %s on %s (%s) -> %s", len(rows), head, namespace.name, namespace.digest[:12], folder)
    return result
