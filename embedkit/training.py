"""Train a head on cached features: labels joined to the store, metrics, a confusion matrix, a saved model."""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedInputError

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
        mapping = dict(zip(keys, values))  # content ids: rows of one id have one content
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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate(X: np.ndarray, y: np.ndarray, kind: str, params: dict[str, Any], cv: int = 0,
             test_size: float = 0.2, seed: int = 0, confusion_png: Path | None = None) -> HeadReport:
    """Holdout metrics (and k-fold accuracy when ``cv``), and a confusion-matrix PNG."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
    from sklearn.model_selection import cross_val_score, train_test_split

    counts = np.unique(y, return_counts=True)[1]
    stratify = y if counts.min() >= 2 else None
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=stratify)
    head = make_head(kind, params)
    start = time.perf_counter()
    head.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    pred = head.predict(X_test)
    report = HeadReport(
        head=kind, n_train=len(y_train), n_test=len(y_test), classes=len(np.unique(y)),
        accuracy=float(accuracy_score(y_test, pred)), macro_f1=float(f1_score(y_test, pred, average="macro")),
        fit_seconds=seconds, per_class=classification_report(y_test, pred, output_dict=True, zero_division=0),
    )
    if cv:
        report.cv_accuracy = [float(s) for s in cross_val_score(make_head(kind, params), X, y, cv=cv)]
    if confusion_png is not None:
        labels = np.unique(y)
        _plot_confusion(confusion_matrix(y_test, pred, labels=labels), labels, confusion_png,
                        f"{kind}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
    return report


def _plot_confusion(matrix: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, min(24.0, 0.25 * len(labels) + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, [str(v) for v in labels], rotation=90, fontsize=max(4, 10 - len(labels) // 10))
    ax.set_yticks(ticks, [str(v) for v in labels], fontsize=max(4, 10 - len(labels) // 10))
    if len(labels) <= 20:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_head(
    features: str | Path, backbone: str, labels: str, head: str = "logreg", params: dict[str, Any] | None = None,
    out: str | Path | None = None, label_column: str = "label", id_column: str | None = None,
    column: str | None = None, cv: int = 0, test_size: float = 0.2, store: str | None = None,
) -> tuple[HeadReport, Path | None]:
    """Train a head on a feature store's cached (memory-mapped) features.

    Measures holdout accuracy, macro-F1 and a per-class report (plus k-fold accuracy with
    ``cv``), then fits on every labelled item. With ``out``: writes the folder ``out`` with
    ``report.json`` (its marker, ``"kind": "train-head"``), ``confusion.png`` and the deployable
    model (``out/model``, see :func:`embedkit.load`), all at once: an earlier run's folder is
    replaced only when the new one is complete.

    Raises:
        OutputError: ``out`` is refused before any work (its folder is missing; it is, holds
            or lies inside ``features`` or ``labels``; it exists and is not an earlier
            train-head output, nor empty).
        UnsupportedInputError: fewer than two stored items have a label.
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
    known = np.asarray([v is not None and v == v and v != "" for v in y])
    if known.sum() < 2:
        raise UnsupportedInputError(f"only {int(known.sum())} of {len(ids)} stored items have a label in {labels}")
    X_known, y_known = np.asarray(X)[known], np.asarray(y[known]).astype(str)
    if folder is None:
        report = evaluate(X_known, y_known, head, params or {}, cv=cv, test_size=test_size)
        report.unlabelled = int((~known).sum())
        return report, None
    with staged_folder(folder, replaceable("train-head")) as staging:
        report = evaluate(X_known, y_known, head, params or {}, cv=cv, test_size=test_size,
                          confusion_png=staging / "confusion.png")
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
                   seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy and training time vs labelled examples per class, frozen-backbone head vs baseline.

    One stratified held-out split is fixed; for each size (1, 2, 4, ... per class, then all)
    ``repeats`` random subsets of the rest train both models. Training time is the head's fit on
    cached features (extraction is paid once, see ``embedkit extract``) vs the baseline's fit.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(index, test_size=test_size, random_state=seed, stratify=y)
    classes = np.unique(y[train_idx])
    # Sizes grow to the median class size; a smaller class gives all it has at the larger sizes.
    largest = int(np.median([int((y[train_idx] == c).sum()) for c in classes]))
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    sizes.append(0)  # 0 = all training items
    rows = []
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
                    model.fit(features[pick], y[pick])
                seconds = time.perf_counter() - start
                accuracy = float((model.predict(features[test_idx]) == y[test_idx]).mean())
                rows.append({"per_class": size or "all", "train_items": int(len(pick)), "repeat": r, "model": name,
                             "accuracy": accuracy, "train_seconds": seconds})
    return rows


def plot_learning_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        points: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["model"] == model:
                points.setdefault(r["train_items"], []).append(r)
        xs = sorted(points)
        left.plot(xs, [np.mean([p["accuracy"] for p in points[x]]) for x in xs], marker="o", label=model)
        right.plot(xs, [np.mean([p["train_seconds"] for p in points[x]]) for x in xs], marker="o", label=model)
    for ax, label in ((left, "held-out accuracy"), (right, "training time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled training items (1, 2, 4, ... per class, then all)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
