"""Optimiser and learning-rate schedule (warm-up, then linear/cosine decay or constant).

The schedule's numbers are resolved once the data stream is known (:func:`resolve_schedule`):
a run may be given in epochs and its learning rate scaled with the global batch, as the authors'
``main_mmkd.py`` does (``lr = base * batch / 256``, warm-up and cosine decay in epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmkd_ds.config.schema import TrainConfig

# No weight decay on biases and normalisation weights, as in BERT (train.weight_decay_on: matrices).
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "bn.weight")


@dataclass(frozen=True)
class Schedule:
    """The resolved run length and learning rate of a run."""

    steps: int  # optimizer steps in all
    warmup_steps: int
    lr: float  # peak learning rate (after lr_scaling)
    kind: str  # "linear", "cosine" or "constant" decay after warm-up
    global_batch: int  # pairs per optimizer step over all ranks
    steps_per_epoch: int

    def line(self, cfg: TrainConfig) -> str:
        """One line for the start-up log: where each number came from."""
        length = (f"{self.steps} steps ({cfg.epochs:g} epochs of {self.steps_per_epoch})" if cfg.epochs
                  else f"{self.steps} steps ({self.steps / max(self.steps_per_epoch, 1):.2f} epochs)")
        warm = f"{self.warmup_steps} ({cfg.warmup_epochs:g} epochs)" if cfg.warmup_epochs else str(self.warmup_steps)
        lr = (f"{self.lr:.3g} = {cfg.lr:g} x {self.global_batch}/256" if cfg.lr_scaling == "linear"
              else f"{self.lr:.3g}")
        return (f"schedule: {length}, global batch {self.global_batch}, warm-up {warm}, "
                f"peak lr {lr}, {self.kind} decay")


def resolve_schedule(cfg: TrainConfig, batches_per_epoch: int, micro_batch: int, world_size: int) -> Schedule:
    """Steps, warm-up and peak lr of a run.

    Args:
        cfg: the run's ``train`` section.
        batches_per_epoch: micro-batches each rank reads per epoch (the stream's plan).
        micro_batch: pairs per micro-batch per rank (``stream.batch_size``).
        world_size: data-parallel ranks.
    """
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    steps = max(1, round(cfg.epochs * steps_per_epoch)) if cfg.epochs else cfg.steps
    warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs else cfg.warmup_steps
    global_batch = micro_batch * world_size * cfg.grad_accum
    lr = cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr
    return Schedule(steps, min(warmup, steps), lr, cfg.schedule, global_batch, steps_per_epoch)


def fixed_schedule(cfg: TrainConfig) -> Schedule:
    """The schedule of a step-counted run without lr scaling (no data stream needed)."""
    return Schedule(cfg.steps, cfg.warmup_steps, cfg.lr, cfg.schedule, 0, 0)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (frozen teacher-side heads are left out).

    ``cfg.weight_decay_on``: "matrices" decays only parameters of 2 or more dimensions that are
    not normalisation weights; "all" decays every parameter, as the authors' code does.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = cfg.weight_decay_on == "matrices" and (p.ndim < 2 or any(k in name for k in _NO_DECAY))
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr if lr is None else lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, schedule: Schedule) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    span = max(1, schedule.steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    if schedule.kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule))
