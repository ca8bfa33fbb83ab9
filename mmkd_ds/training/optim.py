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
    encoder_scale: float = 1.0  # the pretrained encoder's lr relative to the new parameters'
    encoder_hold: int = 0  # steps during which the encoder's lr is 0 (the new parameters warm up)

    def line(self, cfg: TrainConfig) -> str:
        """One line for the start-up log: where each number came from."""
        length = (f"{self.steps} steps ({cfg.epochs:g} epochs of {self.steps_per_epoch})" if cfg.epochs
                  else f"{self.steps} steps ({self.steps / max(self.steps_per_epoch, 1):.2f} epochs)")
        warm = f"{self.warmup_steps} ({cfg.warmup_epochs:g} epochs)" if cfg.warmup_epochs else str(self.warmup_steps)
        lr = (f"{self.lr:.3g} = {cfg.lr:g} x {self.global_batch}/256" if cfg.lr_scaling == "linear"
              else f"{self.lr:.3g}")
        line = (f"schedule: {length}, global batch {self.global_batch}, warm-up {warm}, "
                f"peak lr {lr}, {self.kind} decay")
        if self.encoder_hold or self.encoder_scale != 1.0:
            line += (f"; encoder lr x{self.encoder_scale:g}"
                     + (f", held at 0 for the first {self.encoder_hold} steps" if self.encoder_hold else ""))
        return line


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
    return Schedule(steps, min(warmup, steps), lr, cfg.schedule, global_batch, steps_per_epoch,
                    cfg.encoder_lr_scale, min(cfg.head_warmup_steps, steps))


def fixed_schedule(cfg: TrainConfig) -> Schedule:
    """The schedule of a step-counted run without lr scaling (no data stream needed)."""
    return Schedule(cfg.steps, cfg.warmup_steps, cfg.lr, cfg.schedule, 0, 0, cfg.encoder_lr_scale,
                    min(cfg.head_warmup_steps, cfg.steps))


def encoder_parameter_ids(model: torch.nn.Module) -> set[int]:
    """ids of the student encoder's parameters (``model.student.base_model``; the input embeddings
    that an MLM decoder is tied to included); empty when ``model`` has no student."""
    student = getattr(model, "student", None)
    base = getattr(student, "base_model", None) if student is not None else None
    return {id(p) for p in base.parameters()} if base is not None else set()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (frozen teacher-side heads are left out).

    ``cfg.weight_decay_on``: "matrices" decays only parameters of 2 or more dimensions that are
    not normalisation weights; "all" decays every parameter, as the authors' code does.
    Parameter groups carry ``part``: "encoder" (the student encoder, pretrained) or "new" (the
    MLM head, the sentence / structure heads, the word map), so that the schedule can give the
    encoder its own lr (``train.encoder_lr_scale``, ``train.head_warmup_steps``). Empty groups
    are left out.
    """
    encoder = encoder_parameter_ids(model)
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = cfg.weight_decay_on == "matrices" and (p.ndim < 2 or any(k in name for k in _NO_DECAY))
        buckets.setdefault(("encoder" if id(p) in encoder else "new", exempt), []).append(p)
    groups = [{"params": params, "weight_decay": 0.0 if exempt else cfg.weight_decay, "part": part}
              for (part, exempt), params in sorted(buckets.items())]
    return torch.optim.AdamW(groups, lr=cfg.lr if lr is None else lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, schedule: Schedule, part: str = "new") -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) for a parameter group's
    ``part``: the encoder's is 0 while it is held, then scaled by ``encoder_scale``."""
    if part == "encoder":
        if step < schedule.encoder_hold:
            return 0.0
        return schedule.encoder_scale * _shape(step, schedule)
    return _shape(step, schedule)


def _shape(step: int, schedule: Schedule) -> float:
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
    """One lr multiplier per parameter group, by its ``part`` (see :func:`lr_factor`)."""
    parts = [group.get("part", "new") for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, part=part: lr_factor(step, schedule, part) for part in parts])
