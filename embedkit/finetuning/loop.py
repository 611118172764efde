"""The fine-tuning loop, written once; what it optimises is an :class:`Objective`
(:mod:`embedkit.finetuning.objectives`: classify, contrastive pairs, in-batch negatives).

Parameter groups: each trainable backbone parameter at ``lr``, times ``layer_decay ** depth``
when layer-wise decay is on (depth from the freeze plan: 0 = last block), plus whatever the
objective adds (classify: its head at ``head_lr``). Weight decay on matrices only (not biases and
norms). AdamW; linear warm-up then the objective's decay to 0 per optimiser step (:class:`Schedule`);
gradients clipped to ``max_grad_norm``. Automatic mixed precision (bfloat16, else float16 with a
gradient scaler) on CUDA only. A NaN or infinite loss or weight is a :class:`TrainingDivergedError`.

Seeded and deterministic on CPU: torch's RNG is seeded once before the objective starts, the data
order and augmentation come from the objective's generators seeded by ``(seed, epoch[, step])``,
and torch's RNG state (dropout) is saved in every checkpoint, so a resumed run takes the same
steps. With a checkpoint folder the run is saved each epoch (and every ``checkpoint_every``
steps), and with validation the best epoch's weights are kept (and early stopping follows
``patience``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from ..errors import TrainingDivergedError
from . import checkpoints as checkpoint

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, Any]], None]  # (steps done, steps in all, info)


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


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then decay to 0 at the last step: the factor of each step's learning rate.

    Attributes:
        decay: ``cosine``, or ``linear`` (sentence-transformers' ``WarmupLinear``, SetFit's default).
        round_up: a warm-up given as a fraction of the steps is rounded up (SetFit), not to the nearest.
    """

    decay: str = "cosine"
    round_up: bool = False

    def warmup_steps(self, warmup: float, total: int) -> int:
        """Steps of warm-up: ``warmup`` is a fraction of ``total`` (< 1) or a number of steps."""
        if warmup >= 1:
            return int(warmup)
        return math.ceil(total * warmup) if self.round_up else int(round(warmup * total))

    def __call__(self, step: int, total: int, warm: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if self.decay == "linear":
            return max(0.0, (total - step) / max(1.0, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


class Objective(Protocol):
    """What :func:`run` optimises: its batches, its loss, and what an epoch reports.

    Attributes:
        head: a torch module trained beside the backbone and checkpointed with it, or None.
        schedule: the learning-rate schedule.
        prefix: how errors name the loss and the epoch (``""``, ``"contrastive "``).
        rates: the learning rates a divergence message says to lower.
        steps_per_epoch: optimiser steps in each epoch.
    """

    head: Any
    schedule: Schedule
    prefix: str
    rates: str

    @property
    def steps_per_epoch(self) -> int: ...

    def start(self, torch: Any, module: Any, device: Any) -> None:
        """Build and place what the loss needs (after seeding, before the optimiser)."""

    def param_groups(self, module: Any, s: Settings) -> list[dict[str, Any]]: ...

    def parameters(self, module: Any, optimizer: Any) -> list[Any]:
        """The trained parameters in the order their gradient norms are summed when clipping (an
        order each objective keeps: another one changes the last bits of the clipped weights)."""

    def batches(self, epoch: int) -> Sequence[Any]:
        """The epoch's batches: the same for the same epoch, ``steps_per_epoch`` of them."""

    def train_mode(self, module: Any) -> None: ...

    def loss(self, torch: Any, module: Any, batch: Any, amp: Callable[[], Any]) -> Any:
        """The batch's float32 loss (the forward pass under ``amp``)."""

    def step_info(self, epoch: int, losses: list[float]) -> dict[str, Any]: ...

    def summary(self, epoch: int, step: int, losses: list[float], optimizer: Any) -> dict[str, Any]:
        """The epoch's row of the history (before validation and wall time)."""

    def evaluate(self, torch: Any, module: Any, amp: Callable[[], Any]) -> dict[str, float] | None:
        """Validation metrics (``val_accuracy`` and ``val_loss`` at least), or None: no validation."""

    def epoch_info(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """What ``progress`` gets after the epoch, or None: no call."""


def param_groups(trainable: Iterable[tuple[str, Any, int]], lr: float, layer_decay: float | None,
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of ``(name, parameter, depth)``: one per learning rate, with and without weight
    decay (matrices decay; biases and norms do not), the highest rate first."""
    groups: dict[tuple[float, bool], list[Any]] = {}
    for name, param, depth in trainable:
        rate = lr * (layer_decay ** depth if layer_decay else 1.0)
        decay = param.ndim > 1 and "norm" not in name.lower()
        groups.setdefault((rate, decay), []).append(param)
    return [{"params": ps, "lr": rate, "weight_decay": weight_decay if decay else 0.0}
            for (rate, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def mixed_precision(torch: Any, device: str) -> tuple[Callable[[], Any], Any]:
    """``(context, scaler)``: automatic mixed precision on CUDA (bfloat16 where supported, else
    float16 with a :class:`torch.amp.GradScaler`); on other devices a null context and no scaler."""
    import contextlib

    if not device.startswith("cuda"):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def run(objective: Objective, module: Any, s: Settings, folder: Path | None = None,
        resume_state: dict[str, Any] | None = None, progress: Progress | None = None,
        run_id: str = "") -> list[dict[str, Any]]:
    """Train ``module`` (in place) and the objective's head; returns the history, one row per epoch.

    With ``folder`` a checkpoint is written each epoch (and every ``checkpoint_every`` steps);
    ``resume_state`` (from :func:`checkpoints.start`) continues from ``folder``'s last checkpoint;
    ``run_id`` (:func:`checkpoints.identity`) is written into each checkpoint and checked on resume.
    With validation the weights of the best epoch (accuracy, then loss) are kept. The module and
    head are left in eval mode.

    Raises:
        TrainingDivergedError: the loss or a trained weight became NaN or infinite.
    """
    import torch

    loop = _Loop(torch, objective, module, s, folder, progress)
    loop.run_id = run_id
    if resume_state is not None and folder is not None:
        loop.resume(resume_state)
    while loop.epoch < s.epochs and not loop.train_epoch():
        pass
    return loop.finish()


class _Loop:
    """One run: the objects that move it on, and the state a checkpoint holds."""

    def __init__(self, torch: Any, objective: Objective, module: Any, s: Settings, folder: Path | None,
                 progress: Progress | None):
        self.torch, self.objective, self.module, self.s = torch, objective, module, s
        self.folder, self.progress = folder, progress
        torch.manual_seed(s.seed)  # the head's initialisation, then dropout
        device = torch.device(s.device)
        module.to(device)
        objective.start(torch, module, device)
        self.amp, self.scaler = mixed_precision(torch, s.device)
        self.total = s.epochs * objective.steps_per_epoch
        warm = objective.schedule.warmup_steps(s.warmup, self.total)
        self.optimizer = torch.optim.AdamW(objective.param_groups(module, s))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: objective.schedule(step, self.total, warm))
        self.params = objective.parameters(module, self.optimizer)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"key": None, "epoch": None, "weights": None}
        self.epoch = self.skip = self.step = self.stale = 0
        self.losses: list[float] = []
        self.run_id = ""

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from the folder's last checkpoint (``state``: its JSON part)."""
        assert self.folder is not None
        meta = checkpoint.restore(self.folder / checkpoint.LAST, self.module, self.objective.head, self.optimizer,
                                  self.scheduler, self.run_id)
        self.epoch, self.skip, self.step, self.stale = meta["epoch"], meta["step_in_epoch"], meta["step"], meta["stale"]
        self.history = meta["history"]
        self.best["key"], self.best["epoch"] = meta.get("best_key"), meta.get("best_epoch")
        if (self.folder / checkpoint.BEST).is_file():
            self.best["weights"] = checkpoint.read(self.folder / checkpoint.BEST, self.run_id)[0]
        logger.info("resuming at epoch %d, step %d", self.epoch + 1, self.step)
        self.losses = list(state.get("losses") or [])
        s = self.s
        if self.history and s.patience and self.stale >= s.patience and self.skip == 0 and 0 < self.epoch < s.epochs:
            # the run had stopped early at this checkpoint (killed before it ended): stop here again,
            # not one epoch later than the uninterrupted run
            self.history[-1]["early_stop"] = True
            self.epoch = s.epochs

    def save(self, in_epoch: int) -> None:
        state = {"epoch": self.epoch, "step_in_epoch": in_epoch, "step": self.step, "stale": self.stale,
                 "history": self.history, "best_key": self.best["key"], "best_epoch": self.best["epoch"],
                 "losses": self.losses if in_epoch else []}
        assert self.folder is not None
        checkpoint.save(self.folder, self.module, self.objective.head, self.optimizer, self.scheduler, state,
                        self.run_id)

    def train_epoch(self) -> bool:
        """One epoch (the rest of it, when resumed mid-epoch); returns whether training stops early."""
        s, per_epoch = self.s, self.objective.steps_per_epoch
        started = time.perf_counter()
        batches = self.objective.batches(self.epoch)
        self.objective.train_mode(self.module)
        self.losses = self.losses if self.skip else []
        for k in range(self.skip, per_epoch):
            self.train_step(batches[k])
            if self.folder is not None and s.checkpoint_every and self.step % s.checkpoint_every == 0 \
                    and k + 1 < per_epoch:
                self.save(k + 1)
        self.skip = 0
        if not all(bool(self.torch.isfinite(p).all()) for p in self.params):
            raise TrainingDivergedError(f"a trained weight after {self.objective.prefix}epoch {self.epoch + 1}",
                                        self.objective.rates)
        return self.end_epoch(started)

    def train_step(self, batch: Any) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        loss = self.objective.loss(self.torch, self.module, batch, self.amp)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if self.s.max_grad_norm:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(loss.item())
        if not math.isfinite(self.losses[-1]) and scaler is None:  # mixed precision skips such steps itself
            raise TrainingDivergedError(f"the {self.objective.prefix}loss at epoch {self.epoch + 1}, step {self.step}",
                                        self.objective.rates)
        if self.progress is not None:
            self.progress(self.step, self.total, self.objective.step_info(self.epoch, self.losses))

    def end_epoch(self, started: float) -> bool:
        """Validate, keep the best weights, report and checkpoint; returns whether to stop early."""
        s = self.s
        row = self.objective.summary(self.epoch, self.step, self.losses, self.optimizer)
        metrics = self.objective.evaluate(self.torch, self.module, self.amp)
        if metrics is not None:
            row.update(metrics)
            key = (row["val_accuracy"], -row["val_loss"])
            if self.best["key"] is None or tuple(key) > tuple(self.best["key"]):
                weights = checkpoint.weights(self.module, self.objective.head)
                self.best.update(key=list(key), epoch=self.epoch + 1, weights=weights)
                self.stale = 0
                if self.folder is not None:
                    checkpoint.save_best(self.folder, self.module, self.objective.head, self.run_id)
            else:
                self.stale += 1
        row["seconds"] = round(time.perf_counter() - started, 3)
        self.history.append(row)
        self.epoch += 1
        logger.info("epoch %d/%d: %s", self.epoch, s.epochs, {k: v for k, v in row.items() if k != "epoch"})
        info = self.objective.epoch_info(row)
        if self.progress is not None and info is not None:
            self.progress(self.step, self.total, info)
        if self.folder is not None:
            checkpoint.write_metrics(self.folder, self.history)
            self.save(0)
        if s.patience and self.stale >= s.patience and self.epoch < s.epochs:
            logger.info("early stopping after epoch %d: no better validation for %d epochs", self.epoch, self.stale)
            self.history[-1]["early_stop"] = True
            return True
        return False

    def finish(self) -> list[dict[str, Any]]:
        """Restore the best epoch's weights (when it was not the last); eval mode."""
        head = self.objective.head
        if self.best["weights"] is not None and self.best["epoch"] != len(self.history):
            checkpoint.restore_weights(self.best["weights"], self.module, head)
            logger.info("kept the weights of epoch %d (best validation)", self.best["epoch"])
        self.module.eval()
        if head is not None:
            head.eval()
        return self.history
