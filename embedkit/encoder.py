"""The route from a backbone to an encoder: :func:`encoder_for` and :func:`embed`.

spec -> :func:`~embedkit.resolve` (an artifact, exported on first use) -> the runtime choice
(explicit, or the measurement recorded by :func:`~embedkit.tune`; with no record for this
device the measurement is made here, once, and logged: on CPU within a budget of seconds,
:func:`embedkit.encoders.tuning.first_use`; ``EMBEDKIT_TUNE=0`` or ``tune=False`` skips it and
ONNX Runtime runs, as before) -> :class:`~embedkit.TextEncoder` or
:class:`~embedkit.ImageEncoder` by the artifact's modality. Every caller that encodes items
(``embed``, ``Embedder``, extraction, the service, saved heads) comes through here.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from .encoders import calibrations, tuning
from .encoders.calibrations import FittedOn
from .encoders.compact import Compact, compact_result
from .encoders.embeddings import Embeddings
from .encoders.image import IMAGE_OPTIONS, ImageEncoder
from .encoders.text import TEXT_OPTIONS, TextEncoder
from .errors import UsageError
from .inputs.image import refuse_single_image
from .inputs.windows import long_policy
from .models.resolve import resolve
from .models.store import Artifact
from .runtimes.records import recorded
from .runtimes.select import actual_device

logger = logging.getLogger(__name__)

__all__ = ["Embeddings", "ImageEncoder", "TextEncoder", "embed", "encoder_for"]


def _measure_first_use(artifact: Artifact, device: str, tune: bool | None) -> None:
    """The first use of an artifact on a device with no recorded measurement: measure once, here,
    in the open (:func:`~embedkit.encoders.tuning.first_use` logs the choice and the time spent),
    never inside an encoder's constructor. The faster runtime differs by network on CUDA
    (MiniLM: ONNX Runtime; ResNet-50: torch, per DEVICE.md) and by machine on CPU (bf16 pays on
    AMX or AVX-512 BF16, not elsewhere). Off with ``tune=False`` or ``EMBEDKIT_TUNE=0``; a failed
    measurement is logged and ONNX Runtime is used."""
    if not tuning.first_use_enabled(tune) or recorded(artifact, device) is not None:
        return
    logger.info("no runtime measurement of %s on %s yet: measuring the candidates once (EMBEDKIT_TUNE=0 skips this)",
                artifact.name, device)
    tuning.first_use(artifact, device)


def refuse_idle_chunk_options(options: dict[str, Any]) -> None:
    """UsageError when ``chunk_overlap`` / ``max_chunks`` are given (not None) while the long-text
    policy is not ``"chunk"``: they would change nothing, silently (the CLI refuses the same)."""
    given = [k for k in ("chunk_overlap", "max_chunks") if options.get(k) is not None]
    if given and long_policy(options.get("long") or "truncate", options.get("truncate")) != "chunk":
        raise UsageError(f"{' and '.join(given)} apply with long='chunk'; this policy is "
                         f"long={options.get('long') or 'truncate'!r}")


def encoder_for(artifact: Artifact, tune: bool | None = None, **options: Any) -> "TextEncoder | ImageEncoder":
    """The encoder for the artifact's modality; options of the other modality are refused.

    With ``runtime="auto"`` (the default) and no recorded measurement for this artifact on this
    device, the candidates are measured first, once (``tune``: None follows ``EMBEDKIT_TUNE``,
    on unless ``0``; False never measures, True always may).
    """
    cls, allowed = (ImageEncoder, IMAGE_OPTIONS) if artifact.modality == "image" else (TextEncoder, TEXT_OPTIONS)
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise TypeError(
            f"{', '.join(unknown)} do not apply to {artifact.modality} backbones; options: {', '.join(allowed)}"
        )
    if cls is TextEncoder:
        refuse_idle_chunk_options(options)
    if options.get("runtime", "auto") in ("auto", None):
        _measure_first_use(artifact, actual_device(options.get("device") or "cpu"), tune)
    return cls(artifact, **{k: v for k, v in options.items() if k in allowed and v is not None})


def embed(
    items: Iterable[Any],
    backbone: str = "minilm-l6",
    store: str | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    dimensions: int | None = None,
    precision: str = "float32",
    calibration: Any = None,
    **options: Any,
) -> Embeddings:
    """Embed items with a backbone; bad items become error records, never a crash.

    ``options`` go to :func:`encoder_for` (``tune``) and :class:`TextEncoder` (device, threads, streams, batch_tokens,
    truncate, empty, runtime, long, chunk_overlap, max_chunks) or :class:`ImageEncoder` (device, threads,
    streams, runtime, batch_size, workers, max_pixels, reject_blank), by the backbone's modality; an option
    of the other modality raises TypeError. ``long="chunk"`` embeds a text longer than the backbone's
    window as the token-weighted mean of its windows' vectors (``chunk_overlap`` tokens shared by
    neighbours, default 32; at most ``max_chunks`` windows, default 64): :mod:`embedkit.inputs.windows`.

    Compact vectors (:mod:`embedkit.encoders.compact`): ``dimensions`` keeps the first ``dimensions``
    of each vector, renormalised (None: all D; a backbone not trained for it loses quality);
    ``precision`` ``"int8"`` / ``"uint8"`` (with ``calibration``: a :class:`~embedkit.encoders.compact.Calibration`
    or its record, e.g. from ``embedkit store calibration``), ``"binary"`` (sign bits packed, uint8
    ``(N, ceil(d / 8))``) or ``"float32"`` (default). ``vectors`` are then the compact rows (failed
    items' rows zero, NaN for float32) and ``compact`` says how; ``dimensions`` equal to D is every
    dimension (plain vectors). UsageError (before any work) for an unknown precision, int8 / uint8
    without a calibration, dimensions above D or unlike the calibration's, a calibration record
    without its sha256, or ``chunk_overlap`` / ``max_chunks`` without ``long="chunk"``;
    :class:`~embedkit.encoders.calibrations.CalibrationMismatchError` (a UsageError) for a
    calibration fitted on another artifact or under another long-text policy
    (:mod:`embedkit.encoders.calibrations`).
    """
    compact, fitted = compact_for(dimensions, precision, calibration)
    artifact = resolve(backbone, store)
    if artifact.modality == "image":
        refuse_single_image(items, "embed's items")  # one (H, W, 3) photo is never embedded as H strips
    compact = checked_compact(compact, fitted, artifact, options)
    result = encoder_for(artifact, **options).encode(items, progress=progress)
    return result if compact is None else compact_result(result, compact)


def compact_for(dimensions: int | None, precision: str, calibration: Any) -> tuple[Compact, FittedOn | None]:
    """The Compact of ``embed`` / ``Embedder`` parameters (``calibration``: a Calibration, its record or
    a calibration file's record) and what its calibration was fitted on; UsageError before any work."""
    cal, fitted = calibrations.read(calibration) if calibration is not None else (None, None)
    return Compact(dimensions, precision, cal), fitted


def checked_compact(compact: Compact, fitted: FittedOn | None, artifact: Artifact, options: dict[str, Any],
                    what: str = "the calibration") -> Compact | None:
    """``compact`` for ``artifact`` (None when it changes nothing: float32 with every dimension,
    ``dimensions`` equal to D included), its calibration checked against what it was ``fitted`` on:
    CalibrationMismatchError for another artifact or long-text policy (``options``: the encoder's)."""
    compact = compact.for_dim(artifact.dim)
    if fitted is not None:
        policy = None if artifact.modality == "image" else calibrations.policy_of(
            options.get("long"), options.get("chunk_overlap"), options.get("max_chunks"), options.get("truncate"))
        calibrations.check(fitted, artifact.digest, artifact.name, policy, what)
    return None if compact.is_float else compact
