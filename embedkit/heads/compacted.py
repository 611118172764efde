"""Heads on compact vectors: a head trained on int8 / uint8 / binary / truncated features, applied
to new embeddings exactly as its training rows were made.

A head cannot fit on int8 codes as numbers (their scale is the calibration's, per dimension), so
it fits on :meth:`Compact.restore` of the stored rows: the float32 value in the middle of each
row's quantisation step (int8 / uint8), -1 / +1 per bit (binary), or the truncated, renormalised
float32 vector. :class:`CompactHead` holds that head with its :class:`Compact`; at predict time new
float32 embeddings ``(N, D)`` go through ``compact.restore(compact.apply(X))`` first, with the
recorded calibration, never as plain floats. A saved model records the Compact in ``model.json``
(``"compact"``: precision, dimensions and the calibration with its sha256; see
:mod:`embedkit.heads.persistence`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ..encoders.compact import Compact


def _inner_has(name: str) -> Any:
    def check(self: "CompactHead") -> bool:
        head = getattr(self, "head_", None)
        return hasattr(self.head if head is None else head, name)
    return check


class CompactHead(ClassifierMixin, BaseEstimator):
    """A classifier on compact vectors: ``head`` applied to ``compact.restore(compact.apply(X))``.

    Args:
        head: a scikit-learn classifier (cloned by :meth:`fit`).
        compact: the :class:`Compact` the training rows were made with (int8 / uint8 need their
            calibration).

    ``fit``, ``predict``, ``predict_proba`` and ``decision_function`` take float32 embeddings
    ``(N, D)`` (made compact here) or compact rows already made by ``compact`` (int8 / uint8
    ``(N, d)``, or packed bits uint8 ``(N, ceil(d / 8))``; told apart by their dtype).

    Raises:
        ValueError: ``compact`` is not a Compact, or rows of another width or dtype.
    """

    def __init__(self, head: Any = None, compact: Compact | None = None):
        self.head = head
        self.compact = compact

    def features(self, X: Any) -> np.ndarray:
        """float32 ``(N, d)``: what the head sees for embeddings or compact rows ``X``."""
        compact = self.compact
        if not isinstance(compact, Compact):
            raise ValueError(f"compact must be an embedkit Compact, got {type(compact).__name__}")
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {X.shape}")
        if compact.precision != "float32" and X.dtype == compact.dtype:  # rows made by this Compact
            d = compact.dimensions or (compact.calibration.dim if compact.calibration is not None else None)
            width = None if d is None else (d + 7) // 8 if compact.precision == "binary" else d
            if width is not None and X.shape[1] != width:
                raise ValueError(f"{compact.precision} rows of this Compact have {width} columns, got {X.shape[1]}")
            return compact.restore(X)
        if not np.issubdtype(X.dtype, np.floating):
            raise ValueError(f"expected float embeddings or {compact.dtype} rows of this Compact, got dtype {X.dtype}")
        return compact.restore(compact.apply(X))

    @classmethod
    def wrap(cls, head: Any, compact: Compact) -> "CompactHead":
        """A fitted CompactHead around ``head``, already fitted on ``compact.restore(rows)``."""
        check_is_fitted(head)
        self = cls(head, compact)
        self.head_ = head
        return self

    def fit(self, X: Any, y: Any) -> "CompactHead":
        self.head_ = clone(self.head).fit(self.features(X), y)
        return self

    @property
    def classes_(self) -> np.ndarray:
        check_is_fitted(self, "head_")
        return self.head_.classes_

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "head_")
        return self.head_.predict(self.features(X))

    @available_if(_inner_has("predict_proba"))
    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "head_")
        return self.head_.predict_proba(self.features(X))

    @available_if(_inner_has("decision_function"))
    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "head_")
        return self.head_.decision_function(self.features(X))
