"""``Embedder``: a scikit-learn transformer over the embedkit encoder."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .encoder import checked_compact, compact_for, encoder_for, refuse_idle_chunk_options
from .encoders.calibrations import policy_of, policy_tag
from .encoders.compact import CALIBRATED, Compact, compact_result
from .errors import ArtifactError, InvalidInputError, UsageError
from .inputs.image import refuse_single_image
from .models.resolve import resolve
from .models.store import Artifact


class Embedder(TransformerMixin, BaseEstimator):
    """Embed raw inputs (texts or images) with a frozen backbone, as a scikit-learn transformer.

    Parameters are stored verbatim; the backbone is resolved (and exported on first use)
    in :meth:`fit`. The ONNX session is not pickled: it is rebuilt lazily, so the estimator
    can be cloned, pickled and sent to joblib workers.

    Args:
        backbone: registered name (``minilm-l6``, ``mobilenet-v2``), a spec such as
            ``timm:resnet50@ckpt.pth``, a local model folder, artifact folder or digest.
        device: ``cpu`` | ``cuda`` | ``auto``.
        threads: CPU threads (default: all cores this process may use).
        batch_tokens: text only: padded tokens per batch (default 384 on CPU).
        truncate: text only, the older spelling of ``long``: None (default) follows ``long``,
            False is ``long="error"``, True agrees with ``"truncate"`` and ``"chunk"``.
        long: text only: texts longer than the backbone's max length are ``"truncate"``d
            (default), ``"chunk"``ed (windows embedded and pooled, :mod:`embedkit.inputs.windows`)
            or an ``"error"``.
        chunk_overlap: text only, ``long="chunk"``: tokens shared by neighbouring windows (default 32).
        max_chunks: text only, ``long="chunk"``: windows per text at most (default 64; past it, truncated).
        empty: text only: ``embed`` or ``error`` for empty / whitespace-only texts.
        batch_size: images only: images per batch (default 16 on CPU).
        workers: images only: decoding threads (default: the cores this process may use).
        max_pixels: images only: larger images are refused (decompression-bomb guard).
        reject_blank: images only: refuse blank / placeholder graphics.
        store: model store folder (default ``$EMBEDKIT_HOME``, else the user cache folder).
        runtime: ``auto`` (the one :func:`embedkit.tune` measured faster here; ONNX Runtime
            when nothing was measured on a CPU), ``onnxruntime``, ``torch``, ``torch-compile``,
            ``openvino``, ``openvino-bf16``, ``torch-bf16`` or ``int8-<variant>`` (see :mod:`embedkit.encoders.tuning`).
        dimensions: keep the first ``dimensions`` of each vector, renormalised (None: all D; a
            backbone not trained for it loses quality; :mod:`embedkit.encoders.compact`).
        precision: ``float32`` (default), ``int8`` / ``uint8`` (calibrated ranges), ``binary``
            (sign bits packed: uint8 ``(N, ceil(d / 8))``).
        calibration: int8 / uint8: a :class:`~embedkit.encoders.compact.Calibration` (or its
            record, sha256 included); None fits one in :meth:`fit` on the float embeddings of ``X``.
            One fitted on another artifact or under another long-text policy is refused in
            :meth:`fit` (:mod:`embedkit.encoders.calibrations`).

    Images may be paths, bytes, PIL images or numpy arrays (H, W[, C]); see
    :mod:`embedkit.inputs.image` for the decoding policy.

    Raises (from ``transform``):
        InvalidInputError: some items could not be embedded; ``.errors`` lists every one.
    """

    def __init__(
        self,
        backbone: str = "minilm-l6",
        device: str = "cpu",
        threads: int | None = None,
        batch_tokens: int | None = None,
        truncate: bool | None = None,
        empty: str = "embed",
        batch_size: int | None = None,
        workers: int | None = None,
        max_pixels: int | None = None,
        reject_blank: bool = True,
        store: str | None = None,
        runtime: str = "auto",
        long: str = "truncate",
        chunk_overlap: int = 32,
        max_chunks: int = 64,
        dimensions: int | None = None,
        precision: str = "float32",
        calibration: Any = None,
    ):
        self.backbone = backbone
        self.device = device
        self.threads = threads
        self.batch_tokens = batch_tokens
        self.truncate = truncate
        self.empty = empty
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.reject_blank = reject_blank
        self.store = store
        self.runtime = runtime
        self.long = long
        self.chunk_overlap = chunk_overlap
        self.max_chunks = max_chunks
        self.dimensions = dimensions
        self.precision = precision
        self.calibration = calibration

    def fit(self, X: Any = None, y: Any = None) -> "Embedder":
        """Resolve the backbone's artifact (export it if needed). X is used only to fit the
        int8 / uint8 calibration (``compact_``) when none was given; y is ignored.

        Raises UsageError for an unknown precision, dimensions above the backbone's, or int8 /
        uint8 with neither a calibration nor X (at least 2 items embedded)."""
        compact, fitted = compact_for(self.dimensions, self.precision, self.calibration) \
            if self.precision not in CALIBRATED or self.calibration is not None else (None, None)
        artifact = resolve(self.backbone, self.store)
        Compact(self.dimensions).output_dim(artifact.dim)
        if artifact.modality == "text":
            refuse_idle_chunk_options(self._text_policy())
        self.artifact_path_ = str(artifact.path)
        self.digest_ = artifact.digest
        self.backbone_name_ = artifact.name
        self.modality_ = artifact.modality
        self._encoder = None
        if compact is not None:  # dimensions == D is every dimension; a given calibration fits this backbone
            compact = checked_compact(compact, fitted, artifact, self._text_policy())
        if self.precision in CALIBRATED and self.calibration is None:
            if X is None:
                raise UsageError(f"precision={self.precision!r} needs a calibration: pass calibration=, or fit(X) "
                                 "on items to fit one on")
            result = self._get_encoder().encode(as_items(X, artifact.modality))
            tag = policy_tag(policy_of(**self._text_policy())) if artifact.modality == "text" else ""
            dims = None if self.dimensions == artifact.dim else self.dimensions
            compact = Compact.fitted(result.vectors[np.asarray(result.ok, bool)], dims, self.precision,
                                     source=f"Embedder.fit:{artifact.name}/{artifact.digest[:12]}"
                                     + (f".{tag}" if tag else ""))
        self.compact_ = compact
        self.n_features_out_ = artifact.dim if compact is None else compact.width(artifact.dim)
        return self

    def _get_encoder(self) -> Any:
        encoder = getattr(self, "_encoder", None)
        if encoder is None:

            artifact = Artifact.open(self.artifact_path_)
            if artifact.digest != self.digest_:

                raise ArtifactError(f"artifact at {self.artifact_path_} changed: {artifact.digest} != {self.digest_}")
            options: dict[str, Any] = {"device": self.device, "threads": self.threads, "runtime": self.runtime}
            if artifact.modality == "image":
                options.update(batch_size=self.batch_size, workers=self.workers,
                               max_pixels=self.max_pixels, reject_blank=self.reject_blank)
            else:
                options.update(batch_tokens=self.batch_tokens, empty=self.empty, **self._text_policy())
            encoder = encoder_for(artifact, **options)
            self._encoder = encoder
        return encoder

    def _text_policy(self) -> dict[str, Any]:
        """The long-text options for the encoder: ``chunk_overlap`` / ``max_chunks`` only where they
        apply (``long="chunk"``) or were changed from their defaults (then refused elsewhere)."""
        policy: dict[str, Any] = {"truncate": self.truncate, "long": self.long}
        for key, default in (("chunk_overlap", 32), ("max_chunks", 64)):
            value = getattr(self, key)
            if self.long == "chunk" or value != default:
                policy[key] = value
        return policy

    def transform(self, X: Any) -> np.ndarray:
        """Embed ``X``: a sequence of texts or images, a 1-D array or Series, or a one-column frame
        (an (N, H, W[, C]) array is N images)."""
        check_is_fitted(self, "digest_")
        items = as_items(X, getattr(self, "modality_", "text"))
        compact = getattr(self, "compact_", None)
        if len(items) == 0:
            return np.empty((0, self.n_features_out_), dtype=np.float32 if compact is None else compact.dtype)
        result = self._get_encoder().encode(items)
        if result.errors:
            raise InvalidInputError(result.errors, ok=result.ok)
        return result.vectors if compact is None else compact_result(result, compact).vectors

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "digest_")
        prefix = self.backbone_name_.replace("-", "_").replace(".", "_")
        return np.asarray([f"{prefix}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_encoder", None)  # ONNX Runtime sessions do not pickle; rebuilt on demand
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An Embedder pickled before the long-text options existed gets their defaults (get_params reads them).
        super().__setstate__({"long": "truncate", "chunk_overlap": 32, "max_chunks": 64, "dimensions": None,
                              "precision": "float32", "calibration": None, **state})

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


def as_items(X: Any, modality: str) -> list[Any]:
    if isinstance(X, (str, bytes)) or hasattr(X, "getpixel"):
        what = "string" if isinstance(X, str) else "bytes object" if isinstance(X, bytes) else "image"
        raise TypeError(f"Embedder.transform takes a sequence of {modality}s, not a single {what}; wrap it in a list")
    shape = getattr(X, "shape", None)
    if modality == "image":
        refuse_single_image(X, "Embedder.transform's sequence of images")  # (H, W, 3): one photo, never H strips
        if isinstance(X, np.ndarray) and X.ndim >= 3:
            return list(X)  # a stack of images
    if shape is not None and len(shape) == 2:
        if shape[1] != 1:
            raise ValueError(f"expected a 1-D sequence or a single column, got shape {shape}")
        X = X.iloc[:, 0] if hasattr(X, "iloc") else np.asarray(X)[:, 0]
    if hasattr(X, "tolist") and not (isinstance(X, np.ndarray) and X.dtype == object):
        return list(X.tolist())
    return list(X)
