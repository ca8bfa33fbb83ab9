"""Resuming on another number of ranks or another ZeRO stage (elastic resume).

Three parts, used by ``train()`` when the checkpoint's world size or ZeRO stage differs from
the run's:

1. :func:`resume_batch` keeps the global batch (``stream.batch_size * grad_accum * ranks``): it
   picks the ``grad_accum`` that gives the checkpoint's global batch on the new ranks, or
   refuses in one line naming the choices; ``train.allow_resume_changes`` takes the new batch.
2. :func:`convert_to_universal` turns the DeepSpeed checkpoint into DeepSpeed's *universal*
   format with its own ``ds_to_universal`` (once, on rank 0, into ``<tag>_universal`` next to
   the tag), and the engine loads it with ``"checkpoint": {"load_universal": true}``.
3. :func:`restore_module_extras` and :func:`restore_group_settings` put back what DeepSpeed
   0.19's universal loading leaves out (see below).

What DeepSpeed 0.19.8's universal checkpoints do not cover, and what is done about it (all in
the universal folder's own format, so DeepSpeed's loaders read it):

* A folder converted from ZeRO-1/2 loads only into ZeRO-1/2, one from ZeRO-3 only into ZeRO-3:
  the engine looks for ``mp_rank_00_model_states.pt`` (stages 1-2) or
  ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (stage 3), the ZeRO-3 loader reads the Adam
  step from ``optimizer_state_dict`` (absent after a ZeRO-1/2 conversion), and the ZeRO-1/2
  loader wants ``ds_version``, ``{"param": tensor}`` files and a ``step.pt`` per parameter
  (absent after a ZeRO-3 conversion). :func:`complete_universal` adds each of these.
* Buffers (BatchNorm statistics) and frozen parameters (the teacher-side heads, which an EMA
  head updates) are not loaded at all; a ZeRO-3 conversion does not even write them.
  :func:`complete_universal` writes them as ``zero/<name>/fp32.pt`` like the ZeRO-1/2
  conversion does, and :func:`restore_module_extras` copies them into the module.
* The ZeRO-3 loader gives every optimizer parameter group the first group's settings (weight
  decay 0.01 on biases and LayerNorm weights); :func:`restore_group_settings` puts back the
  groups' own settings, as the run built them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from mmkd_ds.training.checkpoint import ResumeError

UNIVERSAL_SUFFIX = "_universal"
_DONE = "mmkd_converted"  # written last: a folder without it is an interrupted conversion
_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


@dataclass(frozen=True)
class BatchDecision:
    """How a resumed run's batch relates to the checkpoint's."""

    grad_accum: int  # what the run uses
    global_batch: int  # pairs per optimizer step now
    saved_global_batch: int
    note: str  # "" when nothing changed, else "grad_accum 1 -> 2" or "global batch 8 -> 4"


def resume_batch(saved_world: int, saved_batch: int, saved_accum: int, world: int, batch: int, accum: int,
                 allow_changes: bool) -> BatchDecision:
    """The grad_accum of a run resumed on ``world`` ranks with micro-batch ``batch``.

    The global batch ``saved_batch * saved_accum * saved_world`` is kept: with the configured
    ``accum`` when that already gives it; else, when the run left train.grad_accum as the
    checkpoint had it, with the grad_accum that does. When none does, :class:`ResumeError`
    names the choices; ``allow_changes`` instead takes the new global batch
    ``batch * accum * world`` (the lr schedule's position is then kept in samples).
    """
    saved_global = saved_batch * saved_accum * saved_world
    if batch * accum * world == saved_global:
        note = "" if accum == saved_accum else f"grad_accum {saved_accum} -> {accum} (the global batch kept)"
        return BatchDecision(accum, saved_global, saved_global, note)
    if accum == saved_accum and saved_global % (batch * world) == 0:
        new = saved_global // (batch * world)
        return BatchDecision(new, saved_global, saved_global, f"grad_accum {saved_accum} -> {new} (the global batch kept)")
    new_global = batch * accum * world
    if allow_changes:
        return BatchDecision(accum, new_global, saved_global,
                             f"global batch {saved_global} -> {new_global} (train.allow_resume_changes)")
    worlds = [w for w in range(1, saved_global + 1) if saved_global % (batch * w) == 0]
    choices = ", ".join(f"{w} (grad_accum {saved_global // (batch * w)})" for w in worlds[:8]) or "none"
    raise ResumeError(
        f"cannot resume on {world} ranks with stream.batch_size {batch} and train.grad_accum {accum}: the "
        f"checkpoint's global batch is {saved_global} ({saved_batch} x grad_accum {saved_accum} x {saved_world} ranks); "
        f"ranks that keep it with this batch size: {choices}; or set stream.batch_size x train.grad_accum x ranks "
        f"= {saved_global}, or train.allow_resume_changes=true to train on with a global batch of {new_global}")


def schedule_step_in_samples(lr_step: int, saved_global: int, global_batch: int) -> int:
    """The optimizer step of the new global batch at which the same number of samples was seen:
    with another global batch the lr schedule's position is kept in samples, not steps."""
    return round(lr_step * saved_global / global_batch)


# -- DeepSpeed's universal checkpoint ----------------------------------------------------------


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"


def convert_to_universal(ckpt_dir: Path, tag: str) -> tuple[Path, bool]:
    """``(folder, converted_now)``: DeepSpeed's universal form of checkpoint ``tag``.

    Runs ``deepspeed.checkpoint.ds_to_universal`` (in-process, one worker) into
    ``<tag>_universal.partial``, completes it (:func:`complete_universal`) and renames it, so a
    conversion cut short is redone, never loaded; a finished one is reused. Call on one rank;
    its output is kept and shown only when it fails.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_dir(ckpt_dir, tag)
    if (out / _DONE).is_file():
        return out, False
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(ckpt_dir / tag), output_folder=str(partial), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
        complete_universal(partial)
    except Exception as exc:
        raise RuntimeError(f"{ckpt_dir / tag}: conversion to DeepSpeed's universal checkpoint failed: {exc}\n"
                           f"{chatter.getvalue()[-3000:]}") from exc
    (partial / _DONE).write_text(tag)
    partial.rename(out)
    (ckpt_dir / "latest_universal").write_text(out.name)  # ds_to_universal named the partial folder
    return out, True


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def complete_universal(folder: Path) -> None:
    """Make a ``ds_to_universal`` output loadable by every ZeRO stage and complete its module
    state (see the module docstring for what DeepSpeed 0.19.8 leaves out)."""
    zero = folder / "zero"
    model_files = sorted(folder.glob("*model_states.pt"))
    if not model_files:
        raise RuntimeError(f"{folder}: no model_states file")
    # Both stage families' file names (the content is read for the step count and lr scheduler).
    for name in _MODEL_FILES:
        if not (folder / name).exists():
            try:
                os.link(model_files[0], folder / name)
            except OSError:
                shutil.copy2(model_files[0], folder / name)
    first = _load(model_files[0])
    optim_path = zero / "optimizer_state.pt"
    optim = _load(optim_path)
    optim.setdefault("ds_version", first.get("ds_version"))
    trainable = [p.name for p in zero.iterdir() if (p / "exp_avg.pt").is_file()]
    if "optimizer_state_dict" in optim:  # a ZeRO-3 source: one step for all
        step = optim["optimizer_state_dict"]["state"][0]["step"]
    else:
        step = _load(zero / trainable[0] / "step.pt")
        optim["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    torch.save(optim, optim_path)
    for name in trainable:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = _load(zero / name / f"{key}.pt")
            if not isinstance(value, dict):  # ZeRO-3 conversions store bare tensors
                torch.save({"param": value}, zero / name / f"{key}.pt")
        if not (zero / name / "step.pt").is_file():
            torch.save(step, zero / name / "step.pt")
    # Buffers and frozen parameters, where the conversion did not write them (ZeRO-3 sources).
    for name, value in module_extras(model_files).items():
        if not (zero / name / "fp32.pt").is_file():
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({"param": value}, zero / name / "fp32.pt")


def module_extras(model_files: list[Path]) -> dict[str, torch.Tensor]:
    """Buffers and frozen parameters of a checkpoint, whole, from its model_states files.

    ZeRO-1/2: the ``module`` state dict holds them. ZeRO-3: buffers are whole in ``module``;
    each rank's file holds its partition of every frozen parameter (``frozen_param_fragments``),
    joined here as ``zero_to_fp32`` does.
    """
    states = [_load(f) for f in model_files]
    first = states[0]
    module = first.get("module") or {}
    out = {name: module[name].float() for name in first.get("buffer_names", []) if name in module}
    shapes = first.get("frozen_param_shapes") or {}
    if shapes and all("frozen_param_fragments" in s and s["frozen_param_fragments"] for s in states):
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            parts = [s["frozen_param_fragments"][name].flatten() for s in states]
            out[name] = torch.cat(parts)[:numel].view(shape).float()
    else:
        trainable = set().union(*[set(group) for group in first.get("param_shapes") or []])
        for name, value in module.items():
            if name not in out and name not in trainable and value.numel():
                out[name] = value.float()
    return out


def restore_module_extras(engine, folder: Path) -> int:
    """Copy the buffers and frozen parameters of the universal ``folder`` into the engine's
    module (DeepSpeed's universal loading restores only what the optimizer holds); returns how
    many tensors were set. Every rank calls it (ZeRO-3 gathers the frozen parameters)."""
    module = engine.module
    zero = folder / "zero"
    count = 0
    for name, buf in module.named_buffers():
        path = zero / name / "fp32.pt"
        if path.is_file():
            buf.copy_(_load(path)["param"].to(buf.dtype).view_as(buf))
            count += 1
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad and (zero / n / "fp32.pt").is_file()]
    if frozen:
        partitioned = any(hasattr(p, "ds_id") for _, p in frozen)
        gather = (__import__("deepspeed").zero.GatheredParameters([p for _, p in frozen], modifier_rank=0)
                  if partitioned else contextlib.nullcontext())
        with gather, torch.no_grad():
            for name, p in frozen:
                p.copy_(_load(zero / name / "fp32.pt")["param"].to(p.dtype).view_as(p))
                count += 1
    return count


def group_settings(engine) -> list[dict]:
    """Every optimizer parameter group's settings (not its parameters), as the run built them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]


def restore_group_settings(engine, settings: list[dict]) -> None:
    """Put back the groups' own settings after a universal load (the lr follows from the
    schedule, set afterwards by ``apply_schedule``)."""
    for group, saved in zip(engine.optimizer.param_groups, settings):
        group.update(saved)


# -- the decision, before anything is built ----------------------------------------------------


@dataclass
class ElasticResume:
    """What a resume on another layout changes: made before the loader and engine are built."""

    cfg: object  # the run config, train.grad_accum as decided
    batch: BatchDecision
    saved_world: int
    world: int
    saved_stage: str
    stage: str
    tag: str
    lr_step: int  # the scheduler position to resume at (in samples when the global batch changed)
    step: int  # the loop's step to resume at (likewise)
    universal: Path | None = None  # set by convert()

    @property
    def uses_universal(self) -> bool:
        return self.saved_world != self.world or self.saved_stage != self.stage

    def convert(self, ckpt_dir: Path, rank: int) -> Path:
        """Rank 0 converts (unless done before), every rank waits for it; the folder's path."""
        converted = False
        if rank == 0:
            self.universal, converted = convert_to_universal(ckpt_dir, self.tag)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.universal = universal_dir(ckpt_dir, self.tag)
        self.converted_now = converted
        return self.universal

    def line(self) -> str:
        parts = [f"world size {self.saved_world} -> {self.world}"]
        if self.batch.note:
            parts.append(self.batch.note)
        parts.append(f"ZeRO stage {self.saved_stage} -> {self.stage}")
        if self.universal is not None:
            parts.append(f"{'converted to' if getattr(self, 'converted_now', False) else 'loaded'} "
                         f"DeepSpeed's universal checkpoint at {self.universal}")
        if self.step != self.saved_step:
            seen, now = self.saved_step * self.batch.saved_global_batch, self.step * self.batch.global_batch
            parts.append(f"step {self.saved_step} -> {self.step} ({seen} samples seen; the schedule continues "
                         f"from sample {now}, the nearest step of the new batch)")
        return "resume on another layout: " + ", ".join(parts)


def zero_stage_of_config(ds_config: dict) -> str:
    return str(int(ds_config.get("zero_optimization", {}).get("stage", 0)))


def plan_elastic_resume(cfg, ckpt_dir: Path, world: int, ds_config: dict) -> ElasticResume | None:
    """None when the latest checkpoint was written on this layout (an ordinary resume) or there
    is none; else how to resume it here. Raises :class:`ResumeError` (one line) when the global
    batch cannot be kept and train.allow_resume_changes is not set."""
    from dataclasses import replace

    from mmkd_ds.training.checkpoint import latest_tag, read_run_state, zero_stage_from_files

    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    saved = read_run_state(ckpt_dir)
    saved_world = int(saved.get("world_size", world))
    stream = saved.get("stream", {})
    settings = saved.get("settings") or saved.get("config") or {}
    saved_accum = int(stream.get("grad_accum", settings.get("train.grad_accum", cfg.train.grad_accum)))
    saved_batch = int(stream.get("batch_size", cfg.stream.batch_size))
    stage = zero_stage_of_config(ds_config)
    if "zero_stage" in saved:
        saved_stage = str(saved["zero_stage"])
    else:  # a checkpoint that does not record it: stage 3 or not, from its file names
        family = zero_stage_from_files(ckpt_dir / tag)
        saved_stage = stage if (family == "3") == (stage == "3") else family
    same_layout = (saved_world, saved_batch) == (world, cfg.stream.batch_size) and saved_stage == stage
    if same_layout and saved_accum == cfg.train.grad_accum:
        return None
    decision = resume_batch(saved_world, saved_batch, saved_accum, world, cfg.stream.batch_size,
                            cfg.train.grad_accum, cfg.train.allow_resume_changes)
    new_cfg = replace(cfg, train=replace(cfg.train, grad_accum=decision.grad_accum))
    step = int(saved["step"])
    lr_step = int(saved.get("lr_step", step))
    if decision.global_batch != decision.saved_global_batch:
        step = schedule_step_in_samples(step, decision.saved_global_batch, decision.global_batch)
        lr_step = schedule_step_in_samples(lr_step, decision.saved_global_batch, decision.global_batch)
    plan = ElasticResume(new_cfg, decision, saved_world, world, saved_stage, stage, tag, lr_step, step)
    plan.saved_step = int(saved["step"])
    return plan
