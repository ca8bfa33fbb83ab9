"""The distillation loop: build the pieces, then train step by step.

Reads top to bottom: distributed set-up, student and heads, data, DeepSpeed engine, resume,
then the loop. One optimizer step is ``train.grad_accum`` micro-batches; each micro-batch is
one student forward (see models/mmkd.py) and, in online mode, one teacher forward.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mmkd_ds.config.schema import RunConfig
from mmkd_ds.distributed import init_distributed
from mmkd_ds.models.mmkd import OBJECTIVES, MMKDModel
from mmkd_ds.training.batch import MMKDCollator, batch_to_device
from mmkd_ds.training.checkpoint import (
    check_resume,
    config_fingerprint,
    config_hash,
    latest_tag,
    load_checkpoint,
    prune_checkpoints,
    read_run_state,
    run_settings,
    save_checkpoint,
    settings_changes,
)
from mmkd_ds.training.data import build_train_loader, teacher_hidden_size
from mmkd_ds.training.ds_config import build_ds_config
from mmkd_ds.training.elastic import (
    ElasticResume,
    group_settings,
    plan_elastic_resume,
    restore_group_settings,
    restore_module_extras,
)
from mmkd_ds.training.metrics import MetricsLogger, memory_scalars
from mmkd_ds.training.optim import (
    Schedule,
    apply_schedule,
    build_optimizer,
    build_scheduler,
    fixed_schedule,
    resolve_schedule,
    resume_schedule,
)
from mmkd_ds.training.preemption import PreemptionFlag
from mmkd_ds.training.sample_log import SampleKeyLog

log = logging.getLogger("mmkd_ds.train")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps_done: int
    seconds: float
    samples: int
    skipped: int
    preempted: bool
    last_losses: dict
    checkpoint: str | None
    export_dir: Path | None

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        losses = " ".join(f"{k} {v:.4f}" for k, v in self.last_losses.items())
        end = "stopped early, checkpoint saved" if self.preempted else "done"
        export = f"; student exported to {self.export_dir}" if self.export_dir else ""
        return (f"distill: {end} at step {self.steps_done} in {self.seconds:.1f} s, {rate:.1f} samples/s, "
                f"{self.skipped} non-finite steps skipped; last losses: {losses}; checkpoint {self.checkpoint}{export}")


# -- building the pieces ---------------------------------------------------------------------


def build_student(cfg: RunConfig):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mmkd_ds.mlm_head import load_masked_lm
    from mmkd_ds.model_source import check_model_source, explained_load

    hf_logging.disable_progress_bar()
    kwargs = {} if Path(cfg.student.name).exists() else {"revision": cfg.student.revision}
    tok_key, tok_name = ("student.tokenizer", cfg.student.tokenizer) if cfg.student.tokenizer else ("student.name", cfg.student.name)
    tok_path = check_model_source(tok_key, tok_name)
    path = check_model_source("student.name", cfg.student.name)
    with explained_load(tok_key, tok_name):
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **kwargs)
    # A masked-LM loaded from an encoder or pre-training checkpoint (bert-base-multilingual-cased,
    # or an export of this project, which carries a pooler) leaves the pooler and the NSP head
    # unused: transformers prints a table for that on every rank. Keep it quiet and warn only
    # about keys that matter (a missing weight is newly initialised).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with explained_load("student.name", cfg.student.name):
            student, info = load_masked_lm(path, **kwargs)  # an export's head from mlm_head.safetensors
    finally:
        hf_logging.set_verbosity(verbosity)
    odd = sorted({*info.get("missing_keys", ()),
                  *(k for k in info.get("unexpected_keys", ()) if "pooler." not in k and "seq_relationship" not in k)})
    if odd and os.environ.get("RANK", "0") == "0":
        shown = ", ".join(odd[:6]) + (f" and {len(odd) - 6} more" if len(odd) > 6 else "")
        log.warning("student.name=%s: weights missing (newly initialised) or not used: %s", cfg.student.name, shown)
    return student, tokenizer


def build_model(cfg: RunConfig, student: nn.Module, teacher_hidden: int) -> MMKDModel:
    """The trained module (student + heads), in training mode.

    ``from_pretrained`` returns the student in eval mode and neither DeepSpeed nor the loop
    switches it back: without the ``train()`` here the student's dropout would stay off.
    """
    model = MMKDModel(student, teacher_hidden, cfg.loss, cfg.student.length_buckets)
    model.train()
    return model


def build_engine(cfg: RunConfig, model: nn.Module, ds_config_path: str | None, world_size: int, device_type: str,
                 schedule: Schedule | None = None, load_universal: bool = False):
    """``(engine, ds_config, notes)``: the DeepSpeed engine with ZeRO from the JSON and the
    hyper-parameters (optimizer, schedule, batch, precision) from the run config; ``notes`` say
    where the YAML overrode the JSON. ``schedule``: the resolved run length and peak lr
    (default: ``train.steps``, ``train.warmup_steps`` and ``train.lr`` as they are).
    ``load_universal``: the engine will load a DeepSpeed universal checkpoint (elastic.py)."""
    import deepspeed

    schedule = schedule or fixed_schedule(cfg.train)
    ds_config, notes = build_ds_config(ds_config_path, cfg, world_size, device_type)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    optimizer = build_optimizer(model, cfg.train, schedule.lr)
    scheduler = build_scheduler(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config, notes


def build_online_teacher(cfg: RunConfig, device: torch.device):
    from mmkd_ds.teacher import load_teacher

    return load_teacher(cfg.teacher, device)


def fill_online_teacher(batch: dict, teacher, cfg: RunConfig) -> None:
    """Online mode: the frozen teacher's sentence and word vectors, computed in the step."""
    from mmkd_ds.teacher import teacher_forward

    n_words = batch.get("n_words") or int(batch["teacher_word_ids"].max()) + 1
    cls, words = teacher_forward(
        teacher.model, batch["teacher_input_ids"], batch["teacher_attention_mask"], batch["teacher_word_ids"],
        n_words, cfg.teacher.layer, cfg.teacher.pooling, cfg.teacher.sentence,
    )
    batch["teacher_cls"], batch["teacher_words"] = cls, words


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def group_lrs(engine) -> dict[str, float]:
    """``train/lr`` (the new parameters': heads, MLM head) and, when it differs,
    ``train/lr_encoder`` (the student encoder's), from the optimizer's parameter groups."""
    lrs = engine.get_lr()
    parts = [g.get("part", "new") for g in engine.optimizer.param_groups]
    by_part = {part: lr for part, lr in zip(parts, lrs)} if len(parts) == len(lrs) else {"new": lrs[0]}
    out = {"train/lr": by_part.get("new", lrs[0])}
    if "encoder" in by_part and by_part["encoder"] != out["train/lr"]:
        out["train/lr_encoder"] = by_part["encoder"]
    return out


def all_finite(value: torch.Tensor) -> bool:
    """True on every rank only if the loss is finite on every rank (they must skip together)."""
    flag = torch.isfinite(value.detach()).float().reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def global_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def run_heldout_eval(engine, tokenizer, pairs, device, step: int, metrics: MetricsLogger, is_main: bool):
    """Retrieval accuracy on held-out pairs with the student's [CLS] and with mean pooling (all
    ranks run it: ZeRO-3 gathers in forward). Scalars ``eval/retrieval_*`` ([CLS]) and
    ``eval/retrieval_mean_*``."""
    from mmkd_ds.evaluation.retrieval import evaluate_retrieval

    results, scalars = {}, {}
    for pooling, prefix in (("cls", "eval/retrieval"), ("mean", "eval/retrieval_mean")):
        result = results[pooling] = evaluate_retrieval(engine.module.student, tokenizer, pairs, pooling=pooling,
                                                       device=device)
        scalars[f"{prefix}_avg"] = result.average
        if result.low_resource_average is not None:
            scalars[f"{prefix}_low_resource_avg"] = result.low_resource_average
        for lang, r in result.per_language.items():
            scalars[f"{prefix}_{lang}"] = (r["xx2en"] + r["en2xx"]) / 2
    metrics.write(step, scalars, kind="eval")
    if is_main:
        tqdm.write(f"step {step}: held-out {results['cls'].summary()}")
        tqdm.write(f"step {step}: held-out {results['mean'].summary()}")
    return results["cls"]


# -- the loop --------------------------------------------------------------------------------


def train(cfg: RunConfig, ds_config_path: str | None, resume: bool = False) -> TrainResult:
    place, device = init_distributed()
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.train.seed)  # same head initialisation on every rank
    # A resume on another world size or ZeRO stage is decided before anything is built: it may
    # set grad_accum (to keep the global batch) and loads through DeepSpeed's universal format.
    elastic: ElasticResume | None = None
    if resume:
        layout, _ = build_ds_config(ds_config_path, cfg, place.world_size, device.type)
        elastic = plan_elastic_resume(cfg, ckpt_dir, place.world_size, layout)
        if elastic is not None:
            cfg = elastic.cfg

    # Student, heads, and the teacher side.
    loading_started = time.perf_counter()
    if place.is_main:
        tqdm.write(f"loading the student {cfg.student.name}")
    student, tokenizer = build_student(cfg)
    if place.is_main:
        tqdm.write(f"student loaded in {time.perf_counter() - loading_started:.1f} s")
    online = cfg.train.teacher_mode == "online"
    teacher = build_online_teacher(cfg, device) if online else None
    model = build_model(cfg, student, teacher_hidden_size(cfg))

    # Data: shards (or the corpus), tokenised for the student in the loader workers.
    collator = MMKDCollator(
        tokenizer, cfg.loss, cfg.student.max_tokens, cfg.stream.seed,
        teacher_tokenizer=teacher.tokenizer if teacher else None, teacher_max_tokens=cfg.teacher.max_tokens,
    )
    loader = build_train_loader(cfg, place, collator)
    heldout = []
    if cfg.train.eval_every and cfg.data.heldout:
        from mmkd_ds.data.corpus import build_heldout

        heldout = build_heldout(cfg.data).pairs

    # The run's length and peak lr (epochs and lr scaling need the stream's batch count).
    schedule = resolve_schedule(cfg.train, loader.batches_per_epoch, cfg.stream.batch_size, place.world_size)
    if place.is_main:
        tqdm.write(schedule.line(cfg.train))

    # The engine: ZeRO from the JSON, hyper-parameters from the run config.
    engine, ds_config, notes = build_engine(cfg, model, ds_config_path, place.world_size, device.type, schedule,
                                            load_universal=bool(elastic and elastic.uses_universal))
    if teacher is not None and ds_config["bf16"]["enabled"]:
        teacher.model.to(torch.bfloat16)
    metrics = MetricsLogger(engine, out_dir, place.is_main)
    if place.is_main:
        for note in notes:
            log.warning("DeepSpeed config: %s", note)

    # Resume: engine state, RNG, data position; refuse silent changes of what is computed.
    step, skipped_total = 0, 0
    sample_log = SampleKeyLog(out_dir, place.rank, cfg.train.log_sample_keys)
    if resume and latest_tag(ckpt_dir):
        saved = read_run_state(ckpt_dir)
        check_resume(saved, place.world_size, loader.state_dict(), cfg.train.allow_resume_changes)
        # Refused here, before anything is loaded, if the lr would jump (see resume_schedule).
        lr_step = elastic.lr_step if elastic else int(saved.get("lr_step", saved["step"]))
        schedule, schedule_note = resume_schedule(saved.get("schedule"), schedule, lr_step,
                                                  cfg.train.allow_resume_changes)
        universal = elastic.convert(ckpt_dir, place.rank) if elastic and elastic.uses_universal else None
        groups = group_settings(engine)  # as built: a universal load overwrites them
        state = load_checkpoint(engine, ckpt_dir, place.rank, universal, cfg.train.seed)
        if universal is not None:  # what DeepSpeed's universal loading leaves out (elastic.py)
            restore_group_settings(engine, groups)
            restore_module_extras(engine, universal)
        engine.lr_scheduler.last_epoch = lr_step  # differs from the checkpoint's with a new global batch
        apply_schedule(engine.lr_scheduler, schedule)
        stream_note = loader.load_state_dict(state["stream"], allow_changes=True)  # checked above
        step, skipped_total = int(state["step"]), int(state.get("skipped", 0))
        dropped = metrics.rewind(step)  # what the interrupted run logged after its last checkpoint
        if sample_log.enabled:
            if place.is_main:
                sample_log.rewind(step)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # rewound before any rank appends
        if elastic:
            step = elastic.step  # in samples, when the global batch changed
        if place.is_main:
            tqdm.write(f"resumed from {ckpt_dir / latest_tag(ckpt_dir)} at step {step}"
                       + (f"; dropped {dropped} metrics.jsonl records of later steps" if dropped else ""))
            if elastic:
                tqdm.write(elastic.line())
            tqdm.write(settings_changes(state, cfg))
            for note in (schedule_note, stream_note):
                if note:
                    tqdm.write(note)
    elif resume and place.is_main:
        tqdm.write(f"--resume: no checkpoint in {ckpt_dir}, starting fresh")

    saved_once = False

    # Recorded in every checkpoint, so that an export of any of them (mmkd-export) can name it.
    from mmkd_ds.training.model_card import training_command

    command = training_command()

    def checkpoint() -> str:
        nonlocal saved_once
        first = place.is_main and not saved_once  # the first save may take long: say so
        if first:
            tqdm.write(f"step {step}: saving the first checkpoint to {ckpt_dir}")
        save_started = time.perf_counter()
        client = {"step": step, "stream": loader.state_dict(), "config": config_fingerprint(cfg),
                  "config_hash": config_hash(cfg), "settings": run_settings(cfg), "schedule": schedule.record(),
                  "lr_step": engine.lr_scheduler.last_epoch, "world_size": place.world_size,
                  "zero_stage": engine.zero_optimization_stage(), "skipped": skipped_total, "command": command}
        tag = save_checkpoint(engine, ckpt_dir, step, client, place.rank)
        if first:
            tqdm.write(f"step {step}: checkpoint {tag} saved in {time.perf_counter() - save_started:.1f} s")
        saved_once = True
        if place.is_main:
            prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        return tag

    preemption = PreemptionFlag()
    if heldout and step == 0:
        if place.is_main:
            tqdm.write(f"step 0: held-out retrieval on {len(heldout)} pairs before training")
        run_heldout_eval(engine, tokenizer, heldout, device, 0, metrics, place.is_main)

    batches = iter(loader)
    bar = tqdm(total=schedule.steps, initial=step, unit="step", desc="distill", disable=not place.is_main)
    started = time.perf_counter()
    samples_done, bad_in_a_row, preempted, last_tag = 0, 0, False, None
    last_losses: dict[str, float] = {}
    window = {"time": 0.0, "wait": 0.0, "samples": 0, "tokens": 0, "steps": 0}
    pending: list[tuple[int, dict]] = []  # per-step losses, kept on device until the next log
    bn_buffers = batchnorm_buffers(engine.module)

    last_step = min(schedule.steps, cfg.train.stop_at) if cfg.train.stop_at else schedule.steps
    while step < last_step:
        step_start = time.perf_counter()
        wait = 0.0
        sums = {k: torch.zeros((), device=device) for k in (*OBJECTIVES, "total")}
        micro = 0
        while micro < cfg.train.grad_accum:
            t0 = time.perf_counter()
            batch = batch_to_device(next(batches), device)
            wait += time.perf_counter() - t0
            if online:
                fill_online_teacher(batch, teacher, cfg)
            saved_bn = [b.clone() for b in bn_buffers]
            losses = engine(batch)
            if not all_finite(losses["total"]):
                # Skip on every rank; undo the BatchNorm statistics the bad forward updated.
                for b, s in zip(bn_buffers, saved_bn):
                    b.copy_(s)
                bad_in_a_row += 1
                skipped_total += 1
                if place.is_main:
                    tqdm.write(f"step {step}: non-finite loss, micro-batch skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise NonFiniteLossError(
                        f"step {step}: {bad_in_a_row} non-finite losses in a row (train.max_bad_steps); stopping"
                    )
                continue
            bad_in_a_row = 0
            engine.backward(losses["total"])
            engine.step()
            micro += 1
            sample_log.write(step + 1, batch["keys"])
            for k, v in losses.items():
                sums[k] += v.detach().float()
            window["samples"] += len(batch["langs"])
            window["tokens"] += batch["n_tokens"]
        engine.module.after_step()
        step += 1
        bar.update(1)
        window["time"] += time.perf_counter() - step_start
        window["wait"] += wait
        window["steps"] += 1
        pending.append((step, {k: v / cfg.train.grad_accum for k, v in sums.items() if k in losses or k == "total"}))

        if step % cfg.train.log_every == 0 or step == schedule.steps:
            samples, tokens, seconds = global_sum([window["samples"], window["tokens"], window["time"]], device)
            seconds /= place.world_size
            samples_done += int(samples)
            if place.world_size > 1:  # the losses of the global batch: every rank's, averaged
                names = list(pending[0][1])
                flat = torch.stack([torch.stack([values[k] for k in names]) for _, values in pending])
                torch.distributed.all_reduce(flat)
                pending = [(s, dict(zip(names, row / place.world_size))) for (s, _), row in zip(pending, flat)]
            for s, values in pending:  # one host sync per log interval, not per step
                metrics.write(s, {f"loss/{k}": float(v) for k, v in values.items()})
            last_losses = {k: float(v) for k, v in pending[-1][1].items()}
            grad_norm = engine.get_global_grad_norm()
            scalars = {
                **group_lrs(engine),
                "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "train/skipped_steps": skipped_total,
                "throughput/samples_per_s": samples / seconds if seconds else 0.0,
                "throughput/tokens_per_s": tokens / seconds if seconds else 0.0,
                "time/data_wait_fraction": window["wait"] / window["time"] if window["time"] else 0.0,
                **memory_scalars(device),
            }
            metrics.write(step, scalars)
            bar.set_postfix(loss=f"{last_losses['total']:.3f}", sps=f"{scalars['throughput/samples_per_s']:.1f}")
            pending.clear()
            window = {"time": 0.0, "wait": 0.0, "samples": 0, "tokens": 0, "steps": 0}
        if heldout and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            run_heldout_eval(engine, tokenizer, heldout, device, step, metrics, place.is_main)
        if preemption.agreed(device):
            last_tag = checkpoint()
            preempted = True
            if place.is_main:
                tqdm.write(f"step {step}: {preemption.reason}, checkpoint {last_tag} saved")
            break
        if step == cfg.train.stop_at and step < schedule.steps:
            last_tag = checkpoint()
            preempted = True
            if place.is_main:
                tqdm.write(f"step {step}: train.stop_at reached, checkpoint {last_tag} saved; continue with --resume")
            break
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            last_tag = checkpoint()
    bar.close()
    preemption.close()

    if not preempted and last_tag != f"step{step:08d}":
        last_tag = checkpoint()
    export_dir = None
    if cfg.train.export and not preempted:
        torch.distributed.barrier()
        if place.is_main:
            from mmkd_ds.training.export import export_student
            from mmkd_ds.training.model_card import export_finisher

            revision = None if Path(cfg.student.name).exists() else cfg.student.revision
            # Also the sentence-transformers files (pooled as in training) and the model card (README.md).
            finish = export_finisher(ckpt_dir, last_tag, cfg.loss.sentence_pooling, out_dir, command)
            export_dir = export_student(ckpt_dir, last_tag, cfg.student.name, tokenizer, out_dir / "student", revision,
                                        finish=finish)
        torch.distributed.barrier()
    return TrainResult(step, time.perf_counter() - started, samples_done, skipped_total, preempted,
                       last_losses, last_tag, export_dir)
