"""The result of encoding: one row per item in input order, and why each failed item failed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..inputs.items import ItemError
from ..inputs.text import TextStats


@dataclass
class Embeddings:
    """The result of encoding a sequence of items.

    ``vectors`` has one row per input item in input order; rows of failed items are NaN and
    ``ok`` is False there, with the reason in ``errors`` (ok + failed == total, always).
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: list[ItemError] = field(default_factory=list)
    stats: Any = field(default_factory=TextStats)  # TextStats or ImageStats
    seconds: float = 0.0
