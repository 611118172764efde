"""The fine-tuned line of ``embedkit report``: fine-tune on a subset, predict the held-out rows.

Each point is a real :func:`embedkit.finetune` run. Its backbones (the parent's export and
every fine-tune) go to a model store that the caller owns and throws away (a temporary folder
in ``embedkit report``), so a report leaves nothing behind in the user's model store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..backbones.blocks import parse_unfreeze
from ..backbones.registry import get_backbone
from ..errors import UsageError
from .checks import OBJECTIVES
from .finetune import finetune

logger = logging.getLogger(__name__)

DEFAULT_UNFREEZE = {"contrastive": "all", "classify": "last:2"}  # SetFit tunes the whole body


@dataclass
class FinetunedCurve:
    """``fit_predict(train_idx, test_idx)`` fine-tunes ``backbone`` on ``items[train_idx]`` and
    predicts ``items[test_idx]``; rows index ``items`` and ``labels`` (one label per item).

    Attributes:
        backbone: the parent backbone's name or spec (the one the features were extracted with).
        items: raw items (texts, or image paths), one per row of the curve.
        labels: one label per item.
        store: a model store folder the caller throws away afterwards.
        objective: ``contrastive`` (text only, SetFit) or ``classify``.
        unfreeze: ``head`` | ``last:N`` | ``all``; default: ``all`` for contrastive, ``last:2`` for classify.
        options: more :func:`embedkit.finetune` keywords (``epochs``, ``lr``, ``iterations``...).
    """

    backbone: str
    items: Sequence[Any]
    labels: np.ndarray
    store: str
    objective: str = "contrastive"
    unfreeze: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:

        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.unfreeze is None:
            self.unfreeze = DEFAULT_UNFREEZE[self.objective]
        parse_unfreeze(self.unfreeze)  # a bad spec is refused before the curve starts

        parent = get_backbone(self.backbone)
        if parent.onnx is not None:
            raise UsageError(f"backbone {parent.name!r} is ONNX-only: it has no torch module to fine-tune; "
                             "draw the learning curve without a fine-tuned line")
        if self.objective == "contrastive" and parent.modality != "text":
            raise UsageError("objective='contrastive' (SetFit) is for text backbones; use objective='classify'")
        if len(self.items) != len(self.labels):
            raise UsageError(f"{len(self.items)} items for {len(self.labels)} labels")

    @property
    def name(self) -> str:
        return f"fine-tuned ({self.objective}, {self.unfreeze})"

    def fit_predict(self, train_idx: np.ndarray, test_idx: np.ndarray) -> tuple[np.ndarray, float]:
        """``(predictions for test_idx, seconds the fine-tune took)``."""

        options = {"validation": None, **self.options}
        start = time.perf_counter()
        result = finetune(self.backbone, [self.items[i] for i in train_idx], self.labels[train_idx].tolist(),
                          objective=self.objective, unfreeze=self.unfreeze, store=self.store, **options)
        seconds = time.perf_counter() - start
        if result.failures:
            logger.warning("fine-tuned curve: %d items excluded (could not be read)", len(result.failures))
        return np.asarray(result.model.predict([self.items[i] for i in test_idx])), seconds
