#!/usr/bin/env python
"""Model FLOPs utilisation of the distillation step: a bert-base student, rows of up to 128
tokens, bf16, ZeRO-2, one GPU (the issue's GPU figure; it runs on CPU too, as a smoke test).

What runs: the project's training step, built as ``mmkd_ds.training.loop.train`` builds it
(``build_model``; ``build_engine`` with the given DeepSpeed JSON; batches from
``build_train_loader`` over precomputed shards), in this one process: engine forward, backward, step. Each step is timed
from asking the loader for the batch to the end of ``engine.step()`` (CUDA synchronised).

What counts as a model FLOP (``model_flops``; PaLM's convention: useful work only, no padding,
no recomputation): per student row of n real tokens, the encoder's matmuls, 2 n P per layer
(P = 4 H^2 + 2 H F weights) plus attention 4 n^2 H per layer; the MLM head at the positions
TLM scores (2 m (H^2 + H V)); the word map (2 B W H H_T) when the hidden sizes differ; all
three times (forward + backward). Not counted: the sentence and structure heads, the InfoNCE
and KL similarity matrices, layer norms, softmaxes (under 1% of the total for bert-base; the
test compares the formula with torch's FlopCounterMode). MFU = model FLOPs / step time /
the accelerator's dense bf16 peak (--peak-tflops, default from the GPU's name: H100 / H200
SXM 989.4, H100 PCIe 756).

Data: the synthetic corpus of ``mmkd-synth`` with every --join consecutive pairs of a language
joined into one, so that pair rows ([CLS] e [SEP] x [SEP]) reach the 128-token cut; a student
made by ``mmkd-init-student`` with bert-base sizes (12 x 768, 12 heads, a WordPiece vocabulary
trained on the corpus); for the shards, a randomly initialised bert-base-sized teacher (12 x 768,
the student's tokenizer) made here, so that nothing is downloaded. The teacher's weights do not
change the student step; its hidden size does (768 = the student's: no word map, as with the
paper's bert-base-cased teacher).

    python benchmarks/mfu.py                                   # on the GPU: defaults as the issue
    python benchmarks/mfu.py --device cpu --workdir /tmp/mfu-smoke --layers 2 --hidden 64 --heads 2 \\
        --vocab-size 2000 --teacher-layers 2 --teacher-hidden 64 --pairs 300 --steps 3 --warmup 1 \\
        --precision fp32 --num-workers 1 --out ''                      # CPU smoke test

Output: a table on stdout and mfu-<slug>.json / .md under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from recording import describe_machine, log, reusable_shards, versions, with_gpu, write_results  # noqa: E402

# Dense bf16 peaks (TFLOP/s, no sparsity) by GPU name, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


# --------------------------------------------------------------------------------------------
# FLOP accounting
# --------------------------------------------------------------------------------------------


def model_flops(batch: dict, hidden: int, intermediate: int, layers: int, vocab: int,
                teacher_hidden: int | None = None) -> float:
    """Useful forward + backward FLOPs of one batch of the MMKD step (see the module docstring).

    ``batch``: a collated batch (``attention_mask`` [R, L] of every student row, ``tlm_labels``
    [B_tlm, L] with -100 where TLM does not score, and for the word level ``word_valid`` [B, W]).
    ``teacher_hidden``: the teacher's hidden size when a word map H -> H_T exists, else None.
    """
    n = batch["attention_mask"].sum(dim=1).double()  # real tokens per row
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) * layers
    forward = per_token * n.sum() + 4 * layers * hidden * (n * n).sum()
    if "tlm_labels" in batch:
        m = (batch["tlm_labels"] != -100).sum().double()
        forward = forward + 2 * m * (hidden * hidden + hidden * vocab)
    if teacher_hidden is not None and "word_valid" in batch:
        forward = forward + 2 * batch["word_valid"].numel() * hidden * teacher_hidden
    return float(3 * forward)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: give --peak-tflops to get an MFU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key} (datasheet)"
    return None, f"no known peak for {name!r}: give --peak-tflops"


# --------------------------------------------------------------------------------------------
# Preparation: corpus, student, shards
# --------------------------------------------------------------------------------------------


def write_joined_corpus(out: Path, pairs: int, join: int, seed: int) -> None:
    """Synthetic pairs, every ``join`` consecutive pairs of a language made into one."""
    from mmkd_ds.data.synthetic import synthetic_pairs

    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list] = {}
    for p in synthetic_pairs(pairs * join, seed):
        groups.setdefault(p.lang, []).append(p)
    for lang, ps in groups.items():
        lines = []
        for i in range(0, len(ps) - join + 1, join):
            chunk = ps[i:i + join]
            lines.append(" ".join(p.en for p in chunk) + "\t" + " ".join(p.xx for p in chunk))
        tmp = out / f".joined.en-{lang}.tsv.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out / f"joined.en-{lang}.tsv")


def write_run_config(args, workdir: Path) -> Path:
    path = workdir / "run.yaml"
    path.write_text(
        f"data:\n  sources:\n    - path: '{workdir / 'corpus'}/*.tsv'\n  heldout: []\n  max_words: 256\n"
        f"teacher:\n  name: '{workdir / 'teacher'}'\n  max_tokens: {args.max_tokens}\n"
        f"precompute:\n  out_dir: '{workdir / 'shards'}'\n  shard_size: 1000\n  batch_size: 128\n  progress: false\n"
        f"stream:\n  batch_size: {args.batch_size}\n  num_workers: {args.num_workers}\n"
        f"student:\n  name: '{workdir / 'student-init'}'\n  max_tokens: {args.max_tokens}\n"
        f"  length_buckets: {args.length_buckets}\n"
        f"train:\n  out_dir: '{workdir / 'train'}'\n  precision: {args.precision}\n  steps: {args.warmup + args.steps}\n"
        "  warmup_steps: 1\n  eval_every: 0\n  save_every: 0\n  export: false\n",
        encoding="utf-8",
    )
    return path


def make_teacher(args, student: Path, out: Path) -> None:
    """A randomly initialised BERT encoder of --teacher-layers x --teacher-hidden, with the
    student's tokenizer: what the precompute needs, without a download."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    log(f"teacher: random {args.teacher_layers} x {args.teacher_hidden} BERT -> {out}")
    tokenizer = AutoTokenizer.from_pretrained(student)
    torch.manual_seed(args.seed)
    heads = max(1, args.teacher_hidden // 64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=args.teacher_hidden, num_hidden_layers=args.teacher_layers,
                        num_attention_heads=heads, intermediate_size=4 * args.teacher_hidden,
                        max_position_embeddings=max(512, args.max_tokens), pad_token_id=tokenizer.pad_token_id)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(args, workdir: Path) -> Path:
    """The corpus, the student and the shards under ``workdir`` (each made only when missing)."""
    from mmkd_ds.config import load_config
    from mmkd_ds.precompute import run_precompute

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "corpus").is_dir():
        log(f"corpus: {args.pairs} joined pairs (x{args.join}) per language -> {workdir / 'corpus'}")
        write_joined_corpus(workdir / "corpus", args.pairs, args.join, args.seed)
    config = write_run_config(args, workdir)
    student = workdir / "student-init"
    if not (student / "config.json").is_file():
        log(f"student: mmkd-init-student {args.layers} x {args.hidden}, {args.heads} heads, vocabulary {args.vocab_size}")
        subprocess.run([sys.executable, "-m", "mmkd_ds.cli.init_student", "--config", str(config), "--out", str(student),
                        "--vocab-size", str(args.vocab_size), "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--heads", str(args.heads)], check=True)
    teacher = workdir / "teacher"
    if not (teacher / "config.json").is_file():
        make_teacher(args, student, teacher)
    if not reusable_shards(workdir / "shards"):
        log("shards: teacher precompute")
        cfg = load_config(config, [f"--precompute.device={args.device}"])
        run_precompute(cfg)
    return config


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def measure(args, config: Path) -> dict[str, Any]:
    from mmkd_ds.config import load_config
    from mmkd_ds.distributed import init_distributed
    from mmkd_ds.training.batch import MMKDCollator, batch_to_device
    from mmkd_ds.training.data import build_train_loader, teacher_hidden_size
    from mmkd_ds.training.loop import build_engine, build_model, build_student

    cfg = load_config(config)
    place, device = init_distributed()
    if args.device == "cpu":
        device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg)
    hidden_t = teacher_hidden_size(cfg)
    model = build_model(cfg, student, hidden_t)
    collator = MMKDCollator(tokenizer, cfg.loss, cfg.student.max_tokens, cfg.stream.seed)
    loader = build_train_loader(cfg, place, collator)
    engine, ds_config, _ = build_engine(cfg, model, str(REPO / args.ds_config), place.world_size, device.type)
    sc = student.config
    word_map_to = hidden_t if model.word_map is not None else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    records = []
    batches = iter(loader)
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        batch = batch_to_device(next(batches), device)
        losses = engine(batch)
        engine.backward(losses["total"])
        engine.step()
        engine.module.after_step()
        sync()
        seconds = time.perf_counter() - t0
        if i >= args.warmup:
            records.append({
                "s": seconds,
                "flops": model_flops(batch, sc.hidden_size, sc.intermediate_size, sc.num_hidden_layers,
                                     sc.vocab_size, word_map_to),
                "tokens": int(batch["attention_mask"].sum()),
                "padded_tokens": int(batch["attention_mask"].numel()),
                "rows": int(batch["attention_mask"].shape[0]),
                "loss": float(losses["total"].detach()),
            })
        log(f"step {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}: "
            f"{seconds * 1e3:.0f} ms, loss {float(losses['total'].detach()):.3f}")
    batches.close()
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "records": records,
        "device": str(device),
        "precision": "bf16" if ds_config["bf16"]["enabled"] else ("fp16" if ds_config["fp16"]["enabled"] else "fp32"),
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "student": {"layers": sc.num_hidden_layers, "hidden": sc.hidden_size, "heads": sc.num_attention_heads,
                    "intermediate": sc.intermediate_size, "vocab": sc.vocab_size,
                    "parameters": sum(p.numel() for p in student.parameters())},
        "teacher_hidden": hidden_t,
        "max_memory_allocated_bytes": memory,
        "config": {"batch_size": cfg.stream.batch_size, "max_tokens": cfg.student.max_tokens,
                   "length_buckets": cfg.student.length_buckets, "ds_config": args.ds_config},
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarise(run: dict, peak: float | None) -> dict[str, Any]:
    recs = run["records"]
    total_s = sum(r["s"] for r in recs)
    total_flops = sum(r["flops"] for r in recs)
    achieved = total_flops / total_s / 1e12
    return {
        "steps": len(recs),
        "median_step_ms": statistics.median(r["s"] for r in recs) * 1e3,
        "tokens_per_s": sum(r["tokens"] for r in recs) / total_s,
        "real_token_fraction": sum(r["tokens"] for r in recs) / sum(r["padded_tokens"] for r in recs),
        "mean_tokens_per_row": sum(r["tokens"] for r in recs) / sum(r["rows"] for r in recs),
        "model_tflops_per_step": total_flops / len(recs) / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
    }


def table(result: dict) -> str:
    s, run = result["summary"], result["run"]
    st = run["student"]
    lines = [f"# MMKD step model FLOPs utilisation: {result['machine']['name']}", "",
             f"- date: {result['date']}; command: `{result['command']}`",
             f"- student: {st['layers']} x {st['hidden']}, {st['heads']} heads, vocabulary {st['vocab']} "
             f"({st['parameters'] / 1e6:.1f}M parameters); teacher hidden {run['teacher_hidden']} (precomputed shards)",
             f"- step: batch {run['config']['batch_size']} pairs, rows cut at {run['config']['max_tokens']} tokens, "
             f"length buckets {run['config']['length_buckets']}, {run['precision']}, ZeRO-{run['zero_stage']} "
             f"({run['config']['ds_config']}), device {run['device']}",
             f"- peak: {result['peak_tflops']} TFLOP/s ({result['peak_source']})", "",
             "| figure | value |", "|---|---:|",
             f"| median step | {s['median_step_ms']:.1f} ms |",
             f"| real tokens per second (all student rows) | {s['tokens_per_s']:,.0f} |",
             f"| mean real tokens per row | {s['mean_tokens_per_row']:.1f} |",
             f"| real tokens / padded tokens of the collated batch | {100 * s['real_token_fraction']:.1f}% |",
             f"| model FLOPs per step | {s['model_tflops_per_step']:.4g} TFLOP |",
             f"| achieved | {s['achieved_tflops']:.4g} TFLOP/s |",
             f"| **MFU** | **{100 * s['mfu']:.1f}%** |" if s["mfu"] is not None else "| MFU | (no peak) |"]
    if run["max_memory_allocated_bytes"]:
        lines.append(f"| peak GPU memory allocated | {run['max_memory_allocated_bytes'] / 2**30:.1f} GiB |")
    lines += ["", f"Over {s['steps']} timed steps after {result['settings']['warmup']} warm-up steps; achieved = "
              "model FLOPs of the timed steps / their total time. Target (issue 6): MFU >= 40%."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "mfu")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--ds-config", default="ds_configs/zero2.json", help="relative to the repository")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=30000, help="the student's WordPiece vocabulary")
    p.add_argument("--teacher-layers", type=int, default=12, help="the random teacher made for the shards")
    p.add_argument("--teacher-hidden", type=int, default=768, help="a multiple of 64 (heads of 64)")
    p.add_argument("--max-tokens", type=int, default=128, help="student.max_tokens (and the teacher's)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--length-buckets", type=int, default=1, help="student.length_buckets")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--pairs", type=int, default=4000, help="joined pairs per language (4 languages)")
    p.add_argument("--join", type=int, default=3, help="synthetic pairs joined into one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's dense peak at --precision")
    p.add_argument("--out", default=str(HERE / "results"), help="'' writes nothing")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.pairs, args.join) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --pairs, --join must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available (use --device cpu for a smoke test)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    config = prepare(args, workdir)
    run = measure(args, config)
    device = torch.device(run["device"])
    peak, source = peak_tflops(device, args.peak_tflops)
    machine = describe_machine(torch.get_num_threads())
    if device.type == "cuda":
        machine = with_gpu(machine, torch.cuda.get_device_name(device))
    result = {
        "benchmark": "mfu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine,
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peak_tflops": peak,
        "peak_source": source,
        "run": run,
        "summary": summarise(run, peak),
    }
    md = table(result)
    print(md)
    written = write_results(args.out, f"mfu-{machine['slug']}", result, md)
    if written:
        log(f"wrote {', '.join(written)}")
    from mmkd_ds.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
