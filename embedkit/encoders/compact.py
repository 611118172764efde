"""Compact vectors: truncated dimensions and int8 / uint8 / binary precision, as a declared choice.

A :class:`Compact` turns float32 embeddings ``(N, D)`` into smaller rows, and says how (its
:meth:`~Compact.describe` goes into the provenance of every vector it made):

==============  ===========================  ============  =====================================
precision       rows                         bytes/vector  recipe
==============  ===========================  ============  =====================================
``float32``     float32 ``(N, d)``           4 d           the embedding itself
``int8``        int8 ``(N, d)``              d             per-dimension affine map of the
                                                           calibration range onto -128..127
``uint8``       uint8 ``(N, d)``             d             the same onto 0..255
``binary``      uint8 ``(N, ceil(d / 8))``   d / 8         sign bit per dimension (> 0 -> 1),
                                                           packed big-endian (``np.packbits``)
==============  ===========================  ============  =====================================

``d`` is ``dimensions`` when given (the first ``d`` dimensions, renormalised to unit L2 norm,
as OpenAI's ``dimensions`` parameter does), else the backbone's ``D``. Truncation suits models
trained for it (Matryoshka representation learning, Kusupati et al. 2022); a backbone not
trained for it loses quality, measured by ``benchmarks/compact.py``.

The int8 / uint8 recipe is sentence-transformers' ``quantize_embeddings`` (``ranges`` of shape
``(2, d)``: per-dimension minimum and maximum of calibration embeddings, 255 steps between them;
sentence_transformers/quantization.py), with two differences: values are rounded to the nearest
step instead of truncated, and values outside the calibration range are clipped instead of
wrapping around. The binary recipe is its ``ubinary`` (packed sign bits, uint8; FAISS binary
indexes take this layout). The calibration is fitted on the user's own vectors
(:meth:`Calibration.fit`), recorded (:meth:`Calibration.to_dict`), and reused, so every later
vector of a namespace is quantised the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from .embeddings import Embeddings

PRECISIONS = ("float32", "int8", "uint8", "binary")
CALIBRATED = ("int8", "uint8")
CALIBRATION_ROWS = 100_000  # at most this many rows are read to fit a calibration (a seeded sample)


def _as_float(vectors: Any) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise UsageError(f"expected embeddings of shape (N, D), got shape {x.shape}")
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise UsageError(f"expected float embeddings, got dtype {x.dtype}")
        x = x.astype(np.float32)
    return x


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-dimension ranges for int8 / uint8: ``low`` and ``high``, float32 ``(d,)``.

    ``rows`` is how many vectors they were computed from, ``source`` where those came from
    (e.g. ``store:minilm-l6/1a2b3c4d5e6f``), both recorded for provenance.
    """

    low: np.ndarray
    high: np.ndarray
    rows: int
    source: str = ""

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float32).reshape(-1)
        high = np.asarray(self.high, dtype=np.float32).reshape(-1)
        if low.shape != high.shape or low.size == 0:
            raise UsageError(f"calibration ranges must be two equal non-empty vectors, got {low.shape} and {high.shape}")
        if not (np.isfinite(low).all() and np.isfinite(high).all()) or (high < low).any():
            raise UsageError("calibration ranges must be finite with high >= low in every dimension")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def dim(self) -> int:
        return int(self.low.size)

    @property
    def digest(self) -> str:
        """sha256 of the ranges (float32 little-endian bytes, low then high): 64 hex characters."""
        return hashlib.sha256(self.low.astype("<f4").tobytes() + self.high.astype("<f4").tobytes()).hexdigest()

    @classmethod
    def fit(cls, vectors: Any, source: str = "", max_rows: int = CALIBRATION_ROWS, seed: int = 0) -> "Calibration":
        """Ranges from embeddings ``(N, d)`` float32 (already truncated to the ``dimensions`` used).

        At most ``max_rows`` rows are used (a seeded sample, so a refit on the same vectors gives
        the same ranges). Raises UsageError on fewer than 2 rows or non-finite values.
        """
        x = _as_float(vectors)
        if len(x) < 2:
            raise UsageError(f"a calibration needs at least 2 vectors, got {len(x)}")
        if len(x) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
            x = np.asarray(x[pick])
        if not np.isfinite(x).all():
            raise UsageError("calibration vectors must be finite")
        return cls(x.min(axis=0), x.max(axis=0), rows=len(x), source=source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record (floats written with enough digits to round-trip float32)."""
        return {"low": [float(v) for v in self.low], "high": [float(v) for v in self.high], "rows": self.rows,
                "source": self.source, "sha256": self.digest}

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration":
        """The inverse of :meth:`to_dict`; raises UsageError on a malformed or altered record.

        The record must carry its ``sha256`` (every record embedkit writes does): a record without
        one cannot be verified and is refused, so an edited range cannot pass by dropping it. Ranges
        of your own are ``Calibration(low, high, rows, source)``."""
        if not isinstance(data, dict):
            raise UsageError(f"malformed calibration record: a JSON object is expected, got {type(data).__name__}")
        try:
            cal = cls(np.asarray(data["low"], np.float32), np.asarray(data["high"], np.float32),
                      rows=int(data["rows"]), source=str(data.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed calibration record: {exc}") from exc
        if "sha256" not in data:
            raise UsageError("calibration record has no sha256: it cannot be verified, so it is not used (records "
                             "that embedkit writes carry one; make a record of your own ranges with "
                             "Calibration(low, high, rows).to_dict())")
        if data["sha256"] != cal.digest:
            raise UsageError("calibration record does not match its sha256: it was altered or damaged")
        return cal


@dataclass(frozen=True, eq=False)
class Compact:
    """A declared way of making vectors smaller (see the module docstring).

    Args:
        dimensions: keep the first ``dimensions`` (then renormalise); None keeps all.
        precision: ``float32`` | ``int8`` | ``uint8`` | ``binary``.
        calibration: required for ``int8`` / ``uint8`` (its ``dim`` must equal the dimensions
            kept); refused for the others.

    Raises:
        UsageError: an unknown precision, dimensions not a positive int, a missing or
            mismatched calibration.
    """

    dimensions: int | None = None
    precision: str = "float32"
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
            raise UsageError(f"dimensions must be a positive int or None, got {d!r}")
        if self.precision in CALIBRATED and self.calibration is None:
            raise UsageError(f"precision {self.precision!r} needs a calibration: ranges fitted on your own vectors "
                             "(Calibration.fit, or a store namespace's recorded calibration)")
        if self.precision not in CALIBRATED and self.calibration is not None:
            raise UsageError(f"precision {self.precision!r} takes no calibration")
        if d is not None and self.calibration is not None and self.calibration.dim != d:
            raise UsageError(f"the calibration has {self.calibration.dim} dimensions, dimensions={d}")

    @property
    def is_float(self) -> bool:
        """True when this changes nothing (all dimensions, float32)."""
        return self.dimensions is None and self.precision == "float32"

    def output_dim(self, dim: int) -> int:
        """Dimensions kept of a ``dim``-dimensional embedding; raises UsageError when ``dimensions > dim``."""
        if self.dimensions is not None and self.dimensions > dim:
            raise UsageError(f"dimensions={self.dimensions} but the backbone gives {dim}")
        if self.calibration is not None and self.dimensions is None and self.calibration.dim != dim:
            raise UsageError(f"the calibration has {self.calibration.dim} dimensions, the backbone gives {dim}")
        return self.dimensions or dim

    def for_dim(self, dim: int) -> "Compact":
        """This Compact for a ``dim``-dimensional backbone: ``dimensions == dim`` keeps every dimension,
        so it is read as ``dimensions=None`` (the same vectors, the same namespace, no ``d{dim}`` twin;
        the service's ``dimensions`` does the same). Raises UsageError as :meth:`output_dim`."""
        self.output_dim(dim)
        if self.dimensions is not None and self.dimensions == dim:
            return Compact(None, self.precision, self.calibration)
        return self

    def width(self, dim: int) -> int:
        """Columns of a stored row: the dimensions kept, or their packed bytes for ``binary``."""
        d = self.output_dim(dim)
        return (d + 7) // 8 if self.precision == "binary" else d

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({"float32": np.float32, "int8": np.int8}.get(self.precision, np.uint8))

    def truncate(self, vectors: Any) -> np.ndarray:
        """float32 ``(N, d)``: the first ``dimensions`` of each row, renormalised to unit L2 norm
        (a zero row stays zero); the input itself when ``dimensions`` is None."""
        x = _as_float(vectors)
        d = self.output_dim(x.shape[1])
        if d == x.shape[1] and self.dimensions is None:
            return x
        x = np.array(x[:, :d], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
        return x

    def apply(self, vectors: Any) -> np.ndarray:
        """Compact rows of float32 embeddings ``(N, D)``: dtype :attr:`dtype`, ``(N, width(D))``."""
        x = self.truncate(vectors)
        if self.precision == "float32":
            return x
        if self.precision == "binary":
            return np.packbits(x > 0, axis=1)
        cal = self.calibration
        assert cal is not None
        steps = (cal.high - cal.low) / 255.0
        steps[steps == 0] = 1.0  # a constant dimension maps to the bottom step
        q = np.rint((x - cal.low) / steps)
        if self.precision == "int8":
            return np.clip(q - 128, -128, 127).astype(np.int8)
        return np.clip(q, 0, 255).astype(np.uint8)

    def restore(self, rows: Any) -> np.ndarray:
        """Approximate float32 ``(N, d)`` of compact rows: int8 / uint8 mapped back to the middle of
        their step, binary to -1 / +1 per dimension, float32 returned as is. For heads that need
        floats (a linear probe on int8 features) and for rescoring."""
        r = np.asarray(rows)
        if self.precision == "float32":
            return _as_float(r)
        if self.precision == "binary":
            d = self.dimensions or r.shape[1] * 8
            bits = np.unpackbits(r.astype(np.uint8), axis=1)[:, :d]
            return bits.astype(np.float32) * 2.0 - 1.0
        cal = self.calibration
        assert cal is not None
        steps = (cal.high - cal.low) / 255.0
        q = r.astype(np.float32) + (128.0 if self.precision == "int8" else 0.0)
        return (cal.low + q * steps).astype(np.float32)

    def tag(self) -> str:
        """A short name for folders and logs, e.g. ``d256-int8-1a2b3c4d``; ``""`` when :attr:`is_float`."""
        parts = [f"d{self.dimensions}"] if self.dimensions is not None else []
        if self.precision != "float32":
            parts.append(self.precision)
        if self.calibration is not None:
            parts.append(self.calibration.digest[:8])
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        """The provenance record of vectors made this way (JSON-safe)."""
        out: dict[str, Any] = {"precision": self.precision, "dimensions": self.dimensions}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out

    @classmethod
    def fitted(cls, vectors: Any, dimensions: int | None = None, precision: str = "int8", source: str = "",
               max_rows: int = CALIBRATION_ROWS) -> "Compact":
        """A Compact whose calibration (int8 / uint8) is fitted on float32 embeddings ``(N, D)``,
        truncated first exactly as :meth:`apply` will truncate them."""
        cal = None
        if precision in CALIBRATED:
            cal = Calibration.fit(cls(dimensions).truncate(vectors), source=source, max_rows=max_rows)
        return cls(dimensions, precision, cal)

    @classmethod
    def from_record(cls, record: Any) -> "Compact":
        """The inverse of :meth:`describe`; raises UsageError on a malformed record."""
        if not isinstance(record, dict):
            raise UsageError(f"malformed compact record: {type(record).__name__}")
        cal = record.get("calibration")
        return cls(record.get("dimensions"), record.get("precision", "float32"),
                   Calibration.from_dict(cal) if cal is not None else None)


def compact_result(result: Embeddings, compact: Compact) -> Embeddings:
    """Make ``result``'s vectors compact, in place, and record how (``result.compact``).

    ``result.vectors`` becomes ``(N, compact.width(D))`` of ``compact.dtype``; the rows of failed
    items (``ok`` False) are zero for int8 / uint8 / binary and NaN for float32. Per-window rows
    (``result.chunks``) stay float32. Returns ``result``.
    """
    ok = np.asarray(result.ok, dtype=bool)
    dim = result.vectors.shape[1]
    fill = np.nan if compact.dtype == np.float32 else 0
    rows = np.full((len(ok), compact.width(dim)), fill, dtype=compact.dtype)
    if ok.any():
        rows[ok] = compact.apply(result.vectors[ok])
    result.vectors = rows
    result.compact = compact.describe()
    return result
