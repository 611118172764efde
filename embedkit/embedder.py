"""``Embedder``: a scikit-learn transformer over the embedkit encoder."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .encoder import encoder_for
from .errors import ArtifactError, InvalidInputError
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
        truncate: text only: truncate texts longer than the backbone's max length (else an error).
        empty: text only: ``embed`` or ``error`` for empty / whitespace-only texts.
        batch_size: images only: images per batch (default 16 on CPU).
        workers: images only: decoding threads (default: the cores this process may use).
        max_pixels: images only: larger images are refused (decompression-bomb guard).
        reject_blank: images only: refuse blank / placeholder graphics.
        store: model store folder (default ``$EMBEDKIT_HOME``, else the user cache folder).
        runtime: ``auto`` (the one :func:`embedkit.tune` measured faster here; ONNX Runtime
            when nothing was measured on a CPU), ``onnxruntime``, ``torch``, ``torch-compile``,
            ``openvino``, ``openvino-bf16``, ``torch-bf16`` or ``int8-<variant>`` (see :mod:`embedkit.encoders.tuning`).

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
        truncate: bool = True,
        empty: str = "embed",
        batch_size: int | None = None,
        workers: int | None = None,
        max_pixels: int | None = None,
        reject_blank: bool = True,
        store: str | None = None,
        runtime: str = "auto",
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

    def fit(self, X: Any = None, y: Any = None) -> "Embedder":
        """Resolve the backbone's artifact (export it if needed); X and y are ignored."""

        artifact = resolve(self.backbone, self.store)
        self.artifact_path_ = str(artifact.path)
        self.digest_ = artifact.digest
        self.backbone_name_ = artifact.name
        self.n_features_out_ = artifact.dim
        self.modality_ = artifact.modality
        self._encoder = None
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
                options.update(batch_tokens=self.batch_tokens, truncate=self.truncate, empty=self.empty)
            encoder = encoder_for(artifact, **options)
            self._encoder = encoder
        return encoder

    def transform(self, X: Any) -> np.ndarray:
        """Embed ``X``: a sequence of texts or images, a 1-D array or Series, or a one-column frame
        (an (N, H, W[, C]) array is N images)."""
        check_is_fitted(self, "digest_")
        items = as_items(X, getattr(self, "modality_", "text"))
        if len(items) == 0:
            return np.empty((0, self.n_features_out_), dtype=np.float32)
        result = self._get_encoder().encode(items)
        if result.errors:
            raise InvalidInputError(result.errors, ok=result.ok)
        return result.vectors

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "digest_")
        prefix = self.backbone_name_.replace("-", "_").replace(".", "_")
        return np.asarray([f"{prefix}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_encoder", None)  # ONNX Runtime sessions do not pickle; rebuilt on demand
        return state

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
