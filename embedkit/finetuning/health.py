"""What a tuned body's outputs say after training, beyond its loss: non-finite outputs (a
:class:`~embedkit.errors.TrainingDivergedError`), outputs collapsed to one vector (a
:class:`~embedkit.errors.TrainingCollapsedError`), and a validation accuracy at chance level (a
warning kept with the result). :func:`embedkit.finetuning.finetune.train` runs these checks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TrainingCollapsedError, TrainingDivergedError

SAMPLE = 128  # training items whose outputs are checked after training
COLLAPSED = 1 - 1e-4  # mean pairwise cosine from which different items embed to one vector


def outputs(module: Any, data: Any, index: np.ndarray) -> np.ndarray:
    """The module's (eval mode) float64 outputs on the items ``index``, in batches."""
    import torch

    module.eval()
    rows = []
    with torch.no_grad():
        for k in range(0, len(index), 32):
            rows.append(module(*data.batch(index[k:k + 32], None)).float().cpu().numpy().astype(np.float64))
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def mean_cosine(x: np.ndarray) -> float:
    """Mean cosine similarity of the distinct pairs of rows (1.0: fewer than two rows; NaN-safe: a
    non-finite row counts as collapsed, a zero row as orthogonal)."""
    if len(x) < 2 or not np.isfinite(x).all():
        return 1.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(norms > 0, norms, 1.0)
    n = len(u)
    s = u.sum(0)
    return float((s @ s - (u * u).sum()) / (n * (n - 1)))


def check_outputs(module: Any, data: Any, sample: np.ndarray, before: float, rates: str) -> None:
    """Refuse a tuned module whose outputs on the training items ``sample`` are not finite, or
    collapsed to one vector where the parent's (mean pairwise cosine ``before``) were not.

    Raises:
        TrainingDivergedError: a non-finite output (``rates``: the learning rates to lower).
        TrainingCollapsedError: a mean pairwise cosine of at least :data:`COLLAPSED`.
    """
    out = outputs(module, data, sample)
    if not np.isfinite(out).all():
        raise TrainingDivergedError("the tuned backbone's output on training items", rates)
    after = mean_cosine(out)
    if len(sample) > 1 and after >= COLLAPSED and before < COLLAPSED:
        raise TrainingCollapsedError(f"the tuned backbone's output on {len(sample)} training items", after, before,
                                     rates)


def chance_level(y: np.ndarray, val_idx: np.ndarray | None, classes: int, history: list[dict[str, Any]]) -> list[str]:
    """A warning when the best validation accuracy is no better than always answering the
    validation items' most common class (the tuned backbone then learned nothing that shows)."""
    accuracies = [row["val_accuracy"] for row in history if row.get("val_accuracy") is not None]
    if val_idx is None or not len(val_idx) or not accuracies:
        return []
    counts = np.bincount(y[val_idx], minlength=classes)
    chance = float(counts.max() / counts.sum())
    best = max(accuracies)
    if best > chance + 1e-9:
        return []
    return [f"validation accuracy {best:.4f} is at chance level (the most common class is {chance:.4f} of the "
            f"{len(val_idx)} validation items): the fine-tune learned nothing that validation shows; check the "
            "labels, or lower the learning rates (lr, head_lr) if the training loss did not fall"]
