#!/usr/bin/env python
"""Benchmark the training data stream against what training consumes (CPU demo configuration).

Two phases, one process, the from-scratch demo config (configs/demo-scratch.yaml: the bundled sample corpus, the
packaged all-MiniLM-L6-v2 teacher's shards, the `mmkd-init-student` student, batch 32):

* stream    the real loader alone: ``build_train_loader(cfg, place, MMKDCollator(...))`` as
            ``mmkd_ds/training/loop.py`` builds it, i.e. shard reading + sample decoding + student
            tokenisation + masking + collation in ``--workers`` data-loader workers, then
            ``batch_to_device``. The main process does nothing but pull batches. It runs whole
            epochs of the loader (the sample corpus is small): ``--stream-warmup-epochs`` excluded,
            then ``--stream-epochs`` timed, each from the call of ``iter_epoch()`` (which starts
            fresh workers, as training does at every epoch) to its last batch.
            samples/s of an epoch = samples it yielded (padding repeats included) / its time;
            the figure reported is the median over the timed epochs.
* training  real single-process training steps of the same config fed from a fresh loader
            built the same way: ``next(loader)`` + ``batch_to_device`` (timed: the data wait),
            then, as loop.py, the BatchNorm buffers saved, the ``MMKDModel`` forward (all four
            losses), the finite-loss check, backward, gradient clipping at
            ``train.grad_clip``, AdamW (``build_optimizer``) and LR schedule (``build_scheduler``)
            step, zero_grad, ``after_step``, and reading the loss. DeepSpeed is not used (one CPU
            process, fp32, one micro-batch per step). ``--train-warmup`` steps
            are excluded, then ``--train-steps`` (default: one epoch of batches, so the window
            holds an epoch boundary where the loader restarts its workers) are timed.
            samples/s consumed = batch size / median step time; data-wait fraction = total time
            blocked in next(loader) / total step time over the timed steps (the figure that
            loop.py logs as time/data_wait_fraction), with the median per-step fraction beside it.

Targets (from the issue): stream >= 10x what training consumes; data wait < 2% of step time.
The script reports whether they were met; it never adjusts the measurement to meet them.

Torch threads are fixed (--threads, default 2; loader workers run with torch's default of one
thread each), seeds are fixed (--seed for torch/numpy/random; masking and shard order come from
stream.seed of the config), and the machine is described in the output (CPU model, cores, load
average before and after, versions).

    python benchmarks/data_stream.py                         # workdir runs/bench-data, results in benchmarks/results
    python benchmarks/data_stream.py --workers 2 --threads 2 --stream-epochs 5
    python benchmarks/data_stream.py --stream.batch_size=64  # any --section.key=value overrides the config

The workdir gets a student (``mmkd-init-student --config CONFIG --out WORKDIR/student-init``)
and the teacher shards (``run_precompute`` into WORKDIR/shards); both are reused when present.
Output: a table on stdout, data-stream-<slug>.json and .md under --out (default
benchmarks/results; '' writes nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked; no tokenizer threads
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import describe_machine, log, reusable_shards, seed_everything, summarise, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET_STREAM_RATIO = 10.0
TARGET_WAIT_FRACTION = 0.02
TARGETS_TEXT = {
    "stream_vs_consumption": f"data stream >= {TARGET_STREAM_RATIO:g}x the samples/s training consumes",
    "data_wait": f"data wait < {100 * TARGET_WAIT_FRACTION:g}% of step time during training",
}


# --------------------------------------------------------------------------------------------
# Set-up: config, student, shards
# --------------------------------------------------------------------------------------------


def load_run_config(args, overrides: list[str]):
    from mmkd_ds.config import load_config

    workdir = Path(args.workdir).resolve()
    forced = [
        f"--precompute.out_dir={workdir / 'shards'}",
        "--stream.shard_dir=",
        f"--student.name={workdir / 'student-init'}",
        "--student.tokenizer=",
        f"--stream.num_workers={args.workers}",
        "--precompute.progress=false",
        "--train.teacher_mode=precomputed",
    ]
    return load_config(args.config, overrides + forced)


def prepare_workdir(args, overrides: list[str], cfg) -> dict[str, Any]:
    """Student and shards in the workdir: made when missing, reused when present."""
    from mmkd_ds.precompute import run_precompute

    made: dict[str, Any] = {}
    student_dir = Path(cfg.student.name)
    if (student_dir / "config.json").is_file():
        made["student"] = f"reused {student_dir}"
    else:
        from mmkd_ds.cli.init_student import main as init_student

        log(f"mmkd-init-student --config {args.config} --out {student_dir}")
        rc = init_student(["--config", str(args.config), "--out", str(student_dir), *overrides])
        if rc:
            raise SystemExit(f"mmkd-init-student failed ({rc})")
        made["student"] = f"made {student_dir} (mmkd-init-student)"
    shard_dir = Path(cfg.precompute.out_dir)
    if reusable_shards(shard_dir):
        made["shards"] = f"reused {shard_dir}"
    else:
        log(f"precompute into {shard_dir}")
        summary = run_precompute(cfg)
        if summary.manifest_path is None:
            raise SystemExit(f"precompute into {shard_dir} did not finish (no manifest)")
        made["shards"] = f"made {shard_dir}: {summary.line()}"
    return made


def measure_stream(cfg, place, collator, device, warmup_epochs: int, epochs: int) -> dict[str, Any]:
    """Whole epochs of the real loader, nothing else in the main process."""
    from mmkd_ds.training.batch import batch_to_device
    from mmkd_ds.training.data import build_train_loader

    loader = build_train_loader(cfg, place, collator)
    per_epoch: list[dict[str, Any]] = []
    intervals: list[float] = []
    first_latency: list[float] = []
    for e in range(warmup_epochs + epochs):
        samples = tokens = batches = 0
        t_start = time.perf_counter()
        last = t_start
        gaps = []
        for batch in loader.iter_epoch():
            batch = batch_to_device(batch, device)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            samples += len(batch["langs"])
            tokens += int(batch["n_tokens"])
            batches += 1
        seconds = time.perf_counter() - t_start
        rec = {"epoch": e, "warmup": e < warmup_epochs, "batches": batches, "samples": samples, "tokens": tokens,
               "seconds": seconds, "samples_per_s": samples / seconds, "first_batch_s": gaps[0] if gaps else None}
        per_epoch.append(rec)
        log(f"stream epoch {e}{' (warm-up)' if rec['warmup'] else ''}: {batches} batches, {samples} samples "
            f"in {seconds:.2f} s = {rec['samples_per_s']:.0f} samples/s")
        if e >= warmup_epochs:
            first_latency.append(gaps[0])
            intervals.extend(gaps[1:])
    timed = [r for r in per_epoch if not r["warmup"]]
    rates = [r["samples_per_s"] for r in timed]
    B = cfg.stream.batch_size
    return {
        "batches_per_epoch": loader.batches_per_epoch,
        "epochs": per_epoch,
        "samples_per_s": summarise(rates),
        "samples_per_s_median": statistics.median(rates),
        "samples_per_s_overall": sum(r["samples"] for r in timed) / sum(r["seconds"] for r in timed),
        "batch_interval_s": summarise(intervals) if intervals else None,
        "samples_per_s_from_median_interval": B / statistics.median(intervals) if intervals else None,
        "epoch_first_batch_s": summarise(first_latency),
        "tokens_per_batch_mean": sum(r["tokens"] for r in timed) / max(sum(r["batches"] for r in timed), 1),
    }


def measure_training(cfg, place, student, collator, device, warmup: int, steps: int) -> dict[str, Any]:
    """Real training steps of MMKDModel fed from a fresh loader (as mmkd_ds/training/loop.py)."""
    from mmkd_ds.training.batch import batch_to_device
    from mmkd_ds.training.data import build_train_loader, teacher_hidden_size
    from mmkd_ds.training.loop import all_finite, batchnorm_buffers, build_model
    from mmkd_ds.training.optim import build_optimizer, build_scheduler, fixed_schedule

    torch.manual_seed(cfg.train.seed)  # head initialisation, as loop.py
    model = build_model(cfg, student, teacher_hidden_size(cfg)).to(device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, fixed_schedule(cfg.train))
    params = [p for p in model.parameters() if p.requires_grad]
    bn_buffers = batchnorm_buffers(model)
    loader = build_train_loader(cfg, place, collator)
    batches = iter(loader)
    records: list[dict[str, Any]] = []
    try:
        for s in range(warmup + steps):
            t0 = time.perf_counter()
            batch = batch_to_device(next(batches), device)
            t1 = time.perf_counter()
            saved_bn = [b.clone() for b in bn_buffers]  # as loop.py: restored if the loss is not finite
            losses = model(batch)
            if not all_finite(losses["total"]):
                for b, saved in zip(bn_buffers, saved_bn):
                    b.copy_(saved)
                raise SystemExit(f"training step {s}: non-finite loss; the benchmark does not time skipped steps")
            losses["total"].backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.after_step()
            total = float(losses["total"].detach())
            t2 = time.perf_counter()
            records.append({"step": s, "warmup": s < warmup, "wait_s": t1 - t0, "step_s": t2 - t0,
                            "samples": len(batch["langs"]), "tokens": int(batch["n_tokens"]), "loss": total,
                            "epoch": loader.epoch, "position": loader.position})
            if (s + 1) % 10 == 0 or s + 1 == warmup + steps:
                timed = [r for r in records if not r["warmup"]]
                med = statistics.median(r["step_s"] for r in timed) if timed else float("nan")
                log(f"train step {s + 1}/{warmup + steps}: loss {total:.3f}, median step {med * 1e3:.0f} ms so far")
    finally:
        batches.close()  # ends the epoch's DataLoader and its workers
    timed = [r for r in records if not r["warmup"]]
    step_times = [r["step_s"] for r in timed]
    waits = [r["wait_s"] for r in timed]
    B = cfg.stream.batch_size
    med_step = statistics.median(step_times)
    epochs_touched = sorted({r["epoch"] for r in timed})
    return {
        "steps": records,
        "step_s": summarise(step_times),
        "wait_s": summarise(waits),
        "samples_per_s_median": B / med_step,
        "samples_per_s_overall": sum(r["samples"] for r in timed) / sum(step_times),
        "data_wait_fraction": sum(waits) / sum(step_times),
        "data_wait_fraction_median_step": statistics.median(w / t for w, t in zip(waits, step_times)),
        "max_wait_s": max(waits),
        "epoch_boundaries_in_window": len(epochs_touched) - 1,
        "student_training_mode": bool(student.training),
        "trainable_parameters": sum(p.numel() for p in params),
        "tokens_per_batch_mean": statistics.fmean(r["tokens"] for r in timed),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def evaluate_targets(stream: dict, train: dict) -> dict[str, dict[str, Any]]:
    ratio = stream["samples_per_s_median"] / train["samples_per_s_median"]
    wait = train["data_wait_fraction"]
    return {
        "stream_vs_consumption": {
            "target": TARGETS_TEXT["stream_vs_consumption"], "value": ratio, "met": ratio >= TARGET_STREAM_RATIO,
            "status": f"{'met' if ratio >= TARGET_STREAM_RATIO else 'NOT met'} ({ratio:.1f}x)",
        },
        "data_wait": {
            "target": TARGETS_TEXT["data_wait"], "value": wait, "met": wait < TARGET_WAIT_FRACTION,
            "status": f"{'met' if wait < TARGET_WAIT_FRACTION else 'NOT met'} ({100 * wait:.2f}%)",
        },
    }


def tables(result: dict[str, Any]) -> str:
    m, c, s, t = result["machine"], result["config"], result["stream"], result["training"]
    out = [f"# mmkd-ds data stream benchmark: {m['name']}", ""]
    out.append(f"- date: {result['date']}; torch {result['versions']['torch']} ({m['torch_threads']} threads), "
               f"transformers {result['versions']['transformers']}, tokenizers {result['versions']['tokenizers']}, "
               f"Python {result['versions']['python']}")
    out.append(f"- machine: {m['cpu_model']}, {m['usable_logical_cores']} usable logical cores "
               f"({m['physical_cores']} physical), load average at start {m['load_average_start'][0]:.2f}, "
               f"at end {m['load_average_end'][0]:.2f}")
    out.append(f"- command: `{result['command']}`")
    out.append(f"- config: {c['config_path']} ({c['corpus_pairs']} pairs in {c['shards']} shards, teacher "
               f"{c['teacher']} H={c['teacher_hidden']}); student {c['student_parameters'] / 1e6:.1f}M parameters, "
               f"max {c['student_max_tokens']} tokens; batch {c['batch_size']}, {c['num_workers']} loader worker(s), "
               f"{s['batches_per_epoch']} batches per epoch; precision fp32, single process")
    if result.get("overrides"):
        out.append(f"- config overrides: `{' '.join(result['overrides'])}`")
    st = result["settings"]
    out.append(f"- timing: time.perf_counter; stream: {st['stream_warmup_epochs']} warm-up epoch(s) excluded, "
               f"median over {st['stream_epochs']} timed epochs; training: {st['train_warmup']} warm-up steps excluded, "
               f"{st['train_steps']} timed steps ({t['epoch_boundaries_in_window']} epoch boundary(ies) in the window)")
    out.append("")
    out.append("| what | samples/s | detail |")
    out.append("|---|---:|---|")
    out.append(f"| data stream alone (loader + collator) | {s['samples_per_s_median']:.0f} | median of {s['samples_per_s']['n']} epochs "
               f"(min {s['samples_per_s']['min']:.0f}, max {s['samples_per_s']['max']:.0f}); median batch interval "
               f"{s['batch_interval_s']['median'] * 1e3:.1f} ms; epoch start (fresh workers) {s['epoch_first_batch_s']['median'] * 1e3:.0f} ms |")
    out.append(f"| training consumes (fwd+bwd+step) | {t['samples_per_s_median']:.1f} | batch / median step time "
               f"{t['step_s']['median'] * 1e3:.0f} ms (min {t['step_s']['min'] * 1e3:.0f}, max {t['step_s']['max'] * 1e3:.0f}); "
               f"overall {t['samples_per_s_overall']:.1f} |")
    out.append("")
    out.append(f"Data wait during training: {100 * t['data_wait_fraction']:.2f}% of step time (total wait / total step time); "
               f"median per step {100 * t['data_wait_fraction_median_step']:.3f}%, median wait "
               f"{t['wait_s']['median'] * 1e3:.2f} ms, longest {t['max_wait_s'] * 1e3:.0f} ms. Stream / consumption: "
               f"{result['targets']['stream_vs_consumption']['value']:.1f}x.")
    out.append("")
    out.append("## Targets (from the issue)")
    out.append("")
    out.append("| target | status on this run |")
    out.append("|---|---|")
    for tgt in result["targets"].values():
        out.append(f"| {tgt['target']} | {tgt['status']} |")
    out.append("")
    # The load at the end includes this benchmark's own threads: only the start tells of other jobs.
    if m["load_average_start"][0] > 0.5 * m["usable_logical_cores"]:
        out.append(f"Note: the machine was busy (load average {m['load_average_start'][0]:.2f} at start, "
                   f"{m['load_average_end'][0]:.2f} at end, on {m['usable_logical_cores']} cores); the figures are noisy.")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --section.key=value argument overrides the run config.")
    p.add_argument("--config", default=str(REPO / "configs" / "demo-scratch.yaml"), help="run config (default configs/demo-scratch.yaml)")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench-data"),
                   help="where the student (student-init/) and the shards (shards/) are made, reused if present "
                        "(default runs/bench-data)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="where data-stream-<slug>.json/.md go (default benchmarks/results); '' writes nothing")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default: stream.num_workers of the config)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process (default 2)")
    p.add_argument("--seed", type=int, default=0, help="torch / numpy / random seed (default 0)")
    p.add_argument("--stream-warmup-epochs", type=int, default=1)
    p.add_argument("--stream-epochs", type=int, default=5, help="timed loader epochs (default 5)")
    p.add_argument("--train-warmup", type=int, default=5, help="training steps excluded (default 5)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="timed training steps (default 0: one epoch of batches, so the window holds one epoch boundary)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and "." not in a.split("=", 1)[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    t_begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    machine = describe_machine(args.threads)

    from mmkd_ds.distributed import ProcessPlace
    from mmkd_ds.shards.manifest import read_manifest
    from mmkd_ds.training.batch import MMKDCollator
    from mmkd_ds.training.loop import build_student

    if args.workers is None:
        from mmkd_ds.config import load_config

        args.workers = load_config(args.config, overrides).stream.num_workers
    cfg = load_run_config(args, overrides)
    if cfg.train.grad_accum != 1:
        raise SystemExit("data_stream.py times one micro-batch per optimizer step: leave train.grad_accum at 1")
    made = prepare_workdir(args, overrides, cfg)
    manifest = read_manifest(cfg.precompute.out_dir)
    place = ProcessPlace(0, 1, 0)
    device = torch.device("cpu")
    log(f"machine: {machine['name']}; torch threads {torch.get_num_threads()}; workers {args.workers}")

    seed_everything(args.seed)
    student, tokenizer = build_student(cfg)
    collator = MMKDCollator(tokenizer, cfg.loss, cfg.student.max_tokens, cfg.stream.seed,
                            teacher_tokenizer=None, teacher_max_tokens=cfg.teacher.max_tokens)

    seed_everything(args.seed)
    stream = measure_stream(cfg, place, collator, device, args.stream_warmup_epochs, args.stream_epochs)
    steps = args.train_steps or stream["batches_per_epoch"]
    seed_everything(args.seed)
    train = measure_training(cfg, place, student, collator, device, args.train_warmup, steps)
    machine["load_average_end"] = list(os.getloadavg())

    result = {
        "benchmark": "data_stream",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine,
        "versions": versions(),
        "overrides": overrides,
        "workdir": made,
        "config": {
            "config_path": os.path.relpath(args.config, REPO) if Path(args.config).is_absolute() else args.config,
            "corpus_pairs": manifest.total_samples,
            "shards": len(manifest.shards),
            "shard_bytes": sum(s.bytes for s in manifest.shards),
            "teacher": manifest.teacher.get("name"),
            "teacher_hidden": manifest.teacher.get("hidden_size"),
            "student": str(cfg.student.name),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "student_vocab": len(tokenizer),
            "student_max_tokens": cfg.student.max_tokens,
            "batch_size": cfg.stream.batch_size,
            "num_workers": cfg.stream.num_workers,
            "stream_seed": cfg.stream.seed,
            "stream_verify": cfg.stream.verify,
            "uneven": cfg.stream.uneven,
            "loss_weights": {k: getattr(cfg.loss, f"{k}_weight") for k in ("token", "word", "sentence", "structure")},
            "loss_kernels": cfg.loss.kernels,
            "grad_clip": cfg.train.grad_clip,
            "lr": cfg.train.lr,
            "warmup_steps": cfg.train.warmup_steps,
            "precision": "fp32",
            "training": "single process, plain torch (no DeepSpeed engine): BatchNorm buffers saved, forward, "
                        "finite-loss check, backward, clip_grad_norm_, AdamW step, LR scheduler step, zero_grad, "
                        "after_step, loss read",
        },
        "settings": {
            "threads": args.threads, "seed": args.seed, "workers": args.workers,
            "stream_warmup_epochs": args.stream_warmup_epochs, "stream_epochs": args.stream_epochs,
            "train_warmup": args.train_warmup, "train_steps": steps,
            "clock": "time.perf_counter", "statistic": "median",
        },
        "stream": stream,
        "training": train,
    }
    result["targets"] = evaluate_targets(stream, train)
    md = tables(result)
    print(md)
    written = write_results(args.out, f"data-stream-{machine['slug']}", result, md)
    if written:
        log(f"wrote {', '.join(written)}")
    log(f"done in {time.perf_counter() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
