"""Learning curves: accuracy and training time vs labelled examples per class, a head on frozen
features against a from-scratch baseline (and a fine-tuned backbone where affordable)."""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import numpy as np

from ..errors import DatasetError, UnsupportedInputError
from .catalog import Progress, check_head, fit_head, make_head, neighbours_of
from .splits import check_classes

logger = logging.getLogger(__name__)


def baseline_features(modality: str, payloads: list[Any]) -> Any:
    """What the from-scratch baseline sees: raw texts (TF-IDF is fitted per run) or raw pixels."""
    if modality == "text":
        return np.asarray([p if isinstance(p, str) else "" for p in payloads], dtype=object)
    from PIL import Image

    rows = []
    for p in payloads:  # 32x32 RGB thumbnails, the classic raw-pixel baseline
        try:
            with Image.open(p) as image:
                rows.append(np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32).ravel() / 255.0)
        except (OSError, ValueError):
            rows.append(np.zeros(32 * 32 * 3, np.float32))
    return np.stack(rows)


def _baseline(modality: str) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if modality == "text":
        from sklearn.feature_extraction.text import TfidfVectorizer

        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000))
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def learning_curve(X: np.ndarray, raw: Any, y: np.ndarray, modality: str, head: str = "logreg",
                   params: dict[str, Any] | None = None, repeats: int = 3, test_size: float = 0.3,
                   seed: int = 0, progress: Progress | None = None, finetuned: Any = None,
                   finetune_max_items: int = 0) -> list[dict[str, Any]]:
    """Accuracy and training time vs labelled examples per class, frozen-backbone head vs baseline
    (and a fine-tuned backbone where affordable).

    One stratified held-out split is fixed; for each size (1, 2, 4, ... per class, then all)
    ``repeats`` random subsets of the rest train both models. Training time is the head's fit on
    cached features (extraction is paid once, see ``embedkit extract``) vs the baseline's fit.
    With ``finetuned`` (a :class:`embedkit.finetuning.curves.FinetunedCurve`: ``fit_predict(train_idx,
    test_idx) -> (predictions, fit seconds)`` over the same rows, and a ``name``), the first
    subset of each size of at most ``finetune_max_items`` items also fine-tunes the backbone.
    Classes with a single example are left out (logged); ``progress(done, total)`` follows the fits.

    Raises:
        DatasetError: fewer than 2 classes with 2 or more examples.
    """
    from sklearn.model_selection import train_test_split

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    check_head(head, params)
    classes, counts = check_classes(y)
    rare = classes[counts < 2].tolist()
    index = np.arange(len(y))
    if len(rare):  # one example cannot be both learnt and held out: left out of the curve, said so
        logger.warning("learning curve: %d class(es) with a single labelled example left out (%s)", len(rare),
                       ", ".join(repr(c) for c in rare[:5]) + (" ..." if len(rare) > 5 else ""))
        index = index[~np.isin(y, rare)]
        if len(np.unique(y[index])) < 2:
            raise DatasetError("a learning curve needs at least 2 classes with 2 or more labelled examples each")
    kept = len(np.unique(y[index]))
    n_test = min(max(math.ceil(test_size * len(index)), kept), len(index) - kept)  # every class on both sides
    train_idx, test_idx = train_test_split(index, test_size=n_test, random_state=seed, stratify=y[index])
    classes = np.unique(y[train_idx])
    # Sizes grow to the median class size; a smaller class gives all it has at the larger sizes.
    largest = int(np.median([int((y[train_idx] == c).sum()) for c in classes]))
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    sizes.append(0)  # 0 = all training items
    neighbours = neighbours_of(make_head(head, params))
    if neighbours is not None:
        # a k-nearest-neighbour head cannot predict from fewer items than k: those sizes are left out
        picked = {size: sum(min(size, int((y[train_idx] == c).sum())) if size else int((y[train_idx] == c).sum())
                            for c in classes) for size in sizes}
        if picked[0] < neighbours:
            raise UnsupportedInputError(f"params: the {head} head asks for n_neighbors={neighbours}, but the curve "
                                        f"trains on at most {picked[0]} items; use at most n_neighbors={picked[0]}")
        dropped = [size for size in sizes if picked[size] < neighbours]
        if dropped:
            logger.warning("learning curve: sizes of %s example(s) per class left out: fewer items than "
                           "n_neighbors=%d", ", ".join(map(str, dropped)), neighbours)
            sizes = [size for size in sizes if size not in dropped]
    rows: list[dict[str, Any]] = []
    total = 2 * (repeats * (len(sizes) - 1) + 1)
    tuned_sizes = set()
    if finetuned is not None:
        tuned_sizes = {size for size in sizes if _picked(y, train_idx, classes, size) <= finetune_max_items}
        total += len(tuned_sizes)
    for size in sizes:
        for r in range(repeats if size else 1):
            rng = np.random.default_rng(seed + 1000 * r + size)
            if size:
                pick = np.concatenate([
                    rng.choice(members, min(size, len(members)), replace=False)
                    for members in (train_idx[y[train_idx] == c] for c in classes)
                ])
            else:
                pick = train_idx
            for name, model, features in (
                (f"{head} on frozen features", make_head(head, params), X),
                ("from-scratch baseline", _baseline(modality), raw),
            ):
                start = time.perf_counter()
                with warnings.catch_warnings():  # one example per class is the point of the curve
                    warnings.simplefilter("ignore", UserWarning)
                    fit_head(model, name, features[pick], y[pick])
                seconds = time.perf_counter() - start
                accuracy = float((model.predict(features[test_idx]) == y[test_idx]).mean())
                rows.append({"per_class": size or "all", "train_items": int(len(pick)), "repeat": r, "model": name,
                             "accuracy": accuracy, "train_seconds": seconds})
                if progress is not None:
                    progress(len(rows), total)
            if r == 0 and size in tuned_sizes:  # the costly one: one subset per affordable size
                pred, seconds = finetuned.fit_predict(pick, test_idx)
                rows.append({"per_class": size or "all", "train_items": int(len(pick)), "repeat": r,
                             "model": finetuned.name, "accuracy": float((np.asarray(pred) == y[test_idx]).mean()),
                             "train_seconds": seconds})
                if progress is not None:
                    progress(len(rows), total)
    return rows


def _picked(y: np.ndarray, train_idx: np.ndarray, classes: np.ndarray, size: int) -> int:
    """How many items a subset of ``size`` per class (0: all) holds."""
    counts = [int((y[train_idx] == c).sum()) for c in classes]
    return sum(min(size, n) if size else n for n in counts)
