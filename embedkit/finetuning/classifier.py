"""``FinetunedClassifier``: :func:`embedkit.finetune` as a scikit-learn classifier over raw items."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ..backbones.registry import get_backbone
from ..embedder import as_items
from ..errors import DatasetError
from .checks import check_labels
from .finetune import finetune


class FinetunedClassifier(ClassifierMixin, BaseEstimator):
    """A classifier over raw texts or images whose :meth:`fit` fine-tunes a backbone.

    ``fit(X, y)`` calls :func:`embedkit.finetune` with the estimator's parameters (see it for
    each one's meaning and the errors it raises); the result is a new backbone in the model store
    (``backbone_``, ``digest_``) and a fitted ``Pipeline([Embedder, head])`` (``model_``) that
    ``predict`` / ``predict_proba`` / ``score`` use. Parameters are stored verbatim and checked
    in ``fit``, so the estimator clones, pickles (the ONNX session is rebuilt lazily) and works
    in ``GridSearchCV`` over e.g. ``lr`` and ``unfreeze``. Each fit persists one fine-tuned
    backbone in ``store`` (a search over k settings and c folds makes k * c + 1 of them).

    Args:
        backbone: registered name or spec of the parent (``minilm-l6``, ``mobilenet-v2``...).
        unfreeze: ``head`` | ``last:N`` | ``all``.
        objective: ``classify`` (cross-entropy with a linear head) or ``contrastive`` (SetFit's
            recipe, texts only: ``iterations`` pairs per item and kind, then LogisticRegression).
        iterations: contrastive only: SetFit's ``num_iterations`` (ignored for ``classify``).
        loss: contrastive only: ``cosine`` (SetFit's pairs) or ``in-batch`` (in-batch negatives,
            ``batch_size`` classes per batch); see :mod:`embedkit.finetuning.contrastive`.
        epochs, batch_size, lr, head_lr, layer_decay, weight_decay, warmup, max_grad_norm,
        validation, patience, class_weight, seed, device, augment, store: as :func:`embedkit.finetune`.

    Fitted attributes: ``classes_`` (label values, (n_classes,)), ``model_``, ``backbone_``,
    ``digest_``, ``history_`` (per-epoch metrics), ``failures_`` (items excluded, one record
    each), ``modality_``.

    Raises (``predict`` / ``predict_proba``):
        InvalidInputError: some items could not be embedded; ``.errors`` lists every one.
    """

    def __init__(
        self,
        backbone: Any = "minilm-l6",
        unfreeze: str = "last:2",
        objective: str = "classify",
        iterations: int = 20,
        loss: str = "cosine",
        epochs: int = 3,
        batch_size: int = 32,
        lr: float = 2e-5,
        head_lr: float = 1e-3,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
        max_grad_norm: float | None = 1.0,
        validation: Any = 0.1,
        patience: int | None = None,
        class_weight: Any = None,
        seed: int = 0,
        device: str = "cpu",
        augment: bool = True,
        store: str | None = None,
    ):
        self.backbone = backbone
        self.unfreeze = unfreeze
        self.objective = objective
        self.iterations = iterations
        self.loss = loss
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.head_lr = head_lr
        self.layer_decay = layer_decay
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.max_grad_norm = max_grad_norm
        self.validation = validation
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.device = device
        self.augment = augment
        self.store = store

    def fit(self, X: Any, y: Any) -> "FinetunedClassifier":
        """Fine-tune the backbone on items ``X`` (a sequence, 1-D array, Series or one-column frame)
        with labels ``y`` (one per item).

        Raises:
            DatasetError: ``y`` is not one label per item, has missing values, one class only,
                or continuous values; plus what :func:`embedkit.finetune` raises.
            TypeError: ``X`` is a single string / bytes / image instead of a sequence.
        """

        parent = get_backbone(self.backbone) if isinstance(self.backbone, str) else self.backbone
        modality = getattr(parent, "modality", "text")
        items = as_items(X, modality)
        labels = _labels(y, len(items))
        options = {"iterations": self.iterations, "loss": self.loss} if self.objective == "contrastive" else {}
        result = finetune(
            self.backbone, items, labels, unfreeze=self.unfreeze, objective=self.objective, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, head_lr=self.head_lr, layer_decay=self.layer_decay,
            weight_decay=self.weight_decay, warmup=self.warmup, max_grad_norm=self.max_grad_norm,
            validation=self.validation, patience=self.patience, class_weight=self.class_weight, seed=self.seed,
            device=self.device, augment=self.augment, store=self.store, **options,
        )
        self.model_ = result.model
        self.classes_ = np.asarray(result.classes, dtype=labels.dtype if labels.dtype != object else None)
        head_classes = np.asarray(self.model_.steps[-1][1].classes_)
        if not np.array_equal(head_classes.astype(str), self.classes_.astype(str)):  # pragma: no cover - invariant
            raise RuntimeError(f"the head's classes {head_classes} differ from the result's {self.classes_}")
        self.backbone_ = result.backbone
        self.digest_ = result.digest
        self.history_ = result.history
        self.failures_ = result.failures
        self.modality_ = modality
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, float64 array of shape (N, n_classes), columns in ``classes_`` order."""

        check_is_fitted(self, "model_")
        items = as_items(X, self.modality_)
        if not items:
            return np.empty((0, len(self.classes_)), dtype=np.float64)
        return np.asarray(self.model_.predict_proba(items), dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each item, shape (N,), values from ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)] if len(proba) else self.classes_[:0]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # raw items (texts, images), not feature matrices
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags


def _labels(y: Any, n: int) -> np.ndarray:
    """``y`` as a 1-D array of class labels, refusing what a classifier cannot learn."""
    from sklearn.utils.multiclass import type_of_target

    if y is None:
        raise DatasetError("FinetunedClassifier.fit needs labels y (one per item)")
    if isinstance(y, (str, bytes)):
        raise DatasetError("y must be a sequence with one label per item, not a single string")
    raw = getattr(y, "to_numpy", lambda: y)()
    values = np.asarray(raw, dtype=object) if isinstance(raw, (list, tuple)) else np.asarray(raw)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DatasetError(f"y must be one label per item (1-D), got shape {values.shape}")
    check_labels(values, n)  # finetune's own checks (before numpy could turn [1, "1"] into two "1"s)
    values = np.asarray(values.tolist()) if values.dtype == object else values
    try:
        kind = type_of_target(values)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"y cannot be read as class labels: {exc}") from None
    if kind == "continuous":
        raise DatasetError("y holds continuous values (e.g. 0.5); a classifier needs class labels such as "
                           "strings or integers")
    return values
