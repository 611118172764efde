"""The objectives :func:`embedkit.finetuning.loop.run` trains: one class each.

* :class:`Classify`: cross-entropy of a new linear head on the backbone's embeddings (the head at
  ``head_lr``, cosine schedule, validation and best-epoch weights); :func:`sklearn_head` makes the
  trained head a scikit-learn estimator.
* :class:`ContrastivePairs`: SetFit's recipe (Tunstall et al. 2022): the cosine of each sentence
  pair's two embeddings regressed onto 1 (same label) or 0 (mean squared error,
  sentence-transformers' ``CosineSimilarityLoss``), pairs from :func:`~.sampling.sample_pairs`.
* :class:`InBatchNegatives`: each anchor picks its own positive out of the batch's positives by
  softmax cross-entropy over the scaled cosines (sentence-transformers'
  ``MultipleNegativesRankingLoss``), batches from :func:`~.sampling.sample_anchor_batches`.

The contrastive objectives keep SetFit's linear schedule (warm-up steps rounded up), train every
parameter with ``requires_grad`` at ``lr`` and draw each epoch's batches afresh (seed
``seed + epoch``); they have no head and no validation (:func:`embedkit.finetune` fits a
LogisticRegression afterwards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .dataset import Tokenize, text_tensors, token_rows
from .loop import Schedule, Settings, param_groups
from .sampling import sample_anchor_batches, sample_pairs


def make_head(torch: Any, dim: int, classes: int) -> Any:
    """``Linear(dim, classes)`` on features scaled by a fixed factor (set from the first batch so
    the features have unit root-mean-square: the head's learning rate then means the same for
    L2-normalised and raw backbones)."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(dim, classes)
            self.register_buffer("scale", torch.ones(()))

        def forward(self, x: Any) -> Any:
            return self.linear(x * self.scale)

    return Head()


def sklearn_head(head: Any, classes: np.ndarray) -> Any:
    """The trained linear head as a fitted :class:`~sklearn.linear_model.LogisticRegression` with
    the same decisions and (softmax) probabilities: ``coef_ = W * scale``, ``intercept_ = b``; two
    classes keep one row, the difference of theirs (softmax of two logits = sigmoid of their difference)."""
    from sklearn.linear_model import LogisticRegression

    weight = (head.linear.weight.detach().double() * head.scale.detach().double()).cpu().numpy()
    bias = head.linear.bias.detach().double().cpu().numpy()
    if len(classes) == 2:
        weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
    clf = LogisticRegression()
    clf.classes_ = np.asarray(classes)
    clf.coef_, clf.intercept_ = weight, bias
    clf.n_features_in_ = weight.shape[1]
    clf.n_iter_ = np.asarray([0], dtype=np.int32)
    return clf


class Classify:
    """Cross-entropy of a linear head (:func:`make_head`) on the module's embeddings.

    ``data.batch(indices, rng)`` gives the module's input tensors for those items (``rng``: a
    numpy Generator for training augmentation, None for evaluation). Each epoch permutes
    ``train_idx`` with a generator seeded by ``(seed, epoch)``, each step augments with one seeded
    by ``(seed, epoch, step)``. With ``val_idx`` each epoch is validated (loss, accuracy, macro-F1).
    """

    prefix = ""
    rates = "lr / head_lr"
    schedule = Schedule("cosine")

    def __init__(self, plan: Any, data: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
                 n_classes: int, dim: int, s: Settings, class_weight: np.ndarray | None = None):
        self.plan, self.data, self.y, self.train_idx, self.val_idx = plan, data, y, train_idx, val_idx
        self.n_classes, self.dim, self.s, self.class_weight = n_classes, dim, s, class_weight
        self.head: Any = None
        self.weight: Any = None
        self.device: Any = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_idx) / self.s.batch_size)

    def start(self, torch: Any, module: Any, device: Any) -> None:
        self.device = device
        self.head = make_head(torch, self.dim, self.n_classes).to(device)
        if self.class_weight is not None:
            self.weight = torch.as_tensor(self.class_weight, dtype=torch.float32, device=device)
        with torch.no_grad():  # the head's feature scale, from the first batch in inference mode
            module.eval()
            first = module(*self.data.batch(self.train_idx[: self.s.batch_size], None)).float()
            self.head.scale.fill_(float(1.0 / max(first.pow(2).mean().sqrt().item(), 1e-12)))

    def param_groups(self, module: Any, s: Settings) -> list[dict[str, Any]]:
        return [*param_groups(self.plan.trainable, s.lr, s.layer_decay, s.weight_decay),
                {"params": [self.head.linear.weight], "lr": s.head_lr, "weight_decay": s.weight_decay},
                {"params": [self.head.linear.bias], "lr": s.head_lr, "weight_decay": 0.0}]

    def parameters(self, module: Any, optimizer: Any) -> list[Any]:
        return [p for g in optimizer.param_groups for p in g["params"]]

    def batches(self, epoch: int) -> list[tuple[np.ndarray, list[int]]]:
        """``(item indices, augmentation seed)`` of each step."""
        s = self.s
        order = self.train_idx[np.random.default_rng([s.seed, epoch]).permutation(len(self.train_idx))]
        return [(order[k * s.batch_size:(k + 1) * s.batch_size], [s.seed, epoch, k])
                for k in range(self.steps_per_epoch)]

    def train_mode(self, module: Any) -> None:
        self.plan.train(module)  # frozen parts stay in eval mode
        self.head.train()

    def loss(self, torch: Any, module: Any, batch: tuple[np.ndarray, list[int]], amp: Callable[[], Any]) -> Any:
        idx, seed = batch
        rng = np.random.default_rng(seed)
        target = torch.as_tensor(self.y[idx], device=self.device)
        with amp():
            if self.plan.trainable:
                features = module(*self.data.batch(idx, rng))
            else:
                with torch.no_grad():
                    features = module(*self.data.batch(idx, rng))
            logits = self.head(features.float())
        return torch.nn.functional.cross_entropy(logits.float(), target, weight=self.weight)

    def step_info(self, epoch: int, losses: list[float]) -> dict[str, Any]:
        return {"epoch": epoch + 1, "loss": float(np.mean(losses[-20:]))}

    def summary(self, epoch: int, step: int, losses: list[float], optimizer: Any) -> dict[str, Any]:
        return {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                "lr": float(optimizer.param_groups[0]["lr"])}

    def evaluate(self, torch: Any, module: Any, amp: Callable[[], Any]) -> dict[str, float] | None:
        """Loss, accuracy and macro-F1 on ``val_idx`` (inference mode, no augmentation); None without it."""
        from sklearn.metrics import f1_score

        index, y = self.val_idx, self.y
        if index is None or not len(index):
            return None
        module.eval()
        self.head.eval()
        preds, losses = [], []
        with torch.inference_mode():
            for start in range(0, len(index), self.s.batch_size):
                idx = index[start:start + self.s.batch_size]
                with amp():
                    logits = self.head(module(*self.data.batch(idx, None)).float()).float()
                target = torch.as_tensor(y[idx], device=logits.device)
                losses.append(float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")))
                preds.append(logits.argmax(1).cpu().numpy())
        pred = np.concatenate(preds) if preds else np.empty(0, dtype=int)
        return {"val_loss": sum(losses) / max(1, len(index)), "val_accuracy": float((pred == y[index]).mean()),
                "val_macro_f1": float(f1_score(y[index], pred, average="macro", zero_division=0))}

    def epoch_info(self, row: dict[str, Any]) -> dict[str, Any] | None:
        return {k: v for k, v in row.items() if k in ("epoch", "train_loss", "val_accuracy")}


@dataclass(frozen=True)
class Batch:
    """Item indices of one contrastive batch."""

    left: np.ndarray  # (B,) the first side (pairs) or the anchors (in-batch)
    right: np.ndarray  # (B,) the second side, or the positives
    target: np.ndarray  # (B,) float32 cosine targets (pairs only)

    def __len__(self) -> int:
        return int(self.left.shape[0])


class Contrastive:
    """What the contrastive objectives share: texts tokenised once, both sides of each batch embedded
    in one forward pass, the loss in float32. Subclasses draw the batches and give the loss."""

    prefix = "contrastive "
    rates = "lr"
    schedule = Schedule("linear", round_up=True)  # SetFit's WarmupLinear
    head = None

    def __init__(self, tokenize: Tokenize, texts: Sequence[str], labels: Sequence[Any], *, iterations: int,
                 batch_size: int, seed: int, device: str, train_mode: Callable[[Any], Any] | None = None):
        self.tokenize, self.texts, self.labels = tokenize, texts, labels
        self.iterations, self.batch_size, self.seed, self.device = iterations, batch_size, seed, device
        self._train_mode = train_mode
        self.first = self.draw(0)  # refuses bad labels before any work; every epoch has as many batches
        self.current = self.first
        self.ids: Any = None
        self.mask: Any = None

    def draw(self, epoch: int) -> list[Batch]:
        raise NotImplementedError

    def counts(self, batches: list[Batch]) -> tuple[int, int]:
        """``(positives, negatives)`` the epoch's batches contrasted."""
        raise NotImplementedError

    def pair_loss(self, torch: Any, u: Any, v: Any, batch: Batch) -> Any:
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int:
        return len(self.first)

    def start(self, torch: Any, module: Any, device: Any) -> None:
        self.ids, self.mask = text_tensors(self.tokenize, self.texts)

    def param_groups(self, module: Any, s: Settings) -> list[dict[str, Any]]:
        trainable = [(n, p, 0) for n, p in module.named_parameters() if p.requires_grad]
        return param_groups(trainable, s.lr, None, s.weight_decay)

    def parameters(self, module: Any, optimizer: Any) -> list[Any]:
        return [p for p in module.parameters() if p.requires_grad]  # the module's order

    def batches(self, epoch: int) -> list[Batch]:
        self.current = self.first if epoch == 0 else self.draw(epoch)
        return self.current

    def train_mode(self, module: Any) -> None:
        (self._train_mode or (lambda m: m.train()))(module)

    def loss(self, torch: Any, module: Any, batch: Batch, amp: Callable[[], Any]) -> Any:
        both = torch.as_tensor(np.concatenate([batch.left, batch.right]))
        with amp():
            vectors = module(*token_rows(self.ids, self.mask, both, self.device))
        vectors = vectors.float()  # the loss in float32
        return self.pair_loss(torch, vectors[: len(batch)], vectors[len(batch):], batch)

    def step_info(self, epoch: int, losses: list[float]) -> dict[str, Any]:
        return {}

    def summary(self, epoch: int, step: int, losses: list[float], optimizer: Any) -> dict[str, Any]:
        pairs = sum(len(b) for b in self.current)
        positives, negatives = self.counts(self.current)
        return {"epoch": epoch + 1, "loss": float(np.mean(losses)), "pairs": pairs, "positives": positives,
                "negatives": negatives, "steps": len(losses)}

    def evaluate(self, torch: Any, module: Any, amp: Callable[[], Any]) -> dict[str, float] | None:
        return None

    def epoch_info(self, row: dict[str, Any]) -> dict[str, Any] | None:
        return None  # progress counts steps only


class ContrastivePairs(Contrastive):
    """SetFit's cosine-similarity loss on :func:`sample_pairs`' pairs, shuffled into batches."""

    def draw(self, epoch: int) -> list[Batch]:
        pairs = sample_pairs(self.labels, self.iterations, self.seed + epoch)
        shuffle = np.random.default_rng([self.seed, epoch]).permutation(len(pairs))
        size = self.batch_size
        return [Batch(pairs.left[b], pairs.right[b], pairs.target[b])
                for b in (shuffle[i:i + size] for i in range(0, len(pairs), size))]

    def counts(self, batches: list[Batch]) -> tuple[int, int]:
        positives = sum(int(b.target.sum()) for b in batches)
        return positives, sum(len(b) for b in batches) - positives

    def pair_loss(self, torch: Any, u: Any, v: Any, batch: Batch) -> Any:
        cosine = torch.nn.functional.cosine_similarity(u, v, dim=-1)
        target = torch.as_tensor(batch.target, device=cosine.device)
        return torch.nn.functional.mse_loss(cosine, target)


class InBatchNegatives(Contrastive):
    """Cross-entropy of ``scale * cos(anchor_i, positive_j)`` over ``j`` with target ``i``, on
    :func:`sample_anchor_batches`' batches (``batch_size`` classes per batch at most)."""

    def __init__(self, *args: Any, scale: float = 20.0, **kwargs: Any):
        self.scale = scale
        super().__init__(*args, **kwargs)

    def draw(self, epoch: int) -> list[Batch]:
        return [Batch(b.anchors, b.positives, np.ones(len(b), dtype=np.float32))
                for b in sample_anchor_batches(self.labels, self.iterations, self.batch_size, self.seed + epoch)]

    def counts(self, batches: list[Batch]) -> tuple[int, int]:
        return sum(len(b) for b in batches), sum(len(b) * (len(b) - 1) for b in batches)

    def pair_loss(self, torch: Any, u: Any, v: Any, batch: Batch) -> Any:
        u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
        return torch.nn.functional.cross_entropy(self.scale * u @ v.T, torch.arange(len(batch), device=u.device))
