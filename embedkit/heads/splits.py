"""Labelled data checked and split: classes a classifier can learn, a held-out part that copes with small data."""
from __future__ import annotations

import math

import numpy as np

from ..errors import DatasetError


def check_classes(y: np.ndarray, cv: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classes of ``y`` and their counts, refusing what no classifier can learn or score.

    Raises:
        DatasetError: no labels, fewer than two classes, or ``cv`` folds with a class smaller than ``cv``.
    """
    classes, counts = np.unique(y, return_counts=True)
    if len(y) == 0:
        raise DatasetError("y is empty: no labelled items; check the labels and their label_column (and the id join)")
    if len(classes) < 2:
        raise DatasetError(f"all {len(y)} labelled items have the label {str(classes[0])!r}; a classifier needs "
                           "at least 2 classes")
    if cv and counts.min() < cv:
        small, least = str(classes[int(np.argmin(counts))]), int(counts.min())
        fix = f"use at most {least} folds or none" if least >= 2 else "label more items of that class, or use no cv"
        raise DatasetError(f"{cv}-fold cross-validation needs at least {cv} labelled items in every class, but "
                           f"class {small!r} has {least}; {fix}")
    return classes, counts


def holdout_split(y: np.ndarray, test_size: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(train_idx, test_idx, notes)``: a stratified held-out split that copes with small data.

    Classes with one example cannot be both learnt and scored: they go to training only.
    The held-out part holds at least one item of every other class (raised from
    ``test_size`` when needed) and leaves at least one of each for training.

    Raises:
        DatasetError: no class has two examples, so nothing can be held out.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be a fraction between 0 and 1, got {test_size!r}")
    classes, counts = np.unique(y, return_counts=True)
    notes: list[str] = []
    single = set(classes[counts < 2].tolist())
    pool = np.flatnonzero([v not in single for v in y])
    if single:
        shown = ", ".join(repr(c) for c in sorted(single)[:5]) + (" ..." if len(single) > 5 else "")
        notes.append(f"{len(single)} class(es) have a single labelled example ({shown}): used for training only, "
                     "not scored")
    kept = len(classes) - len(single)
    if kept == 0:
        raise DatasetError(f"every one of the {len(classes)} classes has a single labelled example, so none can be "
                           "held out to measure accuracy; label at least 2 items per class")
    wanted = math.ceil(test_size * len(y))
    n_test = min(max(wanted, kept), len(pool) - kept)
    if n_test != wanted:
        notes.append(f"held-out part set to {n_test} items (not {wanted}) so that each of the {kept} scored "
                     "classes is both trained on and held out")
    train, test = train_test_split(pool, test_size=n_test, random_state=seed, stratify=y[pool])
    train = np.sort(np.concatenate([train, np.flatnonzero([v in single for v in y])])).astype(int)
    return train, np.sort(test), notes
