"""The fine-tuned line of ``embedkit report``: fine-tune on a subset, predict the held-out rows.

Each point is a real :func:`embedkit.finetune` run. Its backbones (the parent's export and
every fine-tune) go to a model store that the caller owns and throws away (a temporary folder
in ``embedkit report``), so a report leaves nothing behind in the user's model store.

A report killed with ``kill -9`` cannot throw its scratch store away (174-260 MB with MiniLM):
each curve marks its store as the scratch of its process (:data:`SCRATCH`: pid and start time),
and each new curve sweeps the temporary folder's ``embedkit-report-*`` stores whose marker names
a process that is gone, as the model store sweeps dead fine-tunes' staged weights. A folder
without that marker (not made by a curve) is never touched.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backbones.blocks import parse_unfreeze
from ..backbones.registry import get_backbone
from ..errors import UsageError
from ..fs.atomic import alive, write_atomic
from .checks import OBJECTIVES
from .finetune import finetune

logger = logging.getLogger(__name__)

DEFAULT_UNFREEZE = {"contrastive": "all", "classify": "last:2"}  # SetFit tunes the whole body
SCRATCH = ".embedkit-scratch.json"  # in a curve's scratch store: the process that may throw it away
PREFIX = "embedkit-report-"  # the scratch stores of `embedkit report` in the temporary folder


def _started(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell it from a later one of the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark_scratch(store: str | os.PathLike[str]) -> None:
    """Mark ``store`` as this process's scratch store (swept by :func:`sweep_scratch` once it is gone)."""
    write_atomic(Path(store) / SCRATCH, json.dumps({"kind": "finetune-scratch", "pid": os.getpid(),
                                                    "started": _started(os.getpid())}).encode())


def sweep_scratch(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the ``embedkit-report-*`` scratch stores in ``folder`` (default: the temporary folder)
    whose marker names a process that is gone; returns them."""
    swept = []
    for marker in sorted(Path(folder or tempfile.gettempdir()).glob(f"{PREFIX}*/{SCRATCH}")):
        scratch = marker.parent
        try:
            owner = json.loads(marker.read_text())
            pid = int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner.get("kind") != "finetune-scratch" or scratch.is_symlink():
            continue
        gone = not alive(pid) or (owner.get("started") is not None and _started(pid) not in (None, owner["started"]))
        if gone and pid != os.getpid():
            shutil.rmtree(scratch, ignore_errors=True)
            logger.info("removed the scratch model store %s of a report that ended without removing it", scratch)
            swept.append(scratch)
    return swept


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
        mark_scratch(self.store)
        sweep_scratch(Path(self.store).absolute().parent)

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
