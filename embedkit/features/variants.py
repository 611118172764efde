"""Namespace variants: vectors of one artifact made another way never mix with the plain ones.

A namespace is the vectors of one artifact (its digest) made one way. The plain way (float32,
every dimension, long texts truncated) is today's namespace, ``STORE/<backbone>/<digest>/``.
Any other way is a *variant*, recorded in ``namespace.json`` as ``"variant"`` and named in the
folder, ``STORE/<backbone>/<digest>.<tag>/``:

=====================  ===============================================  =====================
what                   ``variant`` record                               tag
=====================  ===============================================  =====================
plain                  ``{}`` (or no ``variant`` key: older stores)     none: ``<digest>``
long texts chunked     ``{"long": "chunk", "chunk_overlap": 32,         ``chunk-o32-m64``
                       "max_chunks": 64}`` (the text policy's
                       ``TextTokenizer.identity()``)
compact vectors        ``{"compact": Compact.describe()}``: precision,  ``int8-1a2b3c4d``,
                       dimensions, the int8 / uint8 calibration (with   ``d256-binary``
                       its sha256)
both                   both keys                                        ``chunk-o32-m64.int8-1a2b3c4d``
per-chunk rows         the chunk keys and ``"rows": true`` (one row     ``chunk-o32-m64.rows``
                       per window, float32 only:
                       :mod:`embedkit.features.chunk_rows`)
=====================  ===============================================  =====================

The tag is derived from the record (:func:`tag`), so a folder whose name disagrees with its
record is refused on read. A reader asks for a variant by what it means (:class:`Wanted`:
precision, dimensions, long-text policy, per-chunk rows); a plain request never matches a variant,
and a request for pooled vectors never matches per-chunk rows (nor the reverse).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..encoders.compact import PRECISIONS, Compact
from ..errors import StoreError, UsageError
from ..inputs.text import TextTokenizer

READ_LONG = ("truncate", "chunk")  # "error" stores its vectors with the truncated ones: same vectors
_KEYS = ("long", "chunk_overlap", "max_chunks", "rows", "compact")
ROWS_TAG = "rows"  # the per-chunk rows of a chunk variant: ``chunk-o32-m64.rows``


def normalize(variant: Any) -> dict[str, Any]:
    """The canonical record of a variant (``{}`` for plain); raises UsageError when malformed.

    Accepts None, ``{}``, or a dict of ``long`` / ``chunk_overlap`` / ``max_chunks`` (all three,
    ``long == "chunk"``), ``rows`` (True: one row per window of the chunked texts, not their pooled
    vectors; needs the chunk keys, float32 only; False is dropped) and ``compact`` (a
    :meth:`Compact.describe` record; a float32 one with all dimensions is plain and dropped).
    """
    if variant is None:
        return {}
    if not isinstance(variant, dict):
        raise UsageError(f"a namespace variant is a dict, got {type(variant).__name__}")
    unknown = sorted(set(variant) - set(_KEYS))
    if unknown:
        raise UsageError(f"unknown namespace variant key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    out: dict[str, Any] = {}
    if any(k in variant for k in ("long", "chunk_overlap", "max_chunks")):
        if variant.get("long") != "chunk":
            raise UsageError(f"a variant's long is 'chunk' (truncate and error are plain), got {variant.get('long')!r}")
        overlap, most = variant.get("chunk_overlap"), variant.get("max_chunks")
        for name, value, low in (("chunk_overlap", overlap, 0), ("max_chunks", most, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"a chunk variant's {name} must be an int >= {low}, got {value!r}")
        out.update(long="chunk", chunk_overlap=overlap, max_chunks=most)
    if variant.get("compact") is not None:
        compact = Compact.from_record(variant["compact"])
        if not compact.is_float:
            out["compact"] = compact.describe()
    rows = variant.get("rows", False)
    if not isinstance(rows, bool):
        raise UsageError(f"a variant's rows is True or False, got {rows!r}")
    if rows and (out.get("long") != "chunk" or "compact" in out):
        raise UsageError("per-chunk rows (a variant's rows=True) are the float32 windows of chunked texts: they need "
                         "long='chunk' and no compact record")
    if rows:
        out["rows"] = True
    return out


def compact_of(variant: dict[str, Any]) -> Compact:
    """The :class:`Compact` of a (normalised) variant: ``Compact()`` (float32, all dimensions) when plain."""
    record = variant.get("compact")
    return Compact.from_record(record) if record else Compact()


def tag(variant: dict[str, Any]) -> str:
    """The folder suffix of a (normalised) variant, e.g. ``chunk-o32-m64.int8-1a2b3c4d`` or
    ``chunk-o32-m64.rows``; ``""`` when plain."""
    parts = []
    if variant.get("long") == "chunk":
        parts.append(f"chunk-o{variant['chunk_overlap']}-m{variant['max_chunks']}")
    if variant.get("rows"):
        parts.append(ROWS_TAG)
    if variant.get("compact"):
        parts.append(compact_of(variant).tag())
    return ".".join(parts)


def folder_name(digest: str, variant: dict[str, Any]) -> str:
    """``<digest>`` for the plain variant, else ``<digest>.<tag>``."""
    suffix = tag(variant)
    return f"{digest}.{suffix}" if suffix else digest


def label(variant: dict[str, Any]) -> str:
    """The variant for people: its tag, or ``plain``."""
    return tag(variant) or "plain"


def vector_bytes(compact: Compact, dim: int) -> int:
    """Bytes of one stored vector's values (Arrow's per-row overhead and the id not counted):
    4 d for float32, d for int8 / uint8, ceil(d / 8) for binary."""
    return compact.width(dim) * compact.dtype.itemsize


@dataclass(frozen=True)
class Wanted:
    """What a reader asks for: ``precision``, ``dimensions`` (None: all) and ``long``
    (``truncate`` or ``chunk``); ``chunk_overlap`` / ``max_chunks`` narrow a chunk request
    (None: any); ``chunk_rows`` asks for the per-chunk rows of a chunk request instead of its
    pooled vectors (float32, every dimension). Raises UsageError on an unknown value or
    ``chunk_rows`` without ``long="chunk"`` (or with a compact precision / dimensions)."""

    precision: str = "float32"
    dimensions: int | None = None
    long: str = "truncate"
    chunk_overlap: int | None = None
    max_chunks: int | None = None
    chunk_rows: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise UsageError(f"dimensions must be a positive int or None, got {d!r}")
        if self.long not in READ_LONG:
            hint = (" (long='error' stores its vectors with the truncated ones: read them with long='truncate')"
                    if self.long == "error" else "")
            raise UsageError(f"long must be one of {', '.join(READ_LONG)}, got {self.long!r}{hint}")
        if self.long != "chunk" and (self.chunk_overlap is not None or self.max_chunks is not None):
            raise UsageError("chunk_overlap and max_chunks narrow a long='chunk' request only")
        if not isinstance(self.chunk_rows, bool):
            raise UsageError(f"chunk_rows must be True or False, got {self.chunk_rows!r}")
        if self.chunk_rows and self.long != "chunk":
            raise UsageError("chunk_rows=True asks for the per-chunk rows of chunked texts: it needs long='chunk'")
        if self.chunk_rows and (self.precision != "float32" or self.dimensions is not None):
            raise UsageError("chunk_rows=True: per-chunk rows are stored as float32 with every dimension only")

    def matches(self, variant: dict[str, Any], dim: int | None = None) -> bool:
        """Whether a namespace of ``variant`` holds these vectors; with the backbone's ``dim``,
        ``dimensions == dim`` asks for every dimension (``dimensions=None``)."""
        if dim is not None and self.dimensions == dim:
            return replace(self, dimensions=None).matches(variant)
        chunked = variant.get("long") == "chunk"
        if chunked != (self.long == "chunk") or bool(variant.get("rows")) != self.chunk_rows:
            return False
        if chunked and any(want is not None and want != variant.get(key)
                           for key, want in (("chunk_overlap", self.chunk_overlap), ("max_chunks", self.max_chunks))):
            return False
        record = variant.get("compact") or {}
        return (record.get("precision", "float32") == self.precision
                and record.get("dimensions") == self.dimensions)

    def describe(self) -> str:
        parts = [self.precision] + ([f"dimensions={self.dimensions}"] if self.dimensions is not None else [])
        parts.append(f"long={self.long}")
        parts += [f"{k}={v}" for k, v in (("chunk_overlap", self.chunk_overlap), ("max_chunks", self.max_chunks))
                  if v is not None]
        return ", ".join(parts + (["chunk_rows=True"] if self.chunk_rows else []))


def commit_rows(key: str, compact: Compact, dim: int, n: int, vectors: Any) -> np.ndarray:
    """``vectors`` checked for a commit of ``n`` rows into a namespace of ``compact`` rows of a
    ``dim``-d backbone, contiguous: float (cast to float32, finite) when the namespace is float,
    exactly :attr:`Compact.dtype` otherwise, shape ``(n, compact.width(dim))``. Raises StoreError."""
    x = np.asarray(vectors)
    want, width = compact.dtype, compact.width(dim)
    if n == 0 and x.size == 0:
        return np.empty((0, width), want)
    if x.dtype.kind != "f" if want == np.float32 else x.dtype != want:
        raise StoreError(f"commit: {x.dtype} vectors, namespace {key} stores {want}")
    x = np.ascontiguousarray(x, dtype=want)
    if x.shape != (n, width):
        raise StoreError(f"commit: {n} ids but vectors of shape {x.shape} (namespace {key}: rows of {width} {want})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise StoreError("commit: non-finite embeddings never enter the store")
    return x


def long_variant(artifact: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The long-text part of a namespace's variant for encoder ``options`` (``long``,
    ``chunk_overlap``, ``max_chunks``, ``truncate``): the text policy's own identity
    (``TextTokenizer.identity()``, defaults filled in), ``{}`` unless ``long="chunk"`` on a text
    backbone. Raises UsageError for options the text policy refuses."""
    if artifact.modality != "text" or options.get("long") != "chunk":
        return {}
    given = {k: options[k] for k in ("truncate", "long", "chunk_overlap", "max_chunks") if options.get(k) is not None}
    try:
        return normalize(TextTokenizer(artifact.preprocess, **given).identity())
    except (TypeError, ValueError) as exc:
        raise UsageError(f"long-text options {given}: {exc}") from exc


LONG_KEYS = ("long", "chunk_overlap", "max_chunks")


def long_of(variant: dict[str, Any]) -> dict[str, Any]:
    """``{"long": "chunk", "chunk_overlap": O, "max_chunks": M}`` for a chunked namespace's
    variant, ``{}`` when its texts were truncated."""
    return {k: variant[k] for k in LONG_KEYS if k in variant}


def request(variant: dict[str, Any], style: str = "python", chunking: bool = True) -> str:
    """The options that ask for a namespace of ``variant`` (``python`` keywords or ``cli`` flags);
    ``chunking``: with its ``chunk_overlap`` and ``max_chunks`` (else ``long`` alone)."""
    compact = variant.get("compact") or {}
    pairs = [("precision", compact.get("precision")), ("dimensions", compact.get("dimensions"))]
    pairs += [(k, variant.get(k)) for k in (LONG_KEYS if chunking else LONG_KEYS[:1])]
    pairs = [(k, v) for k, v in pairs if v is not None and v != "float32"]
    pairs += [("chunk_rows", True)] if variant.get("rows") else []
    if not pairs:
        return "no option (the plain namespace)"
    if style == "cli":
        return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in pairs)
    return ", ".join(f"{k}={v!r}" for k, v in pairs)


def rivals_error(best: Any, rivals: list[Any], want: Wanted, style: str = "python") -> StoreError:
    """Two or more namespaces (:class:`~embedkit.features.namespace.Namespace`) of one digest answer
    ``want``: the error that says what tells them apart, in the caller's words (``style``: ``python``
    keywords or ``cli`` flags)."""
    spaces = [best] + sorted(rivals, key=lambda n: n.tag)
    head = (f"several namespaces of {best.name} ({best.digest[:12]}) answer {want.describe()}: "
            f"{', '.join(n.tag for n in spaces)}")
    settings = sorted({tuple(long_of(n.variant).items()) for n in spaces})
    if len(settings) > 1:
        flags = "--chunk-overlap N / --max-chunks N" if style == "cli" else "chunk_overlap= / max_chunks="
        each = "; ".join(f"{n.tag}: {request(long_of(n.variant), style)}" for n in spaces)
        return StoreError(f"{head}; they chunk texts differently: choose one with {flags} ({each})")
    lines = []
    for n in spaces:
        cal = n.compact.calibration
        made = (f"calibration sha256 {cal.digest[:16]}, fitted on {cal.rows} rows"
                + (f" of {cal.source}" if cal.source else "")) if cal is not None else "no calibration"
        lines.append(f"{n.path} ({made})")
    return StoreError(f"{head}; they differ only in their {best.compact.precision} calibration, which a request "
                      f"cannot name: {'; '.join(lines)}. Keep the one whose calibration you want in this store and "
                      "move the other folder to another store (a namespace copied from another store keeps the "
                      "calibration it was made with)")
