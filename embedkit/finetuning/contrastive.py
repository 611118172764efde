"""Few-shot contrastive fine-tuning of a text body: SetFit's recipe (Tunstall et al. 2022).

The recipe (``huggingface/setfit``, ``src/setfit/sampler.py`` ``ContrastiveDataset`` and its
trainer): from ``n`` labelled texts draw sentence pairs, a pair of the same label being
*positive* (target cosine 1) and of different labels *negative* (target cosine 0); tune the
body so that the cosine of each pair's two embeddings approaches its target (mean squared
error, sentence-transformers' ``CosineSimilarityLoss``); then fit a LogisticRegression head on
the tuned embeddings (done by :func:`embedkit.finetune`, which calls :func:`finetune_contrastive`).
Pairs are drawn as SetFit's ``num_iterations`` draws them (:mod:`.sampling`).

``loss="in-batch"`` swaps the pair loss for in-batch negatives (sentence-transformers'
``MultipleNegativesRankingLoss``, Henderson et al. 2017, "Efficient Natural Language Response
Suggestion for Smart Reply", arXiv:1705.00652; scale 20 as sentence-transformers' default): each
batch holds one (anchor, positive) pair from each of up to ``batch_size`` *different* classes
(:func:`sample_anchor_batches`), and each anchor must pick its own positive out of all the
batch's positives by softmax cross-entropy over the scaled cosines, so every other class in the
batch is a negative. With many classes and few items each (Banking77: 77 intents, 8 items each)
it measured 0.848 against SetFit's cosine pairs' 0.797 (``benchmarks/fewshot.py``).

The training loop is :func:`embedkit.finetuning.loop.run` (the one every objective shares); the
objectives are :class:`~.objectives.ContrastivePairs` and :class:`~.objectives.InBatchNegatives`.
The sampling and text helpers are re-exported here.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DatasetError, UsageError
from .dataset import Tokenize, encode, text_tokenizer
from .loop import Settings, run
from .objectives import ContrastivePairs, InBatchNegatives
from .sampling import AnchorBatch, Pairs, sample_anchor_batches, sample_pairs

__all__ = ["LOSSES", "OPTIONS", "AnchorBatch", "Pairs", "Progress", "Tokenize", "check_options", "encode",
           "finetune_contrastive", "sample_anchor_batches", "sample_pairs", "text_tokenizer"]

Progress = Callable[[int, int], None]  # (steps done, steps in all)


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
    precision (:func:`embedkit.finetuning.loop.mixed_precision`), the loss in float32. Only parameters with ``requires_grad`` are trained
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
    if len(labels) != len(texts):
        raise DatasetError(f"{len(labels)} labels for {len(texts)} texts: give one label per text")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise UsageError(f"lr must be a positive number, got {lr!r}")
    check_options(iterations, loss, scale)
    common = dict(iterations=int(iterations), batch_size=batch_size, seed=seed, device=device, train_mode=train_mode)
    objective = (ContrastivePairs(tokenize, texts, labels, **common) if loss == "cosine"  # draws epoch 0's batches:
                 else InBatchNegatives(tokenize, texts, labels, scale=scale, **common))  # bad labels refused now
    if not any(p.requires_grad for p in module.parameters()):
        raise UsageError("the module has no trainable parameter (all frozen): unfreeze some blocks, e.g. "
                         "unfreeze='all' or 'last:2'")
    settings = Settings(epochs=int(epochs), batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                        max_grad_norm=max_grad_norm, seed=seed, device=device)
    return run(objective, module, settings,
               progress=(lambda done, total, info: progress(done, total)) if progress is not None else None)
