"""Training items for fine-tuning: raw items through the inference preprocessing, as torch batches.

Texts are tokenised once (:class:`embedkit.inputs.text.TextTokenizer`, the artifact's tokenizer and max
length); images go through :class:`embedkit.inputs.image.ImageProcessor` (checked once up front, so a bad
image is a record before training, not a crash mid-epoch) and, while training,
:class:`embedkit.finetuning.augment.Augmenter` (the same processor plus a random resized crop and flip).
The contrastive objectives take their texts as one padded tensor (:func:`text_tensors`) cut to
each batch's longest row (:func:`token_rows`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InvalidInputError, TrainingItemLostError
from ..inputs.image import ImageProcessor
from ..inputs.items import ItemFailure
from ..inputs.sources import iter_items
from ..inputs.text import TextTokenizer, pad
from .augment import Augmenter

CACHED_IMAGES = 4096  # up to this many images, inference pixels are kept in memory (validation, no augmentation)
Tokenize = Callable[[list[str]], dict[str, Any]]  # texts -> {"input_ids", "attention_mask"}, (N, L) int64


class TextData:
    """Tokenised items; ``batch(indices, rng)`` -> ``(input_ids, attention_mask)`` int64 tensors."""

    def __init__(self, ids: list[list[int]], device: str):
        self.ids, self.device = ids, device

    def batch(self, index: np.ndarray, rng: Any) -> tuple[Any, ...]:
        import torch

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
            try:
                if rng is not None and self.augment is not None:
                    rows.append(self.augment(self.payloads[i], rng))
                else:
                    if i not in self.cache:
                        self.cache[i] = self.processor(self.payloads[i])[0]
                    rows.append(self.cache[i])
            except (ItemFailure, OSError) as exc:  # it was read when the run started: it changed since
                raise _lost(int(i), self.payloads[i], exc) from exc
        return (torch.as_tensor(np.stack(rows), device=self.device),)


def prepare(modality: str, payloads: list[Any], preprocess: Any, augment: bool, device: str, split: str,
             offset: int = 0) -> tuple[Any, list[int], list[dict[str, Any]]]:
    """``(data, kept positions, failure records)`` for the payloads of one split."""
    failures: list[dict[str, Any]] = []
    if modality == "text":

        # a labelled empty text teaches nothing but "" -> that label: a record, not a training item
        # (inference keeps embedding such texts, as sentence-transformers does)
        out = TextTokenizer(preprocess, empty="error").encode(payloads)
        failures = [{**e.to_json(), "split": split} for e in out.errors]
        ids = {i: t for i, t in zip(out.indices, out.ids)}
        kept = sorted(ids)
        return TextData([ids.get(i, []) for i in range(len(payloads))], device), kept, failures

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

        data.augment = Augmenter(preprocess)
    return data, kept, failures


def _lost(index: int, payload: Any, exc: BaseException) -> TrainingItemLostError:
    """The typed error for an item that could be read when the run started and cannot be now."""
    what = f"{os.fspath(payload)}" if isinstance(payload, (str, os.PathLike)) else f"item {index}"
    return TrainingItemLostError(
        f"training image {what} (item {index}) could not be read again during the run ({exc}); it was read when "
        "the run started, so it was removed or changed since: restore it and run again with resume (from the "
        "last checkpoint), or start over without it")


def data_fingerprint(ids: Sequence[str], labels: Sequence[Any]) -> str:
    """sha256 over the items' content ids (:func:`embedkit.inputs.fingerprints.fingerprint`) and labels, in order."""
    h = hashlib.sha256()
    for item_id, label in zip(ids, labels):
        h.update(f"{item_id}\t{json.dumps(label, default=str)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def items_of(items: Any, modality: str) -> tuple[list[Any], list[str], list[str]]:
    """``(payloads, content ids, locators)`` of a sequence or source (see :func:`embedkit.inputs.sources.iter_items`)."""

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


def text_tokenizer(preprocess: Any) -> Tokenize:
    """A ``tokenize`` callable for :func:`embedkit.finetuning.contrastive.finetune_contrastive` from a backbone's
    :class:`~embedkit.TextPreprocess`: the inference tokenizer (:class:`embedkit.inputs.text.TextTokenizer`,
    same truncation at ``max_length``), right-padded int64 ``input_ids`` / ``attention_mask``.

    Raises (when called):
        InvalidInputError: an item is not valid text (``.errors`` lists every one).
    """

    tokenizer = TextTokenizer(preprocess)

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        out = tokenizer.encode(list(texts))
        if out.errors:
            raise InvalidInputError(out.errors, ok=out.stats.ok)
        return pad(out.ids)

    return tokenize


def text_tensors(tokenize: Tokenize, texts: Sequence[str]) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``texts`` as int64 tensors of shape (N, L).

    Raises:
        ValueError: ``tokenize`` gave other shapes.
    """
    import torch

    batch = tokenize(list(texts))
    ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
    if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] != len(texts):
        raise ValueError(f"tokenize must give input_ids and attention_mask of shape (N, L) with N={len(texts)}, "
                         f"got {tuple(ids.shape)} and {tuple(mask.shape)}")
    return ids, mask


def token_rows(ids: Any, mask: Any, index: Any, device: str) -> tuple[Any, Any]:
    """Rows ``index`` of the padded tokens, cut to the longest of them (right padding)."""
    sub_mask = mask[index]
    length = max(int(sub_mask.sum(1).max()), 1)
    return ids[index, :length].to(device), sub_mask[:, :length].to(device)


def encode(module: Any, tokenize: Tokenize, texts: Sequence[str], batch_size: int = 64,
           device: str = "cpu") -> np.ndarray:
    """Embed ``texts`` with a torch text module in inference mode: float32 array of shape (N, D).

    The module's train/eval mode is restored afterwards.
    """
    import torch

    ids, mask = text_tensors(tokenize, texts)
    was_training = module.training
    module.eval()
    order = np.argsort(-mask.sum(1).numpy(), kind="stable")  # longest first: little padding per batch
    out: list[Any] = [None] * len(texts)
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = torch.as_tensor(order[start:start + batch_size])
                vectors = module(*token_rows(ids, mask, index, device)).float().cpu().numpy()
                for i, v in zip(index.tolist(), vectors):
                    out[i] = v
    finally:
        module.train(was_training)
    if not out:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack(out).astype(np.float32)
