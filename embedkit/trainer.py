"""The supervised fine-tuning loop: a backbone module, a linear head, a plain torch loop.

Parameter groups: the head at ``head_lr``; each trainable backbone parameter at ``lr``, times
``layer_decay ** depth`` when layer-wise decay is on (depth from the freeze plan: 0 = last
block). Weight decay on matrices only (not biases and norms). AdamW; linear warm-up then cosine
decay to 0 per optimiser step; gradients clipped to ``max_grad_norm``. Frozen parts stay in
eval mode (:meth:`FreezePlan.train`). Seeded and deterministic on CPU: the epoch's data order
and each step's augmentation come from generators seeded by ``(seed, epoch[, step])``, and
torch's RNG state (dropout) is saved in every checkpoint, so a resumed run takes the same steps.
Automatic mixed precision (bfloat16, else float16 with a gradient scaler) on CUDA only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import checkpoint
from .errors import TrainingDivergedError

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-5
    head_lr: float = 1e-3
    layer_decay: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float | None = 1.0
    patience: int | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int | None = None


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


def _groups(plan: Any, head: Any, s: Settings) -> list[dict[str, Any]]:
    groups: dict[tuple[float, bool], list[Any]] = {}
    for name, param, depth in plan.trainable:
        lr = s.lr * (s.layer_decay ** depth if s.layer_decay else 1.0)
        decay = param.ndim > 1 and "norm" not in name.lower()
        groups.setdefault((lr, decay), []).append(param)
    out = [{"params": ps, "lr": lr, "weight_decay": s.weight_decay if decay else 0.0}
           for (lr, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
    out.append({"params": [head.linear.weight], "lr": s.head_lr, "weight_decay": s.weight_decay})
    out.append({"params": [head.linear.bias], "lr": s.head_lr, "weight_decay": 0.0})
    return out


def schedule(step: int, total: int, warm: int) -> float:
    """Linear warm-up over ``warm`` steps, then cosine decay to 0 at ``total``."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def evaluate(torch: Any, module: Any, head: Any, data: Any, index: np.ndarray, y: np.ndarray, s: Settings,
             amp: Any) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on ``index`` (inference mode, no augmentation)."""
    from sklearn.metrics import f1_score

    module.eval()
    head.eval()
    preds, losses = [], []
    with torch.inference_mode():
        for start in range(0, len(index), s.batch_size):
            idx = index[start:start + s.batch_size]
            with amp():
                logits = head(module(*data.batch(idx, None)).float()).float()
            target = torch.as_tensor(y[idx], device=logits.device)
            losses.append(float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")))
            preds.append(logits.argmax(1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.empty(0, dtype=int)
    return {"val_loss": sum(losses) / max(1, len(index)), "val_accuracy": float((pred == y[index]).mean()),
            "val_macro_f1": float(f1_score(y[index], pred, average="macro", zero_division=0))}


def mixed_precision(torch: Any, device: str) -> tuple[Callable[[], Any], Any]:
    """``(context, scaler)``: automatic mixed precision on CUDA (bfloat16 where supported, else
    float16 with a :class:`torch.amp.GradScaler`); on other devices a null context and no scaler."""
    import contextlib

    if not device.startswith("cuda"):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def train(module: Any, plan: Any, data: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
          n_classes: int, dim: int, s: Settings, class_weight: np.ndarray | None = None,
          folder: Path | None = None, resume_state: dict[str, Any] | None = None,
          progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Train ``module`` (in place) and a new head; returns ``(head, history)``.

    ``data.batch(indices, rng)`` gives the module's input tensors for those items (``rng``: a
    numpy Generator for training augmentation, None for evaluation). With ``folder`` a
    checkpoint is written each epoch (and every ``checkpoint_every`` steps); ``resume_state``
    (from :func:`checkpoint.start`) continues from ``folder``'s last checkpoint. With
    validation the weights of the best epoch (accuracy, then loss) are kept.
    """
    import torch

    torch.manual_seed(s.seed)
    head = make_head(torch, dim, n_classes)
    device = torch.device(s.device)
    module.to(device)
    head.to(device)
    amp, scaler = mixed_precision(torch, s.device)
    steps_per_epoch = math.ceil(len(train_idx) / s.batch_size)
    total = s.epochs * steps_per_epoch
    warm = int(round(s.warmup * total)) if s.warmup < 1 else int(s.warmup)
    with torch.no_grad():  # the head's feature scale, from the first batch in inference mode
        module.eval()
        first = module(*data.batch(train_idx[: s.batch_size], None)).float()
        head.scale.fill_(float(1.0 / max(first.pow(2).mean().sqrt().item(), 1e-12)))
    optimizer = torch.optim.AdamW(_groups(plan, head, s))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total, warm))
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    backbone_trains = bool(plan.trainable)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"key": None, "epoch": None, "weights": None}
    epoch, skip, step, stale = 0, 0, 0, 0
    if resume_state is not None and folder is not None:
        meta = checkpoint.restore(folder / checkpoint.LAST, module, head, optimizer, scheduler)
        epoch, skip, step, stale = meta["epoch"], meta["step_in_epoch"], meta["step"], meta["stale"]
        history = meta["history"]
        best["key"], best["epoch"] = meta.get("best_key"), meta.get("best_epoch")
        if (folder / checkpoint.BEST).is_file():
            best["weights"] = checkpoint.read(folder / checkpoint.BEST)[0]
        logger.info("resuming at epoch %d, step %d", epoch + 1, step)

    losses: list[float] = list(resume_state.get("losses") or []) if resume_state else []

    def state(epoch_: int, in_epoch: int) -> dict[str, Any]:
        return {"epoch": epoch_, "step_in_epoch": in_epoch, "step": step, "stale": stale, "history": history,
                "best_key": best["key"], "best_epoch": best["epoch"], "losses": losses if in_epoch else []}

    stopped = bool(s.patience) and stale >= (s.patience or 0) and skip == 0 and 0 < epoch < s.epochs
    if resume_state is not None and history and stopped:
        # the run had stopped early at this checkpoint (killed before it ended): stop here again,
        # not one epoch later than the uninterrupted run
        history[-1]["early_stop"] = True
        epoch = s.epochs
    while epoch < s.epochs:
        started = time.perf_counter()
        order = train_idx[np.random.default_rng([s.seed, epoch]).permutation(len(train_idx))]
        plan.train(module)
        head.train()
        losses = losses if skip else []
        for k in range(skip, steps_per_epoch):
            idx = order[k * s.batch_size:(k + 1) * s.batch_size]
            rng = np.random.default_rng([s.seed, epoch, k])
            target = torch.as_tensor(y[idx], device=device)
            with amp():
                if backbone_trains:
                    features = module(*data.batch(idx, rng))
                else:
                    with torch.no_grad():
                        features = module(*data.batch(idx, rng))
                logits = head(features.float())
            loss = torch.nn.functional.cross_entropy(logits.float(), target, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            if not math.isfinite(losses[-1]) and scaler is None:  # mixed precision skips such steps itself
                raise TrainingDivergedError(f"the loss at epoch {epoch + 1}, step {step}")
            if progress is not None:
                progress(step, total, {"epoch": epoch + 1, "loss": float(np.mean(losses[-20:]))})
            if folder is not None and s.checkpoint_every and step % s.checkpoint_every == 0 and k + 1 < steps_per_epoch:
                checkpoint.save(folder, module, head, optimizer, scheduler, state(epoch, k + 1))
        skip = 0
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDivergedError(f"a trained weight after epoch {epoch + 1}")
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                               "lr": float(optimizer.param_groups[0]["lr"])}
        if val_idx is not None and len(val_idx):
            row.update(evaluate(torch, module, head, data, val_idx, y, s, amp))
            key = (row["val_accuracy"], -row["val_loss"])
            if best["key"] is None or tuple(key) > tuple(best["key"]):
                best.update(key=list(key), epoch=epoch + 1, weights=checkpoint._tensors(module, head)[0])
                stale = 0
                if folder is not None:
                    checkpoint.save_best(folder, module, head)
            else:
                stale += 1
        row["seconds"] = round(time.perf_counter() - started, 3)
        history.append(row)
        epoch += 1
        if progress is not None:
            progress(step, total, {k: v for k, v in row.items() if k in ("epoch", "train_loss", "val_accuracy")})
        if folder is not None:
            checkpoint.write_metrics(folder, history)
            checkpoint.save(folder, module, head, optimizer, scheduler, state(epoch, 0))
        if s.patience and stale >= s.patience and epoch < s.epochs:
            logger.info("early stopping after epoch %d: no better validation for %d epochs", epoch, stale)
            history[-1]["early_stop"] = True
            break
    if best["weights"] is not None and best["epoch"] != len(history):
        checkpoint.restore_weights(best["weights"], module, head)
        logger.info("kept the weights of epoch %d (best validation)", best["epoch"])
    module.eval()
    head.eval()
    return head, history
