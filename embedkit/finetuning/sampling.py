"""Contrastive training data: SetFit's sentence pairs and in-batch-negatives anchor batches.

Pair sampling as SetFit's ``num_iterations`` draws it (``huggingface/setfit``,
``src/setfit/sampler.py`` ``ContrastiveDataset``): SetFit lists every unordered pair ``(i, j)``,
``i <= j`` (an item with itself included), in a random order, and takes ``iterations * n``
positive and ``iterations * n`` negative pairs from the front of that order, starting over from
the front of a list it has used up. :func:`sample_pairs` draws from the same distribution without
listing every pair (which is ``n^2 / 2`` of them): the first ``k`` pairs of a random order are
``k`` pairs drawn without replacement, and a used-up list repeats its order.

:func:`sample_anchor_batches` gives the batches of in-batch negatives: one (anchor, positive)
pair from each of up to ``batch_size`` *different* classes per batch, so that every other
positive in the batch is a true negative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import DatasetError, UsageError


@dataclass(frozen=True)
class Pairs:
    """Sentence pairs as indices into the labelled texts.

    Attributes:
        left, right: int64 arrays of shape (P,), item indices; ``left <= right``.
        target: float32 array of shape (P,): 1.0 for a positive pair (same label), 0.0 negative.
    Positive and negative pairs alternate (positive first), as SetFit yields them.
    """

    left: np.ndarray
    right: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return int(self.left.shape[0])

    @property
    def positives(self) -> int:
        return int((self.target == 1.0).sum())

    @property
    def negatives(self) -> int:
        return int((self.target == 0.0).sum())


def _label_codes(labels: Sequence[Any]) -> np.ndarray:
    """Integer codes of ``labels`` (any hashable values); typed errors for what cannot be classes."""
    values = list(labels)
    if len(values) < 2:
        raise DatasetError(f"contrastive pairs need at least 2 labelled items, got {len(values)}")
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v)]
    if missing:
        raise DatasetError(f"{len(missing)} labels are missing (None or NaN), first at index {missing[0]}; "
                           "label every item or leave the unlabelled ones out")
    seen: dict[Any, int] = {}
    try:
        codes = [seen.setdefault(v.item() if isinstance(v, np.generic) else v, len(seen)) for v in values]
    except TypeError as exc:
        raise DatasetError(f"labels must be hashable values (str, int...): {exc}") from None
    return np.asarray(codes, dtype=np.int64)


def _ranked_pairs(ranks: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of the given ranks when item ``p`` pairs with ``j`` in ``[lo[p], hi[p])``, listed
    by ``p`` then ``j`` (positions in the label-sorted order)."""
    counts = hi - lo
    offsets = np.concatenate([[0], np.cumsum(counts)])
    first = np.searchsorted(offsets, ranks, side="right") - 1
    second = lo[first] + (ranks - offsets[first])
    return first, second


def _draw(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """``k`` ranks out of ``total``: SetFit's walk through one random order of all pairs, restarting
    at its front when used up (so a full order repeats; fewer than all are drawn without replacement)."""
    if k >= total:
        return np.resize(rng.permutation(total), k)
    return rng.choice(total, size=k, replace=False)


def sample_pairs(labels: Sequence[Any], iterations: int = 20, seed: int = 0) -> Pairs:
    """SetFit's positive and negative sentence pairs for ``labels`` (one per item).

    ``iterations * n`` positive and as many negative pairs (``n = len(labels)``), drawn as SetFit
    draws them with ``num_iterations`` (see the module docstring): an unordered pair ``i <= j``
    is positive when both items share a label (an item paired with itself is positive), negative
    otherwise.

    Args:
        labels: one label per item, any hashable values (strings, ints...).
        iterations: pairs per item and per kind (SetFit's ``num_iterations``), >= 1.
        seed: seeds a :class:`numpy.random.Generator`; the same seed gives the same pairs.

    Returns:
        :class:`Pairs`, ``2 * iterations * n`` of them, positive and negative alternating.

    Raises:
        DatasetError: fewer than 2 items, a missing label, or a single class (no negative pair).
        UsageError: ``iterations`` is not a positive int (a ValueError).
    """
    if not isinstance(iterations, (int, np.integer)) or isinstance(iterations, bool) or iterations < 1:
        raise UsageError(f"iterations must be a positive int (pairs per item and kind), got {iterations!r}")
    codes = _label_codes(labels)
    n = len(codes)
    if len(np.unique(codes)) < 2:
        raise DatasetError(f"all {n} items have the same label; contrastive pairs need at least 2 classes")
    order = np.argsort(codes, kind="stable")  # label-sorted positions: each class is one run
    sorted_codes = codes[order]
    ends = np.searchsorted(sorted_codes, sorted_codes, side="right")  # end of each position's class run
    positions = np.arange(n)
    rng = np.random.default_rng(seed)
    k = int(iterations) * n
    kinds = []
    for lo, hi in ((positions, ends), (ends, np.full(n, n))):  # positive: j in [p, end); negative: [end, n)
        total = int((hi - lo).sum())
        a, b = _ranked_pairs(_draw(rng, total, k), lo, hi)
        a, b = order[a], order[b]
        kinds.append((np.minimum(a, b), np.maximum(a, b)))
    (pl, pr), (nl, nr) = kinds
    left = np.empty(2 * k, dtype=np.int64)
    right = np.empty(2 * k, dtype=np.int64)
    left[0::2], left[1::2] = pl, nl
    right[0::2], right[1::2] = pr, nr
    target = np.zeros(2 * k, dtype=np.float32)
    target[0::2] = 1.0
    return Pairs(left, right, target)


@dataclass(frozen=True)
class AnchorBatch:
    """One in-batch-negatives batch: ``anchors[k]`` and ``positives[k]`` (int64 item indices, shape
    (B,)) share a label, and no two ``k`` share one (so every other positive is a true negative)."""

    anchors: np.ndarray
    positives: np.ndarray

    def __len__(self) -> int:
        return int(self.anchors.shape[0])


def sample_anchor_batches(labels: Sequence[Any], iterations: int = 1, batch_size: int = 64,
                          seed: int = 0) -> list[AnchorBatch]:
    """Batches for ``loss="in-batch"``: every item is an anchor ``iterations`` times.

    Each round shuffles the items of every class; the classes that still have anchors are then
    taken in a random order, ``batch_size`` at a time, one anchor each, until every anchor of
    the round is used: a pass over the classes is split into batches of near-equal size, and when
    a single class still has anchors (classes of unequal size), each of its anchors is batched
    with random items of up to ``batch_size - 1`` other classes, so every batch has negatives. An
    anchor's positive is another item of its class drawn at random (itself when its class has
    one item).

    Args:
        labels: one label per item, any hashable values.
        iterations: rounds (anchors per item), >= 1.
        batch_size: classes per batch (pairs per batch) at most, >= 2.
        seed: seeds a :class:`numpy.random.Generator`; the same seed gives the same batches.

    Returns:
        list of :class:`AnchorBatch`.

    Raises:
        DatasetError: fewer than 2 items, a missing label, or a single class.
        UsageError: ``iterations`` < 1 or ``batch_size`` < 2 (a ValueError).
    """
    for name, value, least in (("iterations", iterations, 1), ("batch_size", batch_size, 2)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise UsageError(f"{name} must be an int >= {least} for in-batch negatives, got {value!r}")
    codes = _label_codes(labels)
    classes = np.unique(codes)
    if len(classes) < 2:
        raise DatasetError(f"all {len(codes)} items have the same label; in-batch negatives need at least 2 classes")
    members = {int(c): np.flatnonzero(codes == c) for c in classes}
    rng = np.random.default_rng(seed)
    batches: list[AnchorBatch] = []
    for _ in range(int(iterations)):
        queues = {c: list(rng.permutation(m)) for c, m in members.items()}
        while queues:
            order = rng.permutation(sorted(queues))
            for chunk in np.array_split(order, -(-len(order) // int(batch_size))):  # near-equal sizes
                anchors = [int(queues[int(c)].pop()) for c in chunk]
                classes = [int(c) for c in chunk]
                if len(classes) == 1:  # one class left with anchors: other classes lend theirs
                    lenders = rng.permutation([c for c in members if c != classes[0]])[: int(batch_size) - 1]
                    classes += [int(c) for c in lenders]
                    anchors += [int(rng.choice(members[int(c)])) for c in lenders]
                positives = []
                for c, a in zip(classes, anchors):
                    others = members[c][members[c] != a]
                    positives.append(int(rng.choice(others)) if len(others) else a)
                batches.append(AnchorBatch(np.asarray(anchors, dtype=np.int64), np.asarray(positives, dtype=np.int64)))
            queues = {c: q for c, q in queues.items() if q}
    return batches
