"""Few-shot contrastive fine-tuning of a text body: SetFit's recipe (Tunstall et al. 2022).

The recipe (``huggingface/setfit``, ``src/setfit/sampler.py`` ``ContrastiveDataset`` and its
trainer): from ``n`` labelled texts draw sentence pairs, a pair of the same label being
*positive* (target cosine 1) and of different labels *negative* (target cosine 0); tune the
body so that the cosine of each pair's two embeddings approaches its target (mean squared
error, sentence-transformers' ``CosineSimilarityLoss``); then fit a LogisticRegression head on
the tuned embeddings (done by :func:`embedkit.finetune`, which calls :func:`finetune_contrastive`).

Pair sampling as SetFit's ``num_iterations`` draws it: SetFit lists every unordered pair
``(i, j)``, ``i <= j`` (an item with itself included), in a random order, and takes
``iterations * n`` positive and ``iterations * n`` negative pairs from the front of that order,
starting over from the front of a list it has used up. :func:`sample_pairs` draws from the same
distribution without listing every pair (which is ``n^2 / 2`` of them): the first ``k`` pairs of
a random order are ``k`` pairs drawn without replacement, and a used-up list repeats its order.

``loss="in-batch"`` swaps the pair loss for in-batch negatives (sentence-transformers'
``MultipleNegativesRankingLoss``, Henderson et al. 2017, "Efficient Natural Language Response
Suggestion for Smart Reply", arXiv:1705.00652; scale 20 as sentence-transformers' default): each
batch holds one (anchor, positive) pair from each of up to ``batch_size`` *different* classes
(:func:`sample_anchor_batches`), and each anchor must pick its own positive out of all the
batch's positives by softmax cross-entropy over the scaled cosines, so every other class in the
batch is a negative. With many classes and few items each (Banking77: 77 intents, 8 items each)
it measured 0.848 against SetFit's cosine pairs' 0.797 (``benchmarks/fewshot.py``).

torch is imported inside the functions that need it.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DatasetError, TrainingDivergedError, UsageError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, steps in all)
Tokenize = Callable[[list[str]], dict[str, Any]]  # texts -> {"input_ids", "attention_mask"}, (N, L) int64


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


def text_tokenizer(preprocess: Any) -> Tokenize:
    """A ``tokenize`` callable for :func:`finetune_contrastive` from a backbone's
    :class:`~embedkit.TextPreprocess`: the inference tokenizer (:class:`embedkit.text.TextTokenizer`,
    same truncation at ``max_length``), right-padded int64 ``input_ids`` / ``attention_mask``.

    Raises (when called):
        InvalidInputError: an item is not valid text (``.errors`` lists every one).
    """
    from .errors import InvalidInputError
    from .text import TextTokenizer, pad

    tokenizer = TextTokenizer(preprocess)

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        out = tokenizer.encode(list(texts))
        if out.errors:
            raise InvalidInputError(out.errors, ok=out.stats.ok)
        return pad(out.ids)

    return tokenize


def _tokens(tokenize: Tokenize, texts: Sequence[str]) -> tuple[Any, Any]:
    import torch

    batch = tokenize(list(texts))
    ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
    if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] != len(texts):
        raise ValueError(f"tokenize must give input_ids and attention_mask of shape (N, L) with N={len(texts)}, "
                         f"got {tuple(ids.shape)} and {tuple(mask.shape)}")
    return ids, mask


def _rows(ids: Any, mask: Any, index: Any, device: str) -> tuple[Any, Any]:
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

    ids, mask = _tokens(tokenize, texts)
    was_training = module.training
    module.eval()
    order = np.argsort(-mask.sum(1).numpy(), kind="stable")  # longest first: little padding per batch
    out: list[Any] = [None] * len(texts)
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = torch.as_tensor(order[start:start + batch_size])
                vectors = module(*_rows(ids, mask, index, device)).float().cpu().numpy()
                for i, v in zip(index.tolist(), vectors):
                    out[i] = v
    finally:
        module.train(was_training)
    if not out:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack(out).astype(np.float32)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay to 0 (sentence-transformers' ``WarmupLinear``, SetFit's default)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1.0, total - warmup))


LOSSES = ("cosine", "in-batch")
OPTIONS = ("iterations", "loss", "scale")  # what embedkit.finetune passes on for objective="contrastive"


def check_options(iterations: Any = 20, loss: str = "cosine", scale: Any = 20.0) -> None:
    """Refuse bad contrastive options before any work (:func:`finetune_contrastive` and
    :func:`embedkit.finetune` both call it).

    Raises:
        UsageError: ``iterations`` not a positive int, ``loss`` not one of :data:`LOSSES`, or
            ``scale`` not a positive finite number (a ValueError).
    """
    if not isinstance(iterations, numbers.Integral) or isinstance(iterations, bool) or iterations < 1:
        raise UsageError(f"iterations must be a positive int (pairs, or anchors, per item), got {iterations!r}")
    if loss not in LOSSES:
        raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not 0 < scale < float("inf"):
        raise UsageError(f"scale must be a positive number (in-batch negatives), got {scale!r}")


@dataclass(frozen=True)
class _Batch:
    left: np.ndarray  # (B,) item indices: the first side (cosine) or the anchors (in-batch)
    right: np.ndarray  # (B,) the second side, or the positives
    target: np.ndarray  # (B,) float32 cosine targets (cosine loss only)

    def __len__(self) -> int:
        return int(self.left.shape[0])


def _draw_epoch(labels: Sequence[Any], loss: str, iterations: Any,
                batch_size: int) -> Callable[[int, int], list[_Batch]]:
    """``draw(seed, epoch)``: one epoch's batches for ``loss``, the same for the same arguments
    (and as many for every epoch)."""
    if loss == "cosine":
        def draw(seed: int, epoch: int) -> list[_Batch]:
            pairs = sample_pairs(labels, iterations, seed + epoch)
            shuffle = np.random.default_rng([seed, epoch]).permutation(len(pairs))
            return [_Batch(pairs.left[b], pairs.right[b], pairs.target[b])
                    for b in (shuffle[i:i + batch_size] for i in range(0, len(pairs), batch_size))]
        return draw

    def draw_anchors(seed: int, epoch: int) -> list[_Batch]:
        return [_Batch(b.anchors, b.positives, np.ones(len(b), dtype=np.float32))
                for b in sample_anchor_batches(labels, iterations, batch_size, seed + epoch)]
    return draw_anchors


def finetune_contrastive(
    module: Any,
    tokenize: Tokenize,
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    iterations: int = 20,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 2e-5,
    seed: int = 0,
    progress: Progress | None = None,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    max_grad_norm: float = 1.0,
    device: str = "cpu",
    train_mode: Callable[[Any], Any] | None = None,
    loss: str = "cosine",
    scale: float = 20.0,
) -> list[dict[str, Any]]:
    """Tune a text body in place on SetFit's sentence pairs with a cosine-similarity loss
    (``loss="cosine"``) or on label-drawn pairs with in-batch negatives (``loss="in-batch"``).

    Pairs come from :func:`sample_pairs` (``2 * iterations * len(texts)`` of them, fresh for each
    epoch: seed ``seed + epoch``), shuffled into batches of ``batch_size`` pairs. Each step embeds
    both sides of its pairs, takes the cosine of each pair and minimises the mean squared error to
    its target (1 same label, 0 different). AdamW (``weight_decay`` off for biases and norms) at
    ``lr`` with linear warm-up over ``warmup`` (a fraction of the steps, or a number of steps >= 1)
    then linear decay, gradients clipped
    to ``max_grad_norm``: SetFit's defaults. On CUDA the forward pass runs under automatic mixed
    precision (:func:`embedkit.trainer.mixed_precision`), the loss in float32. Only parameters with ``requires_grad`` are trained
    (a freeze plan applied before the call is honoured); ``train_mode(module)`` (e.g.
    ``FreezePlan.train``) sets the modes, else ``module.train()``. Seeded: same seed, same weights
    on CPU. The module is left in eval mode.

    ``loss="in-batch"`` (see the module docstring): batches from :func:`sample_anchor_batches`
    (``iterations`` anchors per item, ``batch_size`` classes per batch at most, fresh for each
    epoch), loss = cross-entropy of ``scale * cos(anchor_i, positive_j)`` over ``j`` with target
    ``i``. Schedule, optimiser and clipping as above.

    Args:
        module: torch module, ``module(input_ids, attention_mask) -> (N, D)`` embeddings.
        tokenize: texts -> ``{"input_ids", "attention_mask"}`` (N, L) int64, right-padded
            (see :func:`text_tokenizer`); called once on all of ``texts``.
        texts: the labelled texts (valid strings; :func:`embedkit.finetune` filters bad items).
        labels: one label per text.
        progress: ``progress(done, total)`` after each optimiser step.

    Returns:
        One dict per epoch: ``epoch`` (1-based), ``loss`` (mean over the epoch's steps),
        ``pairs``, ``positives``, ``negatives`` (cosine: pairs of each kind; in-batch: the
        anchor-positive pairs and the negatives they were contrasted with), ``steps``, ``seconds``.

    Raises:
        DatasetError: labels of another length than texts, a missing label, a single class.
        UsageError: a non-positive iterations, epochs, batch_size, lr or scale; an unknown
            ``loss``; ``batch_size`` < 2 with in-batch negatives; no trainable parameter (a ValueError).
    """
    import torch

    if len(labels) != len(texts):
        raise DatasetError(f"{len(labels)} labels for {len(texts)} texts: give one label per text")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise UsageError(f"lr must be a positive number, got {lr!r}")
    check_options(iterations, loss, scale)
    draw = _draw_epoch(labels, loss, int(iterations), batch_size)
    first = draw(seed, 0)  # refuses bad labels before any work; every epoch has as many batches
    per_epoch = len(first)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise UsageError("the module has no trainable parameter (all frozen): unfreeze some blocks, e.g. "
                         "unfreeze='all' or 'last:2'")
    decay = [p for n, p in params if p.ndim > 1 and "norm" not in n.lower()]
    no_decay = [p for n, p in params if not (p.ndim > 1 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    ids, mask = _tokens(tokenize, texts)
    module.to(device)
    total = per_epoch * int(epochs)
    warm = int(warmup) if warmup >= 1 else math.ceil(total * warmup)  # a whole number of steps, or a fraction
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, total, warm))
    from .trainer import mixed_precision

    amp, scaler = mixed_precision(torch, device)  # CUDA: autocast (+ a gradient scaler for float16)
    torch.manual_seed(seed)  # dropout masks
    history: list[dict[str, Any]] = []
    done = 0
    for epoch in range(int(epochs)):
        start = time.perf_counter()
        batches = first if epoch == 0 else draw(seed, epoch)
        (train_mode or (lambda m: m.train()))(module)
        losses = []
        for batch in batches:
            both = torch.as_tensor(np.concatenate([batch.left, batch.right]))
            with amp():
                vectors = module(*_rows(ids, mask, both, device))
            vectors = vectors.float()  # the loss in float32
            u, v = vectors[: len(batch)], vectors[len(batch):]
            if loss == "cosine":
                cosine = torch.nn.functional.cosine_similarity(u, v, dim=-1)
                target = torch.as_tensor(batch.target, device=cosine.device)
                value = torch.nn.functional.mse_loss(cosine, target)
            else:
                u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
                value = torch.nn.functional.cross_entropy(scale * u @ v.T, torch.arange(len(batch), device=u.device))
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(value) if scaler else value).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            losses.append(float(value.detach()))
            if not math.isfinite(losses[-1]):
                raise TrainingDivergedError(f"the contrastive loss at epoch {epoch + 1}, step {done + 1}", "lr")
            done += 1
            if progress is not None:
                progress(done, total)
        if not all(bool(torch.isfinite(p).all()) for _, p in params):
            raise TrainingDivergedError(f"a trained weight after contrastive epoch {epoch + 1}", "lr")
        pairs = sum(len(b) for b in batches)
        positives = sum(int(b.target.sum()) for b in batches) if loss == "cosine" else pairs
        negatives = pairs - positives if loss == "cosine" else sum(len(b) * (len(b) - 1) for b in batches)
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "pairs": pairs,
                   "positives": positives, "negatives": negatives, "steps": len(losses),
                   "seconds": time.perf_counter() - start}
        logger.info("contrastive epoch %d/%d: loss %.4f over %d pairs (%d steps, %.1fs)", epoch + 1, epochs,
                    metrics["loss"], metrics["pairs"], metrics["steps"], metrics["seconds"])
        history.append(metrics)
    module.eval()
    return history
