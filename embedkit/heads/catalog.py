"""Heads by name: made with their parameters, the parameters checked, fitted with input errors typed.

Library errors about a head's parameters start with ``params:`` (the Python parameter of
:func:`~embedkit.heads.training.train_head` and :func:`embedkit.report`); the CLI names its
``--param`` flag instead.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

import numpy as np

from ..errors import UnsupportedInputError

# name -> (module, class, default parameters); classes are imported only when asked for.
_HEADS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "logreg": ("sklearn.linear_model", "LogisticRegression", {"max_iter": 2000}),
    "linear-svm": ("sklearn.svm", "LinearSVC", {}),
    "ridge": ("sklearn.linear_model", "RidgeClassifier", {}),
    "mlp": ("sklearn.neural_network", "MLPClassifier", {"max_iter": 500, "random_state": 0}),
    "knn": ("sklearn.neighbors", "KNeighborsClassifier", {}),
    "faiss-knn": ("embedkit.heads.knn", "FaissKNNClassifier", {}),
    "binary-knn": ("embedkit.heads.binary", "BinaryKNNClassifier", {}),
}
HEADS = tuple(_HEADS)

Progress = Callable[[int, int], None]  # (steps done, steps in all), for a progress bar


def make_head(kind: str, params: dict[str, Any] | None = None) -> Any:
    """A scikit-learn (or FAISS) head by name, with parameters."""
    if kind not in _HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    module, name, defaults = _HEADS[kind]
    return getattr(import_module(module), name)(**{**defaults, **(params or {})})


def check_head(kind: str, params: dict[str, Any] | None = None) -> Any:
    """:func:`make_head`, with unknown parameter names and (scikit-learn heads) bad values refused
    up front as :class:`UnsupportedInputError` naming the head's parameters.

    Values that only fitting can check (e.g. FAISS heads') are refused by :func:`fit_head`.
    """
    try:
        head = make_head(kind, params)
    except TypeError as exc:
        module, name, _ = _HEADS[kind]
        valid = ", ".join(sorted(getattr(import_module(module), name)().get_params()))
        raise UnsupportedInputError(f"params: {exc}; the {kind} head takes: {valid}") from None
    if getattr(type(head), "_parameter_constraints", None) is not None:
        try:
            head._validate_params()  # scikit-learn's own check, which fit would run later
        except (TypeError, ValueError) as exc:
            raise UnsupportedInputError(f"params: {exc}") from None
    return head


def fit_head(head: Any, kind: str, X: Any, y: np.ndarray) -> Any:
    """``head.fit(X, y)``; a parameter the head refuses at fit is an input error, not a crash.

    Raises:
        UnsupportedInputError: the head refused one of its parameters (e.g. FAISS ``n_neighbors=0``).
    """
    try:
        return head.fit(X, y)
    except ValueError as exc:
        if str(exc).split(" ")[0] in head.get_params():  # "n_neighbors must be a positive int, got 0"
            raise UnsupportedInputError(f"params: the {kind} head refused its parameters: {exc}") from None
        raise


def neighbours_of(head: Any) -> int | None:
    """A k-nearest-neighbour head's ``n_neighbors`` (None for other heads)."""
    k = head.get_params().get("n_neighbors") if hasattr(head, "get_params") else None
    return int(k) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else None


def check_neighbors(head: Any, kind: str, n_train: int) -> None:
    """A k-nearest-neighbour head asked for more neighbours than it is trained on fails only at
    predict (scikit-learn and FAISS alike): refuse it as an input error before fitting."""
    k = neighbours_of(head)
    if k is not None and k > n_train:
        raise UnsupportedInputError(f"params: the {kind} head asks for n_neighbors={k}, but only {n_train} items "
                                    f"are trained on; use at most n_neighbors={n_train}")
