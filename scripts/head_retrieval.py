#!/usr/bin/env python
"""Retrieval in the sentence head's space: does the sentence-level objective learn?

The exported student is judged by retrieval with its raw [CLS] (`mmkd-eval --task retrieval`).
That is not what the sentence-level loss trains: it trains z(x) = q(g(S(x)[CLS])) to predict
the teacher's target z'(e) = g_T(T(e)[CLS]). This script loads a training checkpoint (student
and heads) and, per language, matches each translation's z(x) against the teacher targets z'(e)
of that language's pairs (cosine nearest neighbour, as `mmkd-eval`): the fraction of x whose
nearest target is its own English sentence's. It prints the raw [CLS] retrieval x -> e of the
same pairs beside it. Chance is 1 / (pairs of the language).

    python scripts/head_retrieval.py --config configs/demo.yaml \\
        --checkpoint runs/demo/distill/checkpoints/step00000150            # held-out pairs
    python scripts/head_retrieval.py --config configs/demo.yaml --pairs train --limit 128 \\
        --checkpoint runs/demo/distill/checkpoints/step00000150            # training pairs

Runs on CPU (or --device cuda); the config's teacher is loaded and run on the English side.
Any --section.key=value argument overrides the config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmkd_ds.config import load_config
from mmkd_ds.data.corpus import build_corpus, build_heldout
from mmkd_ds.data.pairs import Pair
from mmkd_ds.evaluation.retrieval import embed_sentences, retrieval_accuracy
from mmkd_ds.teacher import encode_batch
from mmkd_ds.training.export import consolidated_state_dict
from mmkd_ds.training.loop import build_model, build_online_teacher, build_student
from mmkd_ds.words import split_words


def pick_pairs(cfg, which: str, limit: int) -> dict[str, list[Pair]]:
    """Pairs per language (English identity pairs left out), at most ``limit`` each."""
    pairs = build_heldout(cfg.data).pairs if which == "heldout" else build_corpus(cfg.data).pairs
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        if p.lang != "en" and (limit <= 0 or len(groups.get(p.lang, [])) < limit):
            groups.setdefault(p.lang, []).append(p)
    return {lang: ps for lang, ps in sorted(groups.items()) if len(ps) >= 2}


@torch.no_grad()
def head_and_raw_accuracy(model, tokenizer, teacher, pairs: list[Pair], device) -> tuple[float, float]:
    """(z(x) -> z'(e) accuracy, raw student sentence vector x -> e accuracy) over ``pairs``; the
    sentence vectors pooled as the run trained them (loss.sentence_pooling, teacher.sentence)."""
    feats = []
    for start in range(0, len(pairs), 64):
        feats += encode_batch(teacher, [split_words(p.en) for p in pairs[start:start + 64]])
    teacher_cls = torch.stack([f.cls.float() for f in feats]).to(device)
    pooling = model.loss_cfg.sentence_pooling
    sx = embed_sentences(model.student, tokenizer, [p.xx for p in pairs], pooling=pooling, device=device).to(device)
    se = embed_sentences(model.student, tokenizer, [p.en for p in pairs], pooling=pooling, device=device).to(device)
    z_x, z_teacher = model.sentence_heads(sx, teacher_cls)
    return retrieval_accuracy(z_x, z_teacher), retrieval_accuracy(sx, se)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", type=Path, help="a checkpoint directory: OUT_DIR/checkpoints/stepNNNNNNNN")
    where.add_argument("--init", action="store_true",
                       help="no checkpoint: the student of student.name with the heads as training initialises them")
    parser.add_argument("--pairs", choices=("heldout", "train"), default="heldout",
                        help="data.heldout (default) or the training corpus")
    parser.add_argument("--limit", type=int, default=0, help="at most this many pairs per language (0: all)")
    parser.add_argument("--device", default="cpu")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.loss.sentence_weight <= 0:
        print("head_retrieval: loss.sentence_weight is 0: the run has no sentence head", file=sys.stderr)
        return 2
    ckpt = args.checkpoint.resolve() if args.checkpoint else None
    if ckpt and not (ckpt / "mp_rank_00_model_states.pt").is_file():
        print(f"head_retrieval: {ckpt} is not a checkpoint directory (no mp_rank_00_model_states.pt)", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    teacher = build_online_teacher(cfg, device)
    torch.manual_seed(cfg.train.seed)  # then student and heads, as train() makes them
    student, tokenizer = build_student(cfg)
    model = build_model(cfg, student, teacher.hidden_size)
    if ckpt:
        model.load_state_dict(consolidated_state_dict(ckpt.parent, ckpt.name), strict=True)
    model.to(device).eval()  # BatchNorm with the running statistics of training, no dropout

    groups = pick_pairs(cfg, args.pairs, args.limit)
    if not groups:
        print(f"head_retrieval: no {args.pairs} pairs (at least 2 per language)", file=sys.stderr)
        return 2
    print(f"| language | pairs | chance | sentence head z(x) -> z'(e) | raw [CLS] x -> e |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for lang, ps in groups.items():
        head, raw = head_and_raw_accuracy(model, tokenizer, teacher, ps, device)
        print(f"| {lang} | {len(ps)} | {100 / len(ps):.1f}% | {100 * head:.1f}% | {100 * raw:.1f}% |")
    print(f"head_retrieval: {args.pairs} pairs, " + (f"checkpoint {ckpt}" if ckpt else "heads at initialisation"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
