"""`mmkd-eval` / `launchers/evaluate.py`: evaluate an encoder directory.

    mmkd-eval --task retrieval --model runs/demo/distill/student [--config run.yaml] [--out DIR]
              [--baseline runs/demo/student-init]
    mmkd-eval --task xnli --model DIR --languages en,de,sw,ur [--data-dir DIR] [--out DIR]
    mmkd-eval --task pawsx|xquad --model DIR --languages en,de,... [--epochs 2 --lr 2e-5 ...]
    deepspeed --num_gpus 8 launchers/evaluate.py --task xnli --model DIR --languages ... \
        --deepspeed_config ds_configs/zero2.json          # data-parallel fine-tuning

xnli / pawsx / xquad: zero-shot cross-lingual transfer. The model is fine-tuned on the English
training data (XNLI / PAWS-X English train, SQuAD v1.1) and tested on every listed language;
data from the Hugging Face hub, or from --data-dir in the same schema (see
mmkd_ds/evaluation/classification.py and qa.py for the layout). One process trains with plain
torch; under the `deepspeed` launcher (or with --deepspeed_config) the ranks fine-tune
data-parallel through DeepSpeed with the same global batch (mmkd_ds/evaluation/finetune.py),
and rank 0 prints and writes the results.

retrieval: Tatoeba-style nearest-neighbour accuracy of each held-out translation among the
English sentences and back, per language, on `data.heldout` of the config (default: the
bundled sample's held-out split). Writes JSON and a markdown table when --out is given. With
--baseline, the baseline model is evaluated too and a before/after table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from mmkd_ds.cli.arguments import (
    HelpFormatter,
    add_config_arguments,
    config_epilog,
    print_config,
    require_arguments,
)
from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS

TASKS = ("retrieval", "xnli", "pawsx", "xquad")

DESCRIPTION = """\
Evaluate an encoder (a Hugging Face model directory or hub name) on held-out data.

Tasks:
  retrieval  nearest-neighbour accuracy of each held-out translation among the English sentences
             and back, per language; the pairs are data.heldout of --config (without --config: the
             bundled sample's held-out split, in de, fr, sw and ur), or with --bitext DIR the MTEB
             Tatoeba / BUCC files under DIR (as the mteb package caches them), offline
  xnli, pawsx, xquad  zero-shot cross-lingual transfer: fine-tune on the English training data,
             test on every language of --languages (data from the Hugging Face hub or --data-dir)

Examples:
  mmkd-eval --task retrieval --model runs/demo/distill/student --baseline runs/demo/student-init \\
      --config configs/demo.yaml --out runs/demo/eval
  mmkd-eval --task retrieval --model runs/demo/distill/student \
      --bitext ~/.cache/huggingface/hub/datasets--mteb--tatoeba-bitext-mining --languages deu,swh,urd
  mmkd-eval --task xnli --model DIR --languages en,de,sw,ur --data-dir data/xnli --out DIR
  deepspeed --num_gpus 8 launchers/evaluate.py --task xquad --model DIR --languages en,de,ar \\
      --deepspeed_config ds_configs/zero2.json       # data-parallel fine-tuning, rank 0 writes

Outputs: the table and a summary line on the terminal; with --out DIR also
  retrieval:          retrieval.json, retrieval.md (and retrieval_baseline.json with --baseline)
  xnli, pawsx, xquad: <task>.json, <task>.md and tensorboard/
"""

EXIT_CODES = """\
Exit codes:
  0  done
  2  bad arguments or input (config, held-out pairs, model directory, data, languages)
  1  any other failure (a traceback)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd-eval", description=DESCRIPTION,
                                     epilog=EXIT_CODES + "\n" + config_epilog("mmkd-eval"),
                                     formatter_class=HelpFormatter)
    # --task and --model are checked after --print-config, which needs neither.
    parser.add_argument("--task", choices=TASKS, help="what to evaluate (required; see Tasks above)")
    parser.add_argument("--model", help="the encoder: Hugging Face model directory or hub name (required)")
    add_config_arguments(parser, "YAML run config whose data.heldout are the retrieval pairs (default: the "
                                 "bundled sample's held-out split)")
    parser.add_argument("--pooling", choices=SENTENCE_POOLINGS, default=None,
                        help="retrieval: the sentence vector, the [CLS] state or the mean of the token states "
                             "(default: loss.sentence_pooling of --config, the one the student was trained with; "
                             "without --config, cls)")
    parser.add_argument("--bitext", metavar="DIR",
                        help="retrieval: the pairs are the MTEB bitext files (Tatoeba, BUCC; test split) under DIR, "
                             "e.g. the Hugging Face cache of mteb/tatoeba-bitext-mining, instead of data.heldout; "
                             "--languages keeps only those codes, as MTEB spells them (deu, swh)")
    parser.add_argument("--out", metavar="DIR", help="directory for the result files (see Outputs); none: print only")
    parser.add_argument("--label", default="", help="name shown in the summary line (default: --model)")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="retrieval: a second model to compare with (e.g. the student before distillation)")
    transfer = parser.add_argument_group("xnli / pawsx / xquad")
    transfer.add_argument("--languages", default="",
                          help="comma-separated test languages, English included (required); with "
                               "--task retrieval --bitext: the language codes to keep (default: all)")
    transfer.add_argument("--data-dir", metavar="DIR", help="local data in the hub schema, for offline clusters")
    transfer.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs over the English training data")
    transfer.add_argument("--lr", type=float, default=None, help="default 2e-5 (classification), 3e-5 (QA)")
    transfer.add_argument("--batch-size", type=int, default=None, help="global batch; default 32 (classification), 16 (QA)")
    transfer.add_argument("--seed", type=int, default=42,
                          help="seed of the new task head, the data order and the --max-*-examples subsets")
    transfer.add_argument("--max-length", type=int, default=None, help="tokens per input; default 128 (classification), 256 (QA)")
    transfer.add_argument("--doc-stride", type=int, default=None, help="QA: tokens shared by consecutive context windows (default 64)")
    transfer.add_argument("--max-train-examples", type=int, default=None, metavar="N",
                          help="fine-tune on a seeded random subset of N English examples (default: all)")
    transfer.add_argument("--max-eval-examples", type=int, default=None, metavar="N",
                          help="test on the first N examples per language (default: all)")
    transfer.add_argument("--deepspeed_config", metavar="JSON", help="DeepSpeed JSON (ZeRO stage); implied by a multi-rank launch")
    transfer.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.print_config:
        return print_config("mmkd-eval", args.config, overrides)
    require_arguments(parser, args, "--task", "--model")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model says nothing here
    if args.task != "retrieval":
        return run_transfer(args)

    from mmkd_ds.config import ConfigError, load_config
    from mmkd_ds.data.corpus import CorpusError, build_heldout
    from mmkd_ds.evaluation.retrieval import evaluate_retrieval, load_encoder

    low_resource = ("sw", "ur")
    try:
        cfg = load_config(args.config, overrides)
        if args.bitext:
            from mmkd_ds.evaluation.bitext import read_bitext

            bitext = read_bitext(args.bitext, args.languages.split(",") if args.languages else None)
            pairs, low_resource = bitext.pairs, ("sw", "ur", "swh", "urd")  # MTEB spells them swh, urd
        else:
            pairs = build_heldout(cfg.data).pairs
    except (ConfigError, CorpusError, FileNotFoundError, ValueError) as exc:
        print(f"mmkd-eval: {exc}", file=sys.stderr)
        return 2
    if not pairs:
        print("mmkd-eval: no held-out pairs (set data.heldout)", file=sys.stderr)
        return 2
    # Said before the models load and the search runs (seconds to minutes, nothing else printed).
    sources = ", ".join(src.path or src.hf_name for src in cfg.data.heldout)
    default = " (no --config: data.heldout's default, the bundled sample)" if args.config is None else ""
    if args.bitext:
        sources, default = f"{len(bitext.files)} MTEB bitext files under {args.bitext}", ""
    print(f"mmkd-eval: retrieval on {pair_counts(pairs)} from {sources}{default}", flush=True)
    from mmkd_ds.model_source import ModelSourceError

    try:
        model, tokenizer = load_encoder(args.model, "--model")
        baseline_encoder = load_encoder(args.baseline, "--baseline") if args.baseline else None
    except ModelSourceError as exc:
        print(f"mmkd-eval: {exc}", file=sys.stderr)
        return 2
    pooling = args.pooling or cfg.loss.sentence_pooling
    result = evaluate_retrieval(model, tokenizer, pairs, pooling=pooling, low_resource=low_resource)
    baseline = None
    if baseline_encoder is not None:
        baseline = evaluate_retrieval(*baseline_encoder, pairs, pooling=pooling, low_resource=low_resource)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(result.to_json())
        # With --baseline: the before/after table the terminal shows, then --model's own table.
        (out / "retrieval.md").write_text(result.to_markdown() if baseline is None
                                          else comparison_table(baseline, result) + "\n\n" + result.to_markdown())
        if baseline is not None:
            (out / "retrieval_baseline.json").write_text(baseline.to_json())
    if baseline is None:
        print(result.to_markdown())
    else:
        print(comparison_table(baseline, result))
    print(f"eval {args.label or args.model}: {result.summary()}")
    return 0


def pair_counts(pairs) -> str:
    """``"240 held-out pairs (de 60, fr 60, sw 60, ur 60)"``: how many pairs of each language."""
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.lang] = counts.get(pair.lang, 0) + 1
    return f"{len(pairs)} held-out pairs ({', '.join(f'{lang} {n}' for lang, n in sorted(counts.items()))})"


def run_transfer(args) -> int:
    """Fine-tune on English, test on every language; print and write the per-language table."""
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    if not languages:
        print("mmkd-eval: --languages is required for this task (e.g. en,de,sw,ur)", file=sys.stderr)
        return 2
    kwargs = {"epochs": args.epochs, "seed": args.seed, "max_train_examples": args.max_train_examples,
              "max_eval_examples": args.max_eval_examples}
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    if args.doc_stride is not None:
        if args.task != "xquad":
            print("mmkd-eval: --doc-stride applies to --task xquad only", file=sys.stderr)
            return 2
        kwargs["doc_stride"] = args.doc_stride
    if args.deepspeed_config is not None:
        kwargs["deepspeed_config"] = args.deepspeed_config
    try:
        if args.task == "xquad":
            from mmkd_ds.evaluation.qa import finetune_and_evaluate_qa

            result = finetune_and_evaluate_qa(args.model, languages, args.data_dir, **kwargs)
        else:
            from mmkd_ds.evaluation.classification import finetune_and_evaluate

            result = finetune_and_evaluate(args.task, args.model, languages, args.data_dir, **kwargs)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Data and settings are checked before any collective, so every rank fails alike.
        print(f"mmkd-eval: {exc}", file=sys.stderr)
        return 2
    except BaseException:  # noqa: BLE001 - a failing rank must end the job, not leave the others blocked
        from mmkd_ds.distributed import abort

        abort(f"mmkd-eval: rank {os.environ.get('RANK', '0')} failed:\n{traceback.format_exc()}", 1)
    from mmkd_ds.distributed import process_place, shutdown

    if process_place().is_main:
        if args.out:
            result.write(args.out)
        print(result.to_markdown())
        low = result.low_resource_average
        print(f"eval {args.task} {args.label or args.model}: average {result.main_metric} {100 * result.average:.1f}"
              + (f", low-resource {100 * low:.1f}" if low is not None else ""), flush=True)
    shutdown()  # the other ranks wait for rank 0's outputs, then all leave together
    return 0


def comparison_table(before, after) -> str:
    """Markdown: per language, the mean of both directions before and after, and the change."""
    lines = ["| language | pairs | before | after | change |", "| --- | ---: | ---: | ---: | ---: |"]

    def both(r: dict) -> float:
        return 100 * (r["xx2en"] + r["en2xx"]) / 2

    for lang, r in after.per_language.items():
        b = before.per_language.get(lang)
        if b is None:
            continue
        lines.append(f"| {lang} | {r['pairs']} | {both(b):.1f}% | {both(r):.1f}% | {both(r) - both(b):+.1f} |")
    lines.append(f"| average | | {100 * before.average:.1f}% | {100 * after.average:.1f}% | {100 * (after.average - before.average):+.1f} |")
    if after.low_resource_average is not None and before.low_resource_average is not None:
        lines.append(
            f"| low-resource | | {100 * before.low_resource_average:.1f}% | {100 * after.low_resource_average:.1f}% "
            f"| {100 * (after.low_resource_average - before.low_resource_average):+.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
