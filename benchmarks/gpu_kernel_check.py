#!/usr/bin/env python
"""The Triton kernels on a real GPU (not the interpreter) against their torch references.

    python benchmarks/gpu_kernel_check.py --out DIR     # CUDA: every case; exit 1 on a failure
    python benchmarks/gpu_kernel_check.py --dry-run     # no GPU: list the cases, run nothing

structure_kl: inputs fp32 / bf16 / fp16, D in {64, 128, 384, 768, 1000, 4096} (1000: odd width,
padded rows), separate columns or not, each precision (ieee / tf32 / bf16); loss and gradients
against the fp64 formula, with the error bounds of tests/test_structure_kl.py's precision test
widened by the input dtype's own rounding. word_pool: fp32 / bf16 / fp16, mean and first,
against word_pool_reference. Writes gpu_kernel_check.json (every error measured) to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Relative error bounds (loss, max |grad err| / max |grad|) per dot precision, fp32 inputs.
BOUNDS = {"ieee": (1e-5, 1e-4), "tf32": (1e-3, 5e-3), "bf16": (1e-2, 5e-2)}
# The fp64 reference sees the same rounded inputs, so the input dtype only adds the rounding
# of the fp32 gradient to that dtype.
GRAD_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fp64_structure(s, t, sc, tc, tau):
    s = s.detach().double().requires_grad_()
    sc_ = None if sc is None else sc.detach().double().requires_grad_()
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    cols_s = s if sc_ is None else sc_
    cols_t = t if tc is None else tc
    log_p_s = (unit(s) @ unit(cols_s).T / tau).log_softmax(1)
    log_p_t = (unit(t.double()) @ unit(cols_t.double()).T / tau).log_softmax(1)
    loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    loss.backward()
    return loss.item(), s.grad, (None if sc_ is None else sc_.grad)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def structure_cases():
    for dtype in DTYPES:
        for d in (64, 128, 384, 768, 1000, 4096):
            for separate in (False, True):
                for precision in ("ieee", "tf32", "bf16"):
                    yield dict(dtype=dtype, d=d, separate=separate, precision=precision)


def check_structure(case, device):
    skl = importlib.import_module("mmkd_ds.kernels.structure_kl")
    g = torch.Generator().manual_seed(case["d"])
    n, m, d, tau = case.get("n", 300), case.get("m", 200), case["d"], 0.05
    dtype = DTYPES[case["dtype"]]
    centres = torch.randn(6, d, generator=g)
    t = (centres[torch.arange(n) % 6] + 0.4 * torch.randn(n, d, generator=g)).to(dtype)
    s = (centres[torch.arange(n) % 6] + 0.8 * torch.randn(n, d, generator=g)).to(dtype)
    sc = tc = None
    if case["separate"]:
        sc = (centres[torch.arange(m) % 6] + 0.8 * torch.randn(m, d, generator=g)).to(dtype)
        tc = (centres[torch.arange(m) % 6] + 0.4 * torch.randn(m, d, generator=g)).to(dtype)
    ref = fp64_structure(s.float(), t.float(), None if sc is None else sc.float(), None if tc is None else tc.float(), tau)
    xs = s.to(device).requires_grad_()
    xsc = None if sc is None else sc.to(device).requires_grad_()
    loss = skl.structure_kl(
        xs, t.to(device), tau, student_cols=xsc, teacher_cols=None if tc is None else tc.to(device),
        backend="triton", precision=case["precision"],
    )  # fmt: skip
    loss.backward()
    _sync(device)
    loss_err = abs(loss.item() - ref[0]) / ref[0]
    grad_err = ((xs.grad.double().cpu() - ref[1]).abs().max() / ref[1].abs().max()).item()
    if xsc is not None:
        grad_err = max(grad_err, ((xsc.grad.double().cpu() - ref[2]).abs().max() / ref[2].abs().max()).item())
    lb, gb = BOUNDS[case["precision"]]
    ok = loss_err < lb and grad_err < gb + GRAD_ROUNDING[dtype]
    return dict(case, op="structure_kl", loss_rel_err=loss_err, grad_rel_err=grad_err, ok=ok)


def word_pool_cases():
    for dtype in DTYPES:
        for d in (64, 768, 1000):
            for pooling in ("mean", "first"):
                yield dict(dtype=dtype, d=d, pooling=pooling)


def check_word_pool(case, device):
    wp = importlib.import_module("mmkd_ds.kernels.word_pool")
    g = torch.Generator().manual_seed(case["d"])
    b, length, w = case.get("b", 16), case.get("length", 128), case.get("w", 80)
    dtype = DTYPES[case["dtype"]]
    ids = torch.cumsum(torch.rand(b, length, generator=g) < 0.75, dim=1) - 1
    ids[:, 0] = -1
    ids[:, -5:] = -1
    ids = ids.clamp(max=w - 1)
    h = torch.randn(b, length, case["d"], generator=g).to(dtype)
    up = torch.randn(b, w, case["d"], generator=g).to(dtype)
    ref_h = h.clone().requires_grad_()
    ref, ref_counts = wp.word_pool_reference(ref_h, ids, w, case["pooling"])
    (ref.float() * up.float()).sum().backward()
    x = h.to(device).requires_grad_()
    out, counts = wp.word_pool(x, ids.to(device), w, case["pooling"], backend="triton")
    (out.float() * up.to(device).float()).sum().backward()
    _sync(device)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    out_err = ((out.float().cpu() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    grad_err = ((x.grad.float().cpu() - ref_h.grad.float()).abs().max() / ref_h.grad.float().abs().max()).item()
    ok = out_err <= tol and grad_err <= tol and torch.equal(counts.cpu(), ref_counts)
    return dict(case, op="word_pool", out_rel_err=out_err, grad_rel_err=grad_err, ok=ok)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="list the cases; needs no GPU")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a few small cases on CPU through the Triton interpreter (checks this script)")
    args = p.parse_args()
    cases = [("structure_kl", c) for c in structure_cases()] + [("word_pool", c) for c in word_pool_cases()]
    if args.cpu_smoke:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke needs TRITON_INTERPRET=1")
        small = dict(n=24, m=16, b=2, length=24, w=10)
        cases = [(op, dict(c, **small)) for op, c in cases if c["d"] == 64 and c.get("separate", True)]
    if args.dry_run:
        for op, c in cases:
            print(op, c)
        print(f"{len(cases)} cases")
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    rows, started = [], time.monotonic()
    for op, c in cases:
        try:
            row = (check_structure if op == "structure_kl" else check_word_pool)(c, device)
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            row = dict(c, op=op, ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        capability=list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
        torch=torch.__version__, triton=importlib.import_module("triton").__version__,
        cases=len(rows), failed=sum(not r["ok"] for r in rows), seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    print(json.dumps(summary))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_kernel_check.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
