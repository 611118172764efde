"""Probe batches for the export parity gate and ``check_backbone``, one kind per modality.

Probes are preprocessed with the runtime's own code (tokenizer or PIL + numpy), so the gate
compares ONNX Runtime and torch on exactly what the runtime will feed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.backbone import Backbone
from ..errors import ExportError, NonFiniteOutputError
from ..inputs.image import ImageProcessor, probe_images, stack
from ..inputs.text import TextTokenizer, pad, probe_texts
from .store import sha256_file

# max_abs_diff is compared after dividing by max(1, largest |torch output|): for normalised or
# unit-scale embeddings that is the absolute difference; a randomly initialised deep CNN
# whose activations reach 1e9 is judged by float32's relative precision instead.
LIMITS = {"max_abs_diff": 1e-4, "min_cosine": 0.99999}
# fp16 keeps ~3 significant digits: a half-precision variant or runtime is judged by these.
FP16_LIMITS = {"max_abs_diff": 1e-2, "min_cosine": 0.999}
# A reduced-precision *runtime* of an fp32 artifact (bf16 on a CPU's matrix engine, an int8 variant
# offered in its place) must keep features fp32's within min cosine 0.9999, on the probes and on the
# tuning sample. How the limit was chosen: bf16 keeps 8 mantissa bits (relative rounding 2**-9)
# but accumulates in fp32, and measured 0.99996-0.99997 min cosine on MiniLM (OpenVINO and torch
# autocast, Banking77); int8 dynamic measured 0.993 and cost accuracy points. 1e-4 of cosine is
# ten times tighter than the fp16 variants' gate, an angle of 0.8 degrees: it admits bf16 arithmetic
# on a well-scaled network with a margin and refuses int8 and any bf16 run whose activations
# outgrow bf16 (an overflow or a cancellation moves cosines by far more than 1e-4).
BF16_LIMITS = {"max_abs_diff": 1e-2, "min_cosine": 0.9999}


class Probes:
    """What the exporter needs to know about one modality's inputs."""

    input_names: list[str]
    dynamic_axes: dict[int, str]  # per input: the axes that must stay dynamic
    rank: int
    items: list[Any]  # the raw probe inputs (texts or images)

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    def example(self, torch: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def feeds(self, rows: list[Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def rows(self) -> list[Any]:
        """The preprocessed probes, one per item."""
        raise NotImplementedError

    def preprocess_identity(self) -> dict[str, Any]:
        """The preprocessing as written into the graph's metadata (file contents by digest)."""
        return self.backbone.preprocess.to_json()

    def manifest_preprocess(self) -> dict[str, Any]:
        return self.backbone.preprocess.to_json()

    def files(self) -> dict[str, str]:
        """Files copied into the artifact folder: ``{name in folder: source path}``."""
        return {}

    def batches(self) -> list[list[Any]]:
        """Batch size 1 for every probe, then two batches of 7 with different neighbours."""
        rows = self.rows()
        return [[x] for x in rows] + [rows[:7], rows[-7:][::-1]]

    def parity(self, torch: Any, module: Any, path: Path) -> dict[str, Any]:
        """ONNX Runtime (CPU) vs torch on identical batches."""

        def reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return module(*(torch.from_numpy(v) for v in feeds.values())).float().numpy()

        return self.compare(onnx_runner(path, self.rank), reference, "torch")

    def compare(self, candidate: Any, reference: Any, against: str = "reference",
                limits: dict[str, float] = LIMITS) -> dict[str, Any]:
        """``candidate(feeds)`` vs ``reference(feeds)`` (each returning (N, dim) arrays) on the probe batches."""
        max_diff, min_cos, scale = 0.0, 1.0, 1.0
        for batch in self.batches():
            feeds = self.feeds(batch)
            got = candidate(feeds)
            ref = reference(feeds)
            if got.shape != ref.shape or got.shape != (len(batch), self.backbone.dim):
                hint = " (are the axes really dynamic?)" if got.shape[:1] != ref.shape[:1] else ""
                raise ExportError(
                    f"output shape: {got.shape}, {against} {ref.shape}, declared ({len(batch)}, {self.backbone.dim}){hint}"
                )
            if not (np.isfinite(got).all() and np.isfinite(ref).all()):
                raise NonFiniteOutputError("the model produced NaN or inf on the probes")
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
            min_cos = min(min_cos, float(cosine(got, ref).min()))
        return {
            "max_abs_diff": max_diff,
            "output_scale": scale,
            "scaled_diff": max_diff / scale,
            "min_cosine": min_cos,
            "probes": len(self.items),
            "batch_sizes": [1, 7],
            "limits": limits,
        }


def onnx_runner(path: Path, rank: int = 2) -> Any:
    """``feeds -> first output`` on one single-threaded CPU session (inputs the graph lacks dropped)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the export: {exc}") from exc
    wanted = {i.name for i in session.get_inputs()}  # a trace may drop an input it ignored

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
        except Exception as exc:
            shape = next(iter(feeds.values())).shape
            raise ExportError(
                f"ONNX Runtime failed on a batch of shape {shape} "
                f"(are the batch{' and sequence' if rank == 2 else ''} axes really dynamic?): {exc}"
            ) from exc

    return run


class TextProbes(Probes):
    """Padded probe batches, tokenised with the runtime's own tokenizer."""

    input_names = ["input_ids", "attention_mask"]
    dynamic_axes = {0: "batch", 1: "sequence"}
    rank = 2

    def __init__(self, backbone: Backbone):

        super().__init__(backbone)
        self.tokenizer = TextTokenizer(backbone.preprocess)
        self.items = probe_texts(backbone.preprocess.max_length)
        self.ids = self.tokenizer.encode(self.items).ids
        self.tokenizer_sha256 = sha256_file(backbone.preprocess.tokenizer)

    def preprocess_identity(self) -> dict[str, Any]:
        data = self.backbone.preprocess.to_json()
        data["tokenizer"] = self.tokenizer_sha256
        return data

    def manifest_preprocess(self) -> dict[str, Any]:
        data = self.backbone.preprocess.to_json()
        data["tokenizer"] = "tokenizer.json"
        data["tokenizer_sha256"] = self.tokenizer_sha256
        return data

    def files(self) -> dict[str, str]:
        return {"tokenizer.json": self.backbone.preprocess.tokenizer}

    def rows(self) -> list[Any]:
        return list(self.ids)

    def feeds(self, rows: list[Any]) -> dict[str, np.ndarray]:

        return pad(rows)

    def example(self, torch: Any) -> tuple[Any, ...]:
        """Two equal-length rows with an all-ones mask (the trace that exported BERT exactly)."""

        long = sorted(self.ids, key=len)[-2:]
        n = min(16, min(len(x) for x in long))
        feeds = pad([x[:n] for x in long])
        return torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])


class ImageProbes(Probes):
    """Synthetic images of varied sizes, decoded and preprocessed by :class:`ImageProcessor`."""

    input_names = ["pixel_values"]
    dynamic_axes = {0: "batch"}
    rank = 4

    def __init__(self, backbone: Backbone):

        super().__init__(backbone)
        self.processor = ImageProcessor(backbone.preprocess)
        self.items = probe_images()
        self._rows = [self.processor(x)[0] for x in self.items]

    def rows(self) -> list[Any]:
        return list(self._rows)

    def feeds(self, rows: list[Any]) -> dict[str, np.ndarray]:

        return stack(rows)

    def example(self, torch: Any) -> tuple[Any, ...]:
        return (torch.from_numpy(self.feeds(self._rows[:2])["pixel_values"]),)


def passes(parity: dict[str, Any], limits: dict[str, float] = LIMITS) -> bool:
    """The gate: the scaled difference and the cosine within ``limits`` (default :data:`LIMITS`)."""
    return parity["scaled_diff"] <= limits["max_abs_diff"] and parity["min_cosine"] >= limits["min_cosine"]


def probes_for(backbone: Backbone) -> Probes:
    return ImageProbes(backbone) if backbone.modality == "image" else TextProbes(backbone)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (1 where both rows are zero)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-300), 1.0)
