"""`mmkd-init-student`: a fresh small multilingual student for offline runs and the demo.

Trains a WordPiece vocabulary on both sides of the run's corpus and writes a randomly
initialised BERT masked-LM with it (``save_pretrained``), so training loads it through the
ordinary ``from_pretrained`` path. On a cluster the student is a hub model instead
(``student.name: bert-base-multilingual-cased``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkd-init-student", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (its data.sources are the vocabulary's corpus)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from mmkd_ds.config import load_config
    from mmkd_ds.data.corpus import build_corpus
    from mmkd_ds.student_tokenizer import train_wordpiece

    cfg = load_config(args.config, overrides)
    pairs = build_corpus(cfg.data).pairs
    tokenizer = train_wordpiece((t for p in pairs for t in (p.en, p.xx)), vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(args.out)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"init-student: {out} (vocabulary {len(tokenizer)} from {len(pairs)} pairs, "
          f"hidden {args.hidden}, {args.layers} layers, {sum(p.numel() for p in BertForMaskedLM(config).parameters()) / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
