"""What every runtime offers the encoders: the seam between :mod:`embedkit.encoders` and the
engines of :mod:`embedkit.runtimes` (ONNX Runtime, torch, OpenVINO)."""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

Feeds = dict[str, np.ndarray]


@runtime_checkable
class RuntimeProtocol(Protocol):
    """Runs an artifact's graph on preprocessed batches.

    Attributes:
        device: ``cpu`` or ``cuda``: where it really runs (never a silent fallback).
        providers: what runs it, e.g. ``["CPUExecutionProvider"]`` or ``["torch-cpu"]``.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8-<variant>``.
    """

    device: str
    providers: list[str]
    precision: str

    def run(self, feeds: Feeds, stream: int = 0) -> np.ndarray:
        """One batch: ``feeds`` (name -> (N, ...) int64 token ids / float32 pixels) -> (N, D) float32."""
        ...

    def map(self, batches: Iterable[Feeds]) -> Iterator[np.ndarray]:
        """Many batches, in order; implementations may run several at once (streams)."""
        ...
