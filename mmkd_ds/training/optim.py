"""Optimiser and learning-rate schedule (warm-up, then linear/cosine decay or constant).

The schedule's numbers are resolved once the data stream is known (:func:`resolve_schedule`):
a run may be given in epochs and its learning rate scaled with the global batch, as the authors'
``main_mmkd.py`` does (``lr = base * batch / 256``, warm-up and cosine decay in epochs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from mmkd_ds.config.schema import TrainConfig
from mmkd_ds.training.checkpoint import ResumeError

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
    # Set when a resume changed the run's length (see resume_schedule): from step replan_from on,
    # the decay runs from replan_factor (the multiplier reached there) to 0 at `steps`.
    replan_from: int | None = None
    replan_factor: float = 1.0

    def record(self) -> dict:
        """What a checkpoint stores (JSON), so that a resume continues this very schedule."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "Schedule":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

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
    if schedule.replan_from is not None and step >= schedule.replan_from:
        start, scale = schedule.replan_from, schedule.replan_factor
    elif schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    else:
        start, scale = schedule.warmup_steps, 1.0
    if schedule.kind == "constant":
        return scale
    progress = min(1.0, (step - start) / max(1, schedule.steps - start))
    if schedule.kind == "linear":
        return scale * max(0.0, 1.0 - progress)
    return scale * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """One lr multiplier per parameter group, by its ``part`` (see :func:`lr_factor`)."""
    parts = [group.get("part", "new") for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, part=part: lr_factor(step, schedule, part) for part in parts])


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: Schedule) -> None:
    """Point a scheduler restored from a checkpoint at ``schedule``, from where it stands.

    A restored LambdaLR keeps the multipliers it was built with and the checkpoint's base lrs
    (so a changed ``train.lr`` would be ignored); this sets both from ``schedule`` and each
    parameter group's lr at the scheduler's position, which is what the next step uses.
    """
    groups = scheduler.optimizer.param_groups
    parts = [group.get("part", "new") for group in groups]
    position = scheduler.last_epoch  # optimizer steps taken (fp16 overflow steps excluded)
    scheduler.lr_lambdas = [lambda step, part=part: lr_factor(step, schedule, part) for part in parts]
    scheduler.base_lrs = [schedule.lr] * len(groups)
    for group, part in zip(groups, parts):
        group["initial_lr"] = schedule.lr
        group["lr"] = schedule.lr * lr_factor(position, schedule, part)
    scheduler._last_lr = [group["lr"] for group in groups]


# The parts of a schedule that a resume may not change silently, and the settings behind them.
_SHAPE_FIELDS = {"lr": "peak lr (train.lr)", "warmup_steps": "warm-up steps (train.warmup_steps / warmup_epochs)",
                 "kind": "train.schedule", "encoder_scale": "train.encoder_lr_scale",
                 "encoder_hold": "train.head_warmup_steps"}


def resume_schedule(saved: dict | None, planned: Schedule, position: int, allow_changes: bool) -> tuple[Schedule, str]:
    """``(schedule, note)``: the schedule a resumed run follows, and one line saying what a
    resume changed about it ("" when nothing did).

    Args:
        saved: the checkpoint's schedule record (:meth:`Schedule.record`); None for checkpoints
            written before it was recorded (the planned schedule is then used as it is).
        planned: the schedule resolved from the run's current settings.
        position: optimizer steps the checkpoint's scheduler had taken.
        allow_changes: ``train.allow_resume_changes``.

    A longer or shorter run (``train.steps`` / ``train.epochs``) continues the learning rate from
    where it was: the decay is re-planned from ``position`` and the lr reached there to 0 at the
    new end (warm-up, if still under way, and a constant schedule are simply continued). A decay
    that already reached 0 cannot be extended that way (it would train at lr 0), and a changed
    peak lr, warm-up, decay kind or encoder setting would jump the lr: both raise
    :class:`ResumeError` saying how to proceed, unless ``allow_changes``, which applies the planned
    schedule as it is from ``position`` on.
    """
    if saved is None:
        return planned, (f"schedule: the checkpoint records none (written by an older mmkd-ds): the configured "
                         f"schedule applies from step {position} (lr {planned.lr * _shape(position, planned):.3g})")
    old = replace(Schedule.from_record(saved), global_batch=planned.global_batch,
                  steps_per_epoch=planned.steps_per_epoch)
    lr_was, lr_planned = old.lr * _shape(position, old), planned.lr * _shape(position, planned)
    changed = [name for name in _SHAPE_FIELDS if getattr(old, name) != getattr(planned, name)]
    if changed:
        name = changed[0]
        what = f"{_SHAPE_FIELDS[name]} was {getattr(old, name)!r} at the checkpoint and is {getattr(planned, name)!r} now"
        if not allow_changes:
            raise ResumeError(
                f"cannot resume: {what}, which would move the lr at step {position} from {lr_was:.3g} to "
                f"{lr_planned:.3g}; keep the setting, or set train.allow_resume_changes=true to apply the new schedule")
        return planned, f"schedule: {what}: the new schedule applies from step {position}, lr {lr_was:.3g} -> {lr_planned:.3g}"
    if old.steps == planned.steps:
        return old, ""  # the checkpoint's own schedule, a re-planned decay included
    length = f"run length {old.steps} -> {planned.steps} steps (train.steps / train.epochs)"
    if position >= planned.steps:
        return replace(old, steps=planned.steps), f"schedule: {length}: step {position} is already past the end"
    if old.kind == "constant" or position < old.warmup_steps:
        return replace(old, steps=planned.steps), (
            f"schedule: {length}: lr {lr_was:.3g} at step {position} continues"
            + ("" if old.kind == "constant" else f"; the {old.kind} decay after the warm-up now ends at step {planned.steps}"))
    factor = _shape(position, old)
    if factor <= 0.0:
        if not allow_changes:
            raise ResumeError(
                f"cannot resume to step {planned.steps}: the checkpoint's {old.kind} decay reached lr 0 at step "
                f"{old.steps}, so a continued schedule would train at lr 0; start a new run from the exported student "
                f"(student.name=<train.out_dir>/student, another train.out_dir), or set "
                f"train.allow_resume_changes=true to train on with the lr of a {planned.steps}-step schedule "
                f"({lr_planned:.3g} at step {position})")
        return planned, (f"schedule: {length}: the {old.kind} decay had reached 0; the lr of a {planned.steps}-step "
                         f"schedule applies from step {position} ({lr_planned:.3g})")
    return replace(old, steps=planned.steps, replan_from=position, replan_factor=factor), (
        f"schedule: {length}: the {old.kind} decay re-planned from step {position} (lr {lr_was:.3g}) "
        f"to 0 at step {planned.steps}")
