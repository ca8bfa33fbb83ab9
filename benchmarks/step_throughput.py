#!/usr/bin/env python
"""Training-step throughput on the CPU demo configuration: three ways to take the same step.

Same student (one initialisation, copied), same batch size, same data stream, same optimizer
(the project's build_optimizer / build_scheduler: AdamW with the run's schedule), each step a
real forward + backward + gradient clipping + optimizer step of MMKDModel:

    precomputed  the project's step: the loop's normal mode. Batches from the shard loader
                 (build_train_loader, teacher [CLS] and word vectors read from the shards),
                 one student forward over the stacked rows, no teacher forward.
    online       the same step with train.teacher_mode=online: batches from the corpus loader
                 (teacher tokenisation in the collator), the teacher run in the step by
                 fill_online_teacher, then the same MMKDModel forward.
    reference    a step built like the public reference implementation of MMKD
                 (benchmarks/reference_step.py): the teacher run three times (word, sentence,
                 structure level), the translation encoded twice (sentence heads, structure
                 heads), separate TLM and word-level student forwards, word pooling and
                 InfoNCE in per-sentence / per-word Python loops. Same losses, same heads;
                 same batches as `online` (its own corpus loader).

Every step is timed from asking the loader for the batch (data wait included, as the training
loop counts it) to the end of the optimizer step. The variants are interleaved: after
--warmup untimed steps each, --rounds rounds in which each variant takes --steps timed steps
(the order rotates every round), so that machine noise hits all alike. Reported: per variant
the median step time and samples/s (= batch size / median), and the ratios of the medians
against the issue's targets (precomputed >= 1.5x online; project step >= 3x reference-style),
plus the spread of the per-round ratios.

Start-up check (before any timing): on the first batch of the stream, with dropout off, on
copies of the initial model (once in eval mode, once with the heads' BatchNorm in training mode
as in the timed steps), the reference-style losses must equal the project's losses with the
online teacher (rtol 1e-4); the project's losses from the shards (fp16 teacher vectors) must
equal those within fp16 tolerance (1e-2, as tests/test_model.py); the shard and corpus streams
must give identical student inputs. The script stops (exit 3) if the reference-style step does
not compute the same losses.

Prepares what it needs under --workdir (reused when present): the student made by
`mmkd-init-student --config CONFIG --out WORKDIR/student-init` and the shards made by
`mmkd-precompute --config CONFIG --precompute.out_dir=WORKDIR/shards`.

    python benchmarks/step_throughput.py                        # defaults: 2 threads, batch 32
    python benchmarks/step_throughput.py --rounds 10 --steps 5  # longer, steadier

Output: a table on stdout, progress on stderr, and under --out (default benchmarks/results)
step-throughput-cpu.json and step-throughput-cpu.md (machine, versions, config, check, figures).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime as _dt  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from recording import reusable_shards, write_results  # noqa: E402
from reference_step import ReferenceStyleStep  # noqa: E402

from mmkd_ds.config import load_config  # noqa: E402
from mmkd_ds.config.schema import RunConfig  # noqa: E402
from mmkd_ds.distributed import ProcessPlace  # noqa: E402
from mmkd_ds.models.mmkd import OBJECTIVES, MMKDModel  # noqa: E402
from mmkd_ds.training.batch import MMKDCollator, batch_to_device  # noqa: E402
from mmkd_ds.training.data import build_train_loader, teacher_hidden_size  # noqa: E402
from mmkd_ds.training.loop import (  # noqa: E402
    all_finite,
    batchnorm_buffers,
    build_model,
    build_online_teacher,
    build_student,
    fill_online_teacher,
)
from mmkd_ds.training.optim import build_optimizer, build_scheduler, fixed_schedule  # noqa: E402

VARIANTS = ("precomputed", "online", "reference")
DESCRIPTIONS = {
    "precomputed": "project step, teacher features read from the shards (the loop's normal mode)",
    "online": "project step, teacher run in the step (train.teacher_mode=online)",
    "reference": "reference-style step: teacher x3, translation encoded x2, separate TLM/word forwards, "
                 "Python-loop word pooling + per-sentence InfoNCE",
}
TARGETS = {
    "precomputed_vs_online": {"text": "precomputed step >= 1.5x online step", "slow": "online", "fast": "precomputed",
                              "min": 1.5},
    "project_vs_reference": {"text": "project step (precomputed) >= 3x reference-style step", "slow": "reference",
                             "fast": "precomputed", "min": 3.0},
}
INFO_RATIOS = {
    "online_vs_reference": {"text": "online step vs reference-style step (both run the teacher in the step)",
                            "slow": "reference", "fast": "online"},
}
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-6  # reference-style vs project, fp32, dropout off
FP16_TOL = 1e-2  # precomputed (fp16-stored teacher vectors) vs online, as tests/test_model.py
STUDENT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "tlm_labels", "word_ids", "word_valid", "word_target")


# --------------------------------------------------------------------------------------------
# Preparation: student, shards, configs
# --------------------------------------------------------------------------------------------


def prepare(args, log) -> tuple[Path, Path]:
    """The student initialisation and the shards under --workdir (made only when missing)."""
    workdir = Path(args.workdir).resolve()
    student_dir, shard_dir = workdir / "student-init", workdir / "shards"
    workdir.mkdir(parents=True, exist_ok=True)
    if not (student_dir / "config.json").exists():
        log(f"making the student: mmkd-init-student --config {args.config} --out {student_dir}")
        subprocess.run([sys.executable, "-m", "mmkd_ds.cli.init_student", "--config", str(args.config),
                        "--out", str(student_dir)], check=True)
    else:
        log(f"reusing the student in {student_dir}")
    if not reusable_shards(shard_dir):
        log(f"making the shards: mmkd-precompute --config {args.config} --precompute.out_dir={shard_dir}")
        subprocess.run([sys.executable, "-m", "mmkd_ds.cli.precompute", "--config", str(args.config),
                        f"--precompute.out_dir={shard_dir}", "--precompute.device=cpu", "--precompute.progress=false"],
                       check=True)
    else:
        log(f"reusing the shards in {shard_dir} (the loader checks them against the manifest)")
    return student_dir, shard_dir


def run_configs(args, student_dir: Path, shard_dir: Path) -> tuple[RunConfig, RunConfig, list[str]]:
    overrides = [
        f"--student.name={student_dir}",
        f"--precompute.out_dir={shard_dir}",
        "--stream.shard_dir=",
        f"--stream.batch_size={args.batch_size}",
        f"--train.seed={args.seed}",
        f"--train.out_dir={Path(args.workdir).resolve() / 'unused-distill'}",
    ]
    if args.num_workers is not None:
        overrides.append(f"--stream.num_workers={args.num_workers}")
    pre = load_config(args.config, overrides + ["--train.teacher_mode=precomputed"])
    online = load_config(args.config, overrides + ["--train.teacher_mode=online"])
    return pre, online, overrides


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


class Runner:
    """One variant: its model copy, optimizer, scheduler and batch stream; ``step()`` takes one
    optimizer step exactly as the training loop's micro-batch does (grad_accum 1): batch to the
    device, (online: teacher forward), BatchNorm statistics saved, losses, finite check,
    backward, gradient clipping (train.grad_clip, as the engine does), optimizer and scheduler
    step, after_step()."""

    def __init__(self, name: str, model: MMKDModel, loader, cfg: RunConfig, teacher=None):
        self.name = name
        self.model = model.train()
        self.cfg = cfg
        self.teacher = teacher
        self.loader = loader
        self.batches = iter(loader)
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, fixed_schedule(cfg.train))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bn_buffers = batchnorm_buffers(model)
        self.reference = (
            ReferenceStyleStep(model, teacher.model, cfg.teacher.layer, cfg.teacher.pooling) if name == "reference" else None
        )
        self.skipped = 0
        self.last_losses: dict[str, float] = {}

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.reference is not None:
            return self.reference.losses(batch)
        if self.name == "online":
            fill_online_teacher(batch, self.teacher, self.cfg)
        return self.model(batch)

    def step(self) -> dict[str, Any]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch = batch_to_device(next(self.batches), torch.device("cpu"))
        t1 = time.perf_counter()
        saved_bn = [b.clone() for b in self.bn_buffers]
        losses = self.losses(batch)
        if all_finite(losses["total"]):
            losses["total"].backward()
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        else:  # as the loop: skip, restore the BatchNorm statistics the bad forward updated
            for b, s in zip(self.bn_buffers, saved_bn):
                b.copy_(s)
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_step()
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        return {"s": t2 - t0, "data_s": t1 - t0, "cpu_s": cpu, "samples": len(batch["langs"]),
                "tokens": batch["n_tokens"]}

    def close(self) -> None:
        self.batches.close()  # ends the DataLoader iterator, so its workers exit


# --------------------------------------------------------------------------------------------
# Start-up check
# --------------------------------------------------------------------------------------------


def first_batch(loader) -> dict:
    """Batch 0 of epoch 0 of a loader's stream, built in this process (the loader's own
    position is not touched)."""
    return next(iter(loader.stream))


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def startup_check(base: MMKDModel, loader_pre, loader_online, teacher, cfg: RunConfig, log) -> dict[str, Any]:
    """The three variants compute the same thing on the same data (see the module docstring).

    Two modes, each on a fresh copy of the initial model, dropout off in both: "eval" (the
    whole model in eval mode: BatchNorm with its running statistics) and "train-bn" (student in
    eval mode for no dropout, heads in training mode: BatchNorm with batch statistics, as in
    the timed steps).
    """
    pre = first_batch(loader_pre)
    on = first_batch(loader_online)
    same_keys = pre["keys"] == on["keys"]
    same_inputs = {k: bool(torch.equal(pre[k], on[k])) for k in STUDENT_KEYS if k in pre}
    project_batch = dict(on)
    with torch.no_grad():
        fill_online_teacher(project_batch, teacher, cfg)
    rows, counts = [], None
    for mode in ("eval", "train-bn"):
        model = copy.deepcopy(base).eval()
        if mode == "train-bn":
            for heads in (model.sentence_heads, model.structure_heads):
                if heads is not None:
                    heads.train()
        ref = ReferenceStyleStep(model, teacher.model, cfg.teacher.layer, cfg.teacher.pooling)
        with torch.no_grad():
            got_online = {k: float(v) for k, v in model(project_batch).items()}
            got_pre = {k: float(v) for k, v in model(pre).items()}
            got_ref = {k: float(v) for k, v in ref.losses(on).items()}
        counts = (ref.teacher_forwards, ref.student_forwards)
        for k in (*OBJECTIVES, "total"):
            if k not in got_online:
                continue
            rows.append({
                "mode": mode,
                "loss": k,
                "project_online": got_online[k],
                "reference_style": got_ref.get(k),
                "rel_diff_reference": rel_diff(got_ref[k], got_online[k]) if k in got_ref else None,
                "equal_reference": k in got_ref
                and abs(got_ref[k] - got_online[k]) <= CHECK_ATOL + CHECK_RTOL * abs(got_online[k]),
                "project_precomputed": got_pre.get(k),
                "rel_diff_precomputed": rel_diff(got_pre[k], got_online[k]) if k in got_pre else None,
                "equal_precomputed": k in got_pre
                and abs(got_pre[k] - got_online[k]) <= FP16_TOL + FP16_TOL * abs(got_online[k]),
            })
    check = {
        "batch": "batch 0 of epoch 0 of each stream (the shard stream and the corpus stream)",
        "modes": {
            "eval": "whole model in eval mode (dropout off, BatchNorm with running statistics), no_grad, "
                    "copy of the initial model",
            "train-bn": "student in eval mode (dropout off), heads in training mode (BatchNorm with batch "
                        "statistics, as in the timed steps), no_grad, copy of the initial model",
        },
        "tolerance_reference": {"rtol": CHECK_RTOL, "atol": CHECK_ATOL},
        "tolerance_precomputed": {"rtol": FP16_TOL, "atol": FP16_TOL, "why": "teacher vectors stored in fp16"},
        "same_sample_keys": same_keys,
        "same_student_inputs": same_inputs,
        "teacher_forwards_per_reference_step": counts[0],
        "student_forwards_per_reference_step": counts[1],
        "losses": rows,
    }
    check["reference_equal"] = all(r["equal_reference"] for r in rows)
    check["precomputed_equal"] = all(r["equal_precomputed"] for r in rows)
    check["same_data"] = same_keys and all(same_inputs.values())
    check["passed"] = check["reference_equal"] and check["precomputed_equal"] and check["same_data"]
    return check


def check_table(check: dict) -> str:
    out = [
        "| mode | loss | project, online teacher | reference-style | rel. diff | project, precomputed (fp16 shards) "
        "| rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in check["losses"]:
        out.append(f"| {r['mode']} | {r['loss']} | {r['project_online']:.6f} | {r['reference_style']:.6f} | "
                   f"{r['rel_diff_reference']:.1e} {'ok' if r['equal_reference'] else 'DIFFERS'} | "
                   f"{r['project_precomputed']:.6f} | {r['rel_diff_precomputed']:.1e} "
                   f"{'ok' if r['equal_precomputed'] else 'DIFFERS'} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Figures, machine, tables
# --------------------------------------------------------------------------------------------


def summarise(records: list[dict], batch_size: int) -> dict[str, Any]:
    times = [r["s"] for r in records]
    waits = [r["data_s"] for r in records]
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {
        "steps": len(times),
        "median_ms": med * 1e3,
        "p25_ms": q[0] * 1e3,
        "p75_ms": q[2] * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "median_data_wait_ms": statistics.median(waits) * 1e3,
        "mean_data_wait_ms": statistics.fmean(waits) * 1e3,
        "median_compute_ms": statistics.median(t - w for t, w in zip(times, waits)) * 1e3,
        "median_cpu_ms": statistics.median(r["cpu_s"] for r in records) * 1e3,
        "samples_per_s": batch_size / med,
        "mean_tokens_per_batch": statistics.fmean(r["tokens"] for r in records),
        "mean_samples_per_batch": statistics.fmean(r["samples"] for r in records),
        "step_ms": [t * 1e3 for t in times],
        "data_wait_ms": [w * 1e3 for w in waits],
        "cpu_ms": [r["cpu_s"] * 1e3 for r in records],
        "round": [r["round"] for r in records],
    }


def ratios(summary: dict, per_round: dict, spec: dict, rounds: int) -> dict[str, dict]:
    out = {}
    for key, t in spec.items():
        if t["slow"] not in summary or t["fast"] not in summary:
            out[key] = {"target": t["text"], "status": "not measured (variant not run)",
                        **({"required": t["min"]} if "min" in t else {})}
            continue
        value = summary[t["slow"]]["median_ms"] / summary[t["fast"]]["median_ms"]
        by_round = [per_round[t["slow"]][r] / per_round[t["fast"]][r] for r in range(rounds)]
        entry = {"target": t["text"], "ratio": value, "per_round_min": min(by_round), "per_round_max": max(by_round),
                 "per_round": by_round,
                 "fastest_step_ratio": summary[t["slow"]]["min_ms"] / summary[t["fast"]]["min_ms"],
                 "cpu_time_ratio": summary[t["slow"]]["median_cpu_ms"] / summary[t["fast"]]["median_cpu_ms"]}
        if "min" in t:
            entry["required"] = t["min"]
            entry["met"] = value >= t["min"]
        out[key] = entry
    return out


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import transformers

    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def describe_config(args, cfg: RunConfig, overrides: list[str], model: MMKDModel, teacher) -> dict[str, Any]:
    s_cfg = model.student.config
    t_cfg = teacher.model.config
    return {
        "config": str(args.config),
        "overrides": overrides,
        "batch_size": cfg.stream.batch_size,
        "num_workers": cfg.stream.num_workers,
        "precision": "fp32 (CPU)",
        "student": {
            "path": cfg.student.name, "hidden": s_cfg.hidden_size, "layers": s_cfg.num_hidden_layers,
            "heads": s_cfg.num_attention_heads, "vocab": s_cfg.vocab_size, "max_tokens": cfg.student.max_tokens,
            "parameters": sum(p.numel() for p in model.student.parameters()),
            "trainable_parameters_with_heads": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "teacher": {
            "name": cfg.teacher.name, "hidden": t_cfg.hidden_size, "layers": t_cfg.num_hidden_layers,
            "parameters": sum(p.numel() for p in teacher.model.parameters()), "pooling": cfg.teacher.pooling,
            "max_tokens": cfg.teacher.max_tokens, "shard_dtype": cfg.teacher.dtype,
        },
        "loss": dataclasses.asdict(cfg.loss),
        "optimizer": {"name": "AdamW (mmkd_ds.training.optim.build_optimizer)", "lr": cfg.train.lr,
                      "weight_decay": cfg.train.weight_decay, "grad_clip": cfg.train.grad_clip,
                      "schedule": f"{cfg.train.schedule}, warm-up {cfg.train.warmup_steps} of {cfg.train.steps} steps"},
        "seed": args.seed,
    }


def fmt_ratio(entry: dict) -> str:
    return f"{entry['ratio']:.2f}x" if "ratio" in entry else entry["status"]


def tables(result: dict) -> str:
    m, c, t = result["machine"], result["config"], result["timing"]
    out = ["# mmkd-ds training-step throughput: CPU demo configuration", ""]
    out.append(f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
               f"torch {m['torch']} with {m['torch_threads']} threads; transformers {m['transformers']}; "
               f"Python {m['python']}")
    out.append(f"- load average (1 min) at start / end: {result['load_average_start'][0]:.2f} / "
               f"{result['load_average_end'][0]:.2f}")
    out.append(f"- date: {result['date']}; command: `{result['command']}`")
    out.append(f"- config: `{c['config']}`, batch {c['batch_size']}, {c['num_workers']} data-loader worker(s) per "
               f"stream, fp32; student {c['student']['layers']} layers x {c['student']['hidden']} "
               f"(vocab {c['student']['vocab']}, {c['student']['parameters'] / 1e6:.1f}M parameters); teacher "
               f"{c['teacher']['name']} ({c['teacher']['layers']} layers x {c['teacher']['hidden']}, "
               f"{c['teacher']['parameters'] / 1e6:.1f}M); loss weights {c['loss']['token_weight']:g}/"
               f"{c['loss']['word_weight']:g}/{c['loss']['sentence_weight']:g}/{c['loss']['structure_weight']:g}, "
               f"word pooling {c['loss']['word_pooling']}, heads {c['loss']['head_hidden']}->{c['loss']['head_out']}")
    out.append(f"- timing: {t['warmup']} warm-up steps per variant, then {t['rounds']} rounds x {t['steps']} timed "
               f"steps per variant, interleaved (order rotated each round); a step is timed from asking the loader "
               f"for the batch to the end of the optimizer step; median over all timed steps")
    if result.get("note"):
        out.append(f"- note: {result['note']}")
    out.append("")
    out.append("## Start-up check: the same losses")
    out.append("")
    ck = result["check"]
    out.append(f"Dropout off; {ck['batch']}; modes: " + "; ".join(f"{k}: {v}" for k, v in ck["modes"].items())
               + f". Reference-style vs project with the online teacher: rtol "
               f"{ck['tolerance_reference']['rtol']:g}; project from the shards vs online: {FP16_TOL:g} (fp16 "
               f"teacher vectors). Same samples in both streams: {ck['same_sample_keys']}; identical student "
               f"inputs: {all(ck['same_student_inputs'].values())}. Reference-style step: "
               f"{ck['teacher_forwards_per_reference_step']} teacher forwards, "
               f"{ck['student_forwards_per_reference_step']} student forwards. Result: "
               f"**{'passed' if ck['passed'] else 'FAILED'}**.")
    out.append("")
    out.append(check_table(ck))
    out.append("")
    out.append("## Step time")
    out.append("")
    out.append("| variant | what it runs | median step (ms) | p25-p75 (ms) | fastest (ms) | data wait, median (ms) "
               "| samples/s | CPU time, median (ms) | steps |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, s in result["variants"].items():
        out.append(f"| {v} | {DESCRIPTIONS[v]} | {s['median_ms']:.0f} | {s['p25_ms']:.0f}-{s['p75_ms']:.0f} | "
                   f"{s['min_ms']:.0f} | {s['median_data_wait_ms']:.1f} | {s['samples_per_s']:.1f} | "
                   f"{s['median_cpu_ms']:.0f} | {s['steps']} |")
    out.append("")
    out.append("Step time is wall-clock time (what throughput is); samples/s = batch size / median step time. CPU "
               "time is the training process's (all its threads; the data-loader workers are separate processes "
               "and not counted): a secondary figure, less disturbed by other jobs on a shared machine.")
    out.append("")
    out.append("## Ratios of the medians (targets from the issue)")
    out.append("")
    out.append("| ratio | measured (median step times) | per-round range | fastest steps | CPU time | target | met |")
    out.append("|---|---:|---:|---:|---:|---:|---|")
    for entry in (*result["targets"].values(), *result["info_ratios"].values()):
        rng = f"{entry['per_round_min']:.2f}-{entry['per_round_max']:.2f}x" if "ratio" in entry else "-"
        cpu = f"{entry['cpu_time_ratio']:.2f}x" if "ratio" in entry else "-"
        fastest = f"{entry['fastest_step_ratio']:.2f}x" if "ratio" in entry else "-"
        req = f">= {entry['required']:g}x" if "required" in entry else "(info)"
        met = ("yes" if entry["met"] else "no") if "met" in entry else "-"
        out.append(f"| {entry['target']} | {fmt_ratio(entry)} | {rng} | {fastest} | {cpu} | {req} | {met} |")
    out.append("")
    out.append("A target is judged on the ratio of the median wall-clock step times. The per-round range (ratio of "
               "the per-round medians) shows how much the machine moved the figure during the run; the ratios of the "
               "fastest steps and of the CPU times are secondary figures that other jobs on a shared machine disturb "
               "less. Where they disagree with the medians, the run was noisy.")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo-scratch.yaml")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "step-throughput",
                   help="where the student initialisation and the shards are made (reused when present)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (stream.batch_size)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the training process")
    p.add_argument("--seed", type=int, default=42, help="train.seed: torch seed of the heads' initialisation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers per stream (default: the config's stream.num_workers)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--note", default="", help="free text recorded in the results (e.g. how quiet the machine was)")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="where step-throughput-cpu.json/.md go (default benchmarks/results); '' writes nothing")
    args = p.parse_args(argv)
    args.config, args.workdir = args.config.resolve(), args.workdir.resolve()
    args.out = str(Path(args.out).resolve()) if args.out else ""
    if min(args.rounds, args.steps) < 1 or args.warmup < 0 or args.batch_size < 2 or args.threads < 1:
        p.error("--rounds and --steps must be >= 1, --warmup >= 0, --batch-size >= 2, --threads >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    os.chdir(ROOT)  # the config's relative paths (and the CLIs') are the repository's
    student_dir, shard_dir = prepare(args, log)
    cfg_pre, cfg_online, overrides = run_configs(args, student_dir, shard_dir)
    device = torch.device("cpu")

    # One student initialisation and one set of heads, copied into each variant.
    torch.manual_seed(cfg_pre.train.seed)
    student, tokenizer = build_student(cfg_pre)
    teacher = build_online_teacher(cfg_online, device)
    hidden_t = teacher_hidden_size(cfg_pre)  # from the shard manifest
    if hidden_t != teacher.hidden_size:
        raise SystemExit(f"shards in {shard_dir} were made by a teacher of hidden size {hidden_t}, "
                         f"the config's teacher has {teacher.hidden_size}")
    base = build_model(cfg_pre, student, hidden_t)  # MMKDModel in training mode, as the loop builds it

    place = ProcessPlace(0, 1, 0)
    collate_pre = MMKDCollator(tokenizer, cfg_pre.loss, cfg_pre.student.max_tokens, cfg_pre.stream.seed)

    def collate_online() -> MMKDCollator:
        return MMKDCollator(tokenizer, cfg_online.loss, cfg_online.student.max_tokens, cfg_online.stream.seed,
                            teacher_tokenizer=teacher.tokenizer, teacher_max_tokens=cfg_online.teacher.max_tokens)

    loader_pre = build_train_loader(cfg_pre, place, collate_pre)
    loader_online = build_train_loader(cfg_online, place, collate_online())
    log(f"pieces built: student {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, teacher "
        f"{cfg_pre.teacher.name}, {loader_pre.batches_per_epoch} batches of {args.batch_size} per epoch")

    log("start-up check: reference-style losses vs the project's, one batch, dropout off")
    check = startup_check(base, loader_pre, loader_online, teacher, cfg_online, log)
    print("Start-up check (first batch, dropout off):", file=sys.stderr)
    print(check_table(check), file=sys.stderr)
    print(f"same samples: {check['same_sample_keys']}; identical student inputs: {check['same_student_inputs']}; "
          f"reference-style step: {check['teacher_forwards_per_reference_step']} teacher forwards, "
          f"{check['student_forwards_per_reference_step']} student forwards; "
          f"check {'passed' if check['passed'] else 'FAILED'}", file=sys.stderr)
    if not check["reference_equal"]:
        print("step_throughput: the reference-style step does not compute the project's losses; "
              "the comparison would not be fair. Stopping.", file=sys.stderr)
        return 3

    runners: list[Runner] = []
    for name in args.variants:
        if name == "precomputed":
            runners.append(Runner(name, copy.deepcopy(base), loader_pre, cfg_pre))
        elif name == "online":
            runners.append(Runner(name, copy.deepcopy(base), loader_online, cfg_online, teacher))
        else:  # its own corpus loader: the same batches as `online`
            loader = build_train_loader(cfg_online, place, collate_online())
            runners.append(Runner(name, copy.deepcopy(base), loader, cfg_online, teacher))

    records: dict[str, list[dict]] = {r.name: [] for r in runners}
    per_round: dict[str, list[float]] = {r.name: [] for r in runners}
    warmup_ms: dict[str, list[float]] = {r.name: [] for r in runners}
    try:
        for i in range(args.warmup):
            for r in runners:
                warmup_ms[r.name].append(r.step()["s"] * 1e3)
            log(f"warm-up step {i + 1}/{args.warmup}: " + ", ".join(f"{n} {v[-1]:.0f} ms" for n, v in warmup_ms.items()))
        for rnd in range(args.rounds):
            k = rnd % len(runners)
            for r in runners[k:] + runners[:k]:
                got = [r.step() for _ in range(args.steps)]
                records[r.name].extend({**g, "round": rnd} for g in got)
                per_round[r.name].append(statistics.median(g["s"] for g in got))
            log(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in per_round.items()))
    finally:
        for r in runners:
            r.close()

    summary = {r.name: summarise(records[r.name], args.batch_size) for r in runners}
    for r in runners:
        summary[r.name]["skipped_non_finite"] = r.skipped
        summary[r.name]["last_losses"] = r.last_losses
        summary[r.name]["warmup_ms"] = warmup_ms[r.name]
        summary[r.name]["per_round_median_ms"] = [x * 1e3 for x in per_round[r.name]]
        summary[r.name]["what"] = DESCRIPTIONS[r.name]
    result = {
        "benchmark": "step_throughput",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name] + sys.argv),
        "note": args.note,
        "machine": machine(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "config": describe_config(args, cfg_online, overrides, base, teacher),
        "timing": {"warmup": args.warmup, "rounds": args.rounds, "steps": args.steps, "clock": "time.perf_counter",
                   "statistic": "median over all timed steps; ratios are ratios of medians",
                   "step": "loader next() (data wait) + [online: teacher forward] + forward + backward + "
                           "clip_grad_norm_ + AdamW step + scheduler step"},
        "check": check,
        "variants": summary,
        "targets": ratios(summary, per_round, TARGETS, args.rounds),
        "info_ratios": ratios(summary, per_round, INFO_RATIOS, args.rounds),
    }
    md = tables(result)
    print(md)
    written = write_results(args.out, "step-throughput-cpu", result, md)
    figures = ", ".join(f"{n} {s['median_ms']:.0f} ms ({s['samples_per_s']:.1f} samples/s)" for n, s in summary.items())
    targets = "; ".join(f"{e['target']}: {fmt_ratio(e)}" + (f" ({'met' if e['met'] else 'not met'})" if "met" in e else "")
                        for e in result["targets"].values())
    print(f"step throughput on {result['machine']['cpu_model']} ({args.threads} threads): {figures}; {targets}; "
          f"check {'passed' if check['passed'] else 'FAILED'}; {time.perf_counter() - t_start:.0f}s"
          + (f"; wrote {', '.join(written)}" if written else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
