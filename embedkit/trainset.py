"""Training items for fine-tuning: raw items through the inference preprocessing, as torch batches.

Texts are tokenised once (:class:`embedkit.text.TextTokenizer`, the artifact's tokenizer and max
length); images go through :class:`embedkit.image.ImageProcessor` (checked once up front, so a bad
image is a record before training, not a crash mid-epoch) and, while training,
:class:`embedkit.augment.Augmenter` (the same processor plus a random resized crop and flip).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

CACHED_IMAGES = 4096  # up to this many images, inference pixels are kept in memory (validation, no augmentation)


class TextData:
    """Tokenised items; ``batch(indices, rng)`` -> ``(input_ids, attention_mask)`` int64 tensors."""

    def __init__(self, ids: list[list[int]], device: str):
        self.ids, self.device = ids, device

    def batch(self, index: np.ndarray, rng: Any) -> tuple[Any, ...]:
        import torch

        from .text import pad

        feed = pad([self.ids[i] for i in index])
        return (torch.as_tensor(feed["input_ids"], device=self.device),
                torch.as_tensor(feed["attention_mask"], device=self.device))


class ImageData:
    """Images; ``batch(indices, rng)`` -> ``(pixel_values,)``: the inference preprocessing, or with
    ``rng`` the declared training augmentation (random resized crop, horizontal flip)."""

    def __init__(self, payloads: list[Any], processor: Any, augment: Any, device: str):
        self.payloads, self.processor, self.augment, self.device = payloads, processor, augment, device
        self.cache: dict[int, np.ndarray] = {}

    def batch(self, index: np.ndarray, rng: Any) -> tuple[Any, ...]:
        import torch

        rows = []
        for i in index:
            if rng is not None and self.augment is not None:
                rows.append(self.augment(self.payloads[i], rng))
            else:
                if i not in self.cache:
                    self.cache[i] = self.processor(self.payloads[i])[0]
                rows.append(self.cache[i])
        return (torch.as_tensor(np.stack(rows), device=self.device),)


def prepare(modality: str, payloads: list[Any], preprocess: Any, augment: bool, device: str, split: str,
             offset: int = 0) -> tuple[Any, list[int], list[dict[str, Any]]]:
    """``(data, kept positions, failure records)`` for the payloads of one split."""
    failures: list[dict[str, Any]] = []
    if modality == "text":
        from .text import TextTokenizer

        # a labelled empty text teaches nothing but "" -> that label: a record, not a training item
        # (inference keeps embedding such texts, as sentence-transformers does)
        out = TextTokenizer(preprocess, empty="error").encode(payloads)
        failures = [{**e.to_json(), "split": split} for e in out.errors]
        ids = {i: t for i, t in zip(out.indices, out.ids)}
        kept = sorted(ids)
        return TextData([ids.get(i, []) for i in range(len(payloads))], device), kept, failures
    from .image import ImageProcessor
    from .text import ItemFailure

    processor = ImageProcessor(preprocess)
    data = ImageData(payloads, processor, None, device)
    kept = []
    for i, payload in enumerate(payloads):
        try:  # the inference preprocessing: a bad image is found now, not mid-epoch
            pixels = processor(payload)[0]
        except ItemFailure as exc:
            failures.append({**exc.record(i).to_json(), "split": split})
            continue
        kept.append(i)
        if len(payloads) <= CACHED_IMAGES:
            data.cache[i] = pixels
    if augment:
        from .augment import Augmenter

        data.augment = Augmenter(preprocess)
    return data, kept, failures


def data_fingerprint(ids: Sequence[str], labels: Sequence[Any]) -> str:
    """sha256 over the items' content ids (:func:`embedkit.sources.fingerprint`) and labels, in order."""
    h = hashlib.sha256()
    for item_id, label in zip(ids, labels):
        h.update(f"{item_id}\t{json.dumps(label, default=str)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def items_of(items: Any, modality: str) -> tuple[list[Any], list[str], list[str]]:
    """``(payloads, content ids, locators)`` of a sequence or source (see :func:`embedkit.sources.iter_items`)."""
    from .sources import iter_items

    found = list(iter_items(items, modality))
    return [i.payload for i in found], [i.id for i in found], [i.source for i in found]


class Joined:
    """Training data and given validation data behind one index space (validation after training)."""

    def __init__(self, train: Any, val: Any, offset: int):
        self.train, self.val, self.offset = train, val, offset

    def batch(self, index: np.ndarray, rng: Any) -> tuple[Any, ...]:
        if len(index) and index[0] >= self.offset:
            return self.val.batch(index - self.offset, rng)
        return self.train.batch(index, rng)
