"""Train a head on cached features: labels joined to the store, metrics, a confusion matrix, a saved model."""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DatasetError, UnsupportedInputError
from .plots import plot_confusion

logger = logging.getLogger(__name__)

# name -> (module, class, default parameters); classes are imported only when asked for.
_HEADS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "logreg": ("sklearn.linear_model", "LogisticRegression", {"max_iter": 2000}),
    "linear-svm": ("sklearn.svm", "LinearSVC", {}),
    "ridge": ("sklearn.linear_model", "RidgeClassifier", {}),
    "mlp": ("sklearn.neural_network", "MLPClassifier", {"max_iter": 500, "random_state": 0}),
    "knn": ("sklearn.neighbors", "KNeighborsClassifier", {}),
    "faiss-knn": ("embedkit.heads", "FaissKNNClassifier", {}),
}
HEADS = tuple(_HEADS)


def make_head(kind: str, params: dict[str, Any] | None = None) -> Any:
    """A scikit-learn (or FAISS) head by name, with parameters."""
    if kind not in _HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    module, name, defaults = _HEADS[kind]
    return getattr(import_module(module), name)(**{**defaults, **(params or {})})


def check_head(kind: str, params: dict[str, Any] | None = None) -> Any:
    """:func:`make_head`, with unknown parameter names and (scikit-learn heads) bad values refused
    up front as :class:`UnsupportedInputError` naming the head's parameters.

    Values that only fitting can check (e.g. FAISS heads') are refused by :func:`evaluate`.
    """
    try:
        head = make_head(kind, params)
    except TypeError as exc:
        module, name, _ = _HEADS[kind]
        valid = ", ".join(sorted(getattr(import_module(module), name)().get_params()))
        raise UnsupportedInputError(f"--param: {exc}; the {kind} head takes: {valid}") from None
    if getattr(type(head), "_parameter_constraints", None) is not None:
        try:
            head._validate_params()  # scikit-learn's own check, which fit would run later
        except (TypeError, ValueError) as exc:
            raise UnsupportedInputError(f"--param: {exc}") from None
    return head


def _fit(head: Any, kind: str, X: np.ndarray, y: np.ndarray) -> Any:
    """``head.fit(X, y)``; a parameter the head refuses at fit is an input error, not a crash."""
    try:
        return head.fit(X, y)
    except ValueError as exc:
        if str(exc).split(" ")[0] in head.get_params():  # "n_neighbors must be a positive int, got 0"
            raise UnsupportedInputError(f"--param: the {kind} head refused its parameters: {exc}") from None
        raise


def _check_neighbors(head: Any, kind: str, n_train: int) -> None:
    """A k-nearest-neighbour head asked for more neighbours than it is trained on fails only at
    predict (scikit-learn and FAISS alike): refuse it as an input error before fitting."""
    k = head.get_params().get("n_neighbors") if hasattr(head, "get_params") else None
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > n_train:
        raise UnsupportedInputError(f"--param: the {kind} head asks for n_neighbors={k}, but only {n_train} items "
                                    f"are trained on; use at most n_neighbors={n_train}")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["C=10", "weights=distance"]`` -> ``{"C": 10, "weights": "distance"}`` (JSON values when they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UnsupportedInputError(f"--param takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def labels_for(ids: np.ndarray, sources: np.ndarray, labels: str, modality: str, label_column: str = "label",
               id_column: str | None = None, column: str | None = None,
               contents: np.ndarray | None = None) -> np.ndarray:
    """One label per stored item (None where unknown or ambiguous).

    ``labels`` is ``folder`` (the parent folder of each image's path) or a table: with an id
    column (``id_column`` or ``id``) it joins on ids; otherwise it recomputes each row's content
    id from its payload column exactly as extraction did.

    A join on user ids never gives one row's label to another row's vector: when the table
    also has the payload column, a row's label goes only to a stored vector of that row's
    content (``contents``: the stored content fingerprints, as :meth:`Namespace.load_all`
    returns them); an id whose rows carry different labels and cannot be told apart by
    content gets None. Both cases are logged with a count.
    """
    if labels == "folder":
        return np.asarray([Path(s).parent.name if s else None for s in sources], dtype=object)
    from .sources import iter_items, read_texts

    path = Path(labels)
    if not path.is_file():
        raise UnsupportedInputError(f"--labels {labels}: not a file (or 'folder' for image class subfolders)")
    values = read_texts(path, label_column)
    try:
        keys = [str(k) for k in read_texts(path, id_column or "id")]
    except UnsupportedInputError:
        if id_column:
            raise
        keys = [item.id for item in iter_items(path, modality, column)]
        # content ids: rows of one id have one content, but may carry different labels
        found: dict[str, dict[str, Any]] = {}
        for key, value in zip(keys, values):
            found.setdefault(key, {})[_label_key(value)] = value
        mapping = {key: next(iter(v.values())) if len(v) == 1 else None for key, v in found.items()}
        ambiguous = sum(1 for i in ids if len(found.get(str(i), ())) > 1)
        if ambiguous:
            logger.warning("labels %s: %d items appear in rows with different labels; they are left unlabelled",
                           path.name, ambiguous)
        return np.asarray([mapping.get(str(i)) for i in ids], dtype=object)
    return _join_user_ids(ids, contents, path, keys, values, modality, column)


def _join_user_ids(ids: np.ndarray, contents: np.ndarray | None, path: Path, keys: list[str], values: list[Any],
                   modality: str, column: str | None) -> np.ndarray:
    from .sources import iter_items

    try:  # each row's content fingerprint, computed as extraction computed it
        fps: list[str | None] = [item.id for item in iter_items(path, modality, column)]
        if len(fps) != len(keys):
            raise UnsupportedInputError(f"{len(fps)} payloads for {len(keys)} ids")
    except UnsupportedInputError as exc:
        logger.info("labels %s: no payload column to check contents (%s); joining on ids alone", path.name, exc)
        fps = [None] * len(keys)
    rows: dict[str, list[tuple[Any, str | None]]] = {}
    for key, value, fp in zip(keys, values, fps):
        rows.setdefault(key, []).append((value, fp))
    stored = contents if contents is not None else [""] * len(ids)
    out, stale, ambiguous = [], 0, 0
    for item, fp in zip(ids, stored):
        candidates = rows.get(str(item), [])
        if fp and any(f is not None for _, f in candidates):
            matching = [v for v, f in candidates if f == fp]
            if not matching:
                stale += 1  # the table's row for this id has another content than the stored vector
            candidates = [(v, fp) for v in matching]
        found = {_label_key(v) for v, _ in candidates}
        if len(found) > 1:
            ambiguous += 1
        out.append(candidates[0][0] if len(found) == 1 else None)
    if stale:
        logger.warning("labels %s: %d ids have another content in the table than in the store (edited since "
                       "extract?); they are left unlabelled: run extract again", path.name, stale)
    if ambiguous:
        logger.warning("labels %s: %d ids name rows with different labels; they are left unlabelled",
                       path.name, ambiguous)
    return np.asarray(out, dtype=object)


def _label_key(value: Any) -> str:
    """A hashable, comparable form of a label value (NaN equals NaN)."""
    return json.dumps(value, default=str, sort_keys=True)


@dataclass
class HeadReport:
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


Progress = Callable[[int, int], None]  # (steps done, steps in all), for a progress bar


def check_classes(y: np.ndarray, cv: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classes of ``y`` and their counts, refusing what no classifier can learn or score.

    Raises:
        DatasetError: fewer than two classes, or ``cv`` folds with a class smaller than ``cv``.
    """
    classes, counts = np.unique(y, return_counts=True)
    if len(y) == 0:
        raise DatasetError("no labelled items: check --labels / --label-column (and the id join)")
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
    _check_neighbors(head, kind, len(train_idx))
    if cv:
        _check_neighbors(head, kind, min(len(a) for a, _ in StratifiedKFold(n_splits=cv).split(X, y)))
    start = time.perf_counter()
    _fit(head, kind, X[train_idx], y[train_idx])
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
    progress: Progress | None = None,
) -> tuple[HeadReport, Path | None]:
    """Train a head on a feature store's cached (memory-mapped) features.

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
    from .atomic import staged_folder
    from .embedder import Embedder
    from .outputs import check_output, replaceable, stamp
    from .persistence import save
    from .store import FeatureStore

    folder = None
    if out is not None:
        folder = check_output(out, "train-head", inputs=[features] + ([] if labels == "folder" else [labels]))
    namespace = FeatureStore(features).find(backbone)
    ids, X, sources, contents = namespace.load_all()
    y = labels_for(ids, sources, labels, namespace.info.get("modality", "text"), label_column, id_column, column,
                   contents=contents)
    known = np.asarray([v is not None and v == v and v != "" for v in y], dtype=bool)
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
        embedder = Embedder(namespace.digest, store=store).fit()
        save((embedder, fitted), staging / "model")
        (staging / "report.json").write_text(json.dumps({**stamp("train-head"), **report.to_json()}, indent=2))
    return report, folder / "model"


def _baseline_features(modality: str, payloads: list[Any]) -> Any:
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
    With ``finetuned`` (a :class:`embedkit.curves.FinetunedCurve`: ``fit_predict(train_idx,
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
    neighbours = make_head(head, params).get_params().get("n_neighbors")
    if isinstance(neighbours, (int, np.integer)) and not isinstance(neighbours, bool):
        # a k-nearest-neighbour head cannot predict from fewer items than k: those sizes are left out
        picked = {size: sum(min(size, int((y[train_idx] == c).sum())) if size else int((y[train_idx] == c).sum())
                            for c in classes) for size in sizes}
        if picked[0] < neighbours:
            raise UnsupportedInputError(f"--param: the {head} head asks for n_neighbors={neighbours}, but the curve "
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
                    _fit(model, name, features[pick], y[pick])
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
