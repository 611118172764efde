"""The result of encoding: one row per item in input order, and why each failed item failed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..inputs.items import ItemError
from ..inputs.text import TextStats
from ..inputs.windows import Chunks


@dataclass
class Embeddings:
    """The result of encoding a sequence of items.

    ``vectors`` has one row per input item in input order; rows of failed items are NaN and
    ``ok`` is False there, with the reason in ``errors`` (ok + failed == total, always).
    ``chunks``: each window's vector, item, window number and spans, when a text encoder was
    asked for them (``encode(..., chunk_rows=True)`` with ``long="chunk"``; see
    :class:`~embedkit.inputs.windows.Chunks` for shapes and dtypes); else None.
    ``compact``: when the vectors were made compact (``precision`` / ``dimensions``), how:
    :meth:`~embedkit.encoders.compact.Compact.describe` (precision, dimensions, calibration);
    ``vectors`` are then the compact rows (see :func:`~embedkit.encoders.compact.compact_result`).
    None for float32 vectors of every dimension.
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: list[ItemError] = field(default_factory=list)
    stats: Any = field(default_factory=TextStats)  # TextStats or ImageStats
    seconds: float = 0.0
    chunks: Chunks | None = None
    compact: dict[str, Any] | None = None
