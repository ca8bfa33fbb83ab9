#!/usr/bin/env python
"""Benchmark the mmkd-ds Triton kernels against plain torch (Liger-Kernel style).

Two ops, each measured as forward + backward (the cost a training step pays):

* structure_kl  (mmkd_ds.kernels.structure_kl)
    eager    a plain torch function that materialises the N x N matrices (normalize, matmul,
             log_softmax, KL), the same computation as mmkd_ds/losses/structure.py
    compile  torch.compile of that same eager function
    triton   structure_kl(..., backend="triton")
    grid     N in {1024, 4096, 16384, 65536} x D in {128, 768}; OOM is caught per cell.

* word_pool  (mmkd_ds.kernels.word_pool), BERT-like shape B=256, L=128, D=768, ~0.75 words
  per content token
    eager    word_pool_reference (scatter / index_add)
    compile  torch.compile(word_pool_reference)
    triton   word_pool(..., backend="triton")
  plus the forward alone, and the achieved bandwidth of the Triton forward against the device's
  peak (--peak-gbps; defaults known for H100 SXM and H200).

Timing: warm-up calls first (they include torch.compile / Triton JIT; the first call's time is
recorded separately), then the median over repeats. On CUDA each repeat is bracketed by CUDA
events after a 256 MiB L2 flush that is not timed; on CPU by time.perf_counter. A per-cell time
budget caps the number of repeats (never fewer than --min-reps). Peak memory (CUDA only) is
torch.cuda.max_memory_allocated during one extra call minus the memory allocated just before it
(inputs excluded, the new gradient included).

Modes:
    python benchmarks/kernels.py                 # on a CUDA machine: everything, full sizes
    python benchmarks/kernels.py --cpu-smoke     # no GPU: the torch rows at small sizes, end to end

Output: a table on stdout and, under --out (default benchmarks/results),
kernels-<device-slug>.json (every measurement, device, versions, date, command line) and
kernels-<device-slug>.md. A cell that was not measured says so; nothing is estimated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import importlib
import inspect
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import device_slug, write_results  # noqa: E402

# kernels/__init__.py re-exports functions named like the modules, so import the modules by name.
SKL = importlib.import_module("mmkd_ds.kernels.structure_kl")
WP = importlib.import_module("mmkd_ds.kernels.word_pool")

try:
    import triton

    TRITON_VERSION: str | None = triton.__version__
except ImportError:  # pragma: no cover - CPU-only installs
    TRITON_VERSION = None

IMPLS = ("eager", "compile", "triton")
NOT_RUN_NO_GPU = "not run (no GPU)"

#: Peak HBM bandwidth (GB/s, 1e9 bytes/s) of devices the script recognises by name.
#: H100 SXM5 (HBM3) 3.35 TB/s; H200 4.8 TB/s. Anything else: pass --peak-gbps.
KNOWN_PEAK_GBPS: tuple[tuple[str, str, float], ...] = (
    (r"H200", "H200", 4800.0),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 3350.0),
)

TARGETS_TEXT = {
    "structure_kl_speed": "structure_kl fwd+bwd >= 3x faster than eager at N=16384, D=128",
    "structure_kl_memory": "structure_kl peak memory <= 10% of eager at N=16384, D=128",
    "structure_kl_64k": "structure_kl runs at N=65536 where eager OOMs",
    "word_pool_speed": "word_pool fwd+bwd >= 2x the scatter baseline (word_pool_reference)",
    "word_pool_bandwidth": "word_pool Triton forward >= 60% of peak memory bandwidth",
}


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def structure_kl_eager(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0, eps: float = 1e-12):
    """Plain torch structure loss; materialises the [N, N] matrices (as mmkd_ds/losses/structure.py).

    eps is F.normalize's default, the one the kernel uses by default (losses/structure.py passes
    1e-8; the two only differ for rows of norm < 1e-8, which random inputs do not have).
    """
    u = F.normalize(student.float(), dim=-1, eps=eps)
    v = F.normalize(teacher.detach().float(), dim=-1, eps=eps)
    log_p_s = (u @ u.T / tau).log_softmax(dim=-1)
    log_p_t = (v @ v.T / tau).log_softmax(dim=-1)
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl_rows.sum() / max(student.shape[0], 1)


def _has_param(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def structure_kl_triton_fn(precision: str | None = None) -> tuple[Callable | None, str | None]:
    """The Triton structure_kl; ``precision`` (ieee | tf32 | bf16) of its dots, None = its default."""
    if not _has_param(SKL.structure_kl, "backend"):
        return None, "not available (structure_kl has no backend argument)"
    if precision is None:
        return (lambda s, t, tau: SKL.structure_kl(s, t, tau, backend="triton")), None
    if not _has_param(SKL.structure_kl, "precision"):
        return None, "not available (structure_kl has no precision argument)"
    return (lambda s, t, tau: SKL.structure_kl(s, t, tau, backend="triton", precision=precision)), None


def word_pool_triton_fn() -> tuple[Callable | None, str | None]:
    """The Triton word_pool, however far its backend argument has got."""
    if _has_param(WP.word_pool, "backend"):
        return (lambda h, ids, w, pooling: WP.word_pool(h, ids, w, pooling, backend="triton")), None
    if hasattr(WP, "WordPoolFunction"):
        return (lambda h, ids, w, pooling: WP.WordPoolFunction.apply(h, ids, int(w), pooling)), None
    return None, "not available (word_pool has no backend argument and no WordPoolFunction)"


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class Timer:
    """Median-of-repeats timing; CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int, min_reps: int, budget_s: float):
        self.device = device
        self.warmup, self.reps, self.min_reps, self.budget_s = warmup, reps, min_reps, budget_s
        self._flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if self._flush_buf is not None:
            self._flush_buf.zero_()

    def _one(self, fn: Callable[[], Any]) -> float:
        """One timed call in ms."""
        self.flush_l2()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        self.sync()
        first_ms = self._one(fn)  # includes compilation / JIT: reported, never part of the median
        t_start = time.perf_counter()
        for _ in range(max(self.warmup - 1, 0)):
            if time.perf_counter() - t_start > self.budget_s / 2:
                break
            self._one(fn)
        times: list[float] = []
        t_start = time.perf_counter()
        for i in range(self.reps):
            times.append(self._one(fn))
            if i + 1 >= self.min_reps and time.perf_counter() - t_start > self.budget_s:
                break
        return {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "max_ms": max(times),
            "reps": len(times),
            "first_call_ms": first_ms,
        }

    def peak_memory(self, fn: Callable[[], Any], before: Callable[[], None]) -> tuple[int | None, Any]:
        """(peak bytes above the baseline during one call, fn's return). CPU: (None, result)."""
        before()
        if self.device.type != "cuda":
            return None, fn()
        gc.collect()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.sync()
        return int(torch.cuda.max_memory_allocated(self.device) - base), out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemoryerror" in text


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_cell(timer: Timer, step: Callable[[], Any], reset: Callable[[], None], value: Callable[[Any], float]):
    """Time ``step`` and measure its peak memory; OOM and other errors become the cell's status."""
    cell: dict[str, Any] = {"status": "ok"}
    try:
        cell.update(timer.time(step))
        peak, out = timer.peak_memory(step, reset)
        cell["peak_mem_bytes"] = peak
        cell["value"] = value(out)
    except Exception as exc:  # noqa: BLE001 - one cell's failure must not end the run
        cell = {"status": "OOM" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    reset()
    cleanup(timer.device)
    return cell


def new_compiled(fn: Callable) -> Callable:
    """A fresh torch.compile of ``fn`` with static shapes (each cell compiles its own graph)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------------------------
# structure_kl
# --------------------------------------------------------------------------------------------


def bench_structure_kl(args, device: torch.device, timer: Timer, run_triton: bool, log) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    triton_fn, triton_missing = structure_kl_triton_fn(args.precision)
    rows = []
    for d in args.d:
        for n in args.n:
            gen = torch.Generator(device="cpu").manual_seed(args.seed + n + d)
            student = torch.randn(n, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
            student.requires_grad_(True)
            teacher = torch.randn(n, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

            def reset() -> None:
                student.grad = None

            def make_step(f: Callable) -> Callable[[], torch.Tensor]:
                def step() -> torch.Tensor:
                    student.grad = None
                    loss = f(student, teacher, args.tau)
                    loss.backward()
                    return loss.detach()

                return step

            cells: dict[str, dict[str, Any]] = {}
            for impl in args.impls:
                log(f"structure_kl N={n} D={d} {impl} ...")
                if impl == "eager":
                    cells[impl] = run_cell(timer, make_step(structure_kl_eager), reset, float)
                elif impl == "compile":
                    try:
                        compiled = new_compiled(structure_kl_eager)
                    except Exception as exc:  # noqa: BLE001
                        cells[impl] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                        continue
                    cells[impl] = run_cell(timer, make_step(compiled), reset, float)
                    del compiled
                    torch._dynamo.reset()
                elif not run_triton:
                    cells[impl] = {"status": NOT_RUN_NO_GPU}
                elif triton_fn is None:
                    cells[impl] = {"status": triton_missing}
                else:
                    cells[impl] = run_cell(timer, make_step(triton_fn), reset, float)
                log(f"structure_kl N={n} D={d} {impl}: {describe_time(cells[impl])}")
            del student, teacher
            cleanup(device)
            rows.append({"op": "structure_kl", "N": n, "D": d, "dtype": args.dtype, "tau": args.tau,
                         "precision": args.precision or getattr(SKL, "DEFAULT_PRECISION", "ieee"), "cells": cells,
                         **derived(cells)})
    return rows


# --------------------------------------------------------------------------------------------
# word_pool
# --------------------------------------------------------------------------------------------


def bert_like_word_ids(batch: int, length: int, words_per_token: float, seed: int) -> tuple[torch.Tensor, int]:
    """[B, L] int64 word ids like a BERT batch: [CLS] -1, content tokens, [SEP] -1, padding -1.

    Sentence lengths (with [CLS]/[SEP]) are uniform in [L/2, L]; each content token after the
    first starts a new word with probability ``words_per_token`` (else it continues the word).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(max(length // 2, 3), length + 1, (batch,), generator=gen)
    pos = torch.arange(length)[None, :]
    content = (pos >= 1) & (pos < lengths[:, None] - 1)
    starts = (torch.rand(batch, length, generator=gen) < words_per_token) & content
    starts[:, 1] = content[:, 1]
    ids = torch.where(content, starts.long().cumsum(dim=1) - 1, torch.full_like(lengths[:, None], -1))
    n_words = int(ids.max()) + 1
    return ids, n_words


def profile_kernel_time_ms(fn: Callable[[], Any], name_part: str, calls: int, timer: Timer) -> tuple[float | None, str]:
    """Mean device time (ms) of the CUDA kernels whose name contains ``name_part``, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    timer.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            timer.flush_l2()
            fn()
        timer.sync()
    total_us, count = 0.0, 0
    for ev in prof.events():
        # Device-side kernel events only (their time range is the kernel's execution on the GPU).
        if name_part in ev.name and not str(getattr(ev, "device_type", "CPU")).endswith("CPU"):
            total_us += float(ev.time_range.elapsed_us())
            count += 1
    if count == 0:
        return None, f"no CUDA kernel named *{name_part}* in the profile"
    return total_us / count / 1e3, f"{count} launches profiled"


def bench_word_pool(args, device: torch.device, timer: Timer, run_triton: bool, log) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    B, L, D = args.wp_shape
    ids_cpu, n_words = bert_like_word_ids(B, L, args.words_per_token, args.seed)
    ids = ids_cpu.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    hidden = torch.randn(B, L, D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(B, n_words, D, generator=gen).to(device=device, dtype=dtype)
    n_content = int((ids_cpu >= 0).sum())
    es = hidden.element_size()
    # Bytes the forward must move: the hidden rows of real tokens (padding / special rows need
    # not be read), the ids (as int32, what the kernel reads), pooled out and counts (int64) out.
    bytes_min = n_content * D * es + B * L * 4 + B * n_words * D * es + B * n_words * 8
    # The same, reading every hidden row (padding included).
    bytes_full = B * L * D * es + B * L * 4 + B * n_words * D * es + B * n_words * 8
    info = {
        "op": "word_pool", "B": B, "L": L, "D": D, "W": n_words, "dtype": args.dtype, "pooling": "mean",
        "content_tokens": n_content, "words": int((ids_cpu.max(dim=1).values + 1).clamp(min=0).sum()),
        "forward_bytes_min": bytes_min, "forward_bytes_full": bytes_full,
        "bytes_formula": "min: content-token hidden rows + ids as int32 + pooled + counts(int64); "
                         "full: all B*L hidden rows instead of the content rows",
    }
    info["words_per_content_token"] = info["words"] / max(n_content, 1)

    triton_fn, triton_missing = word_pool_triton_fn()

    def reset() -> None:
        hidden.grad = None

    def make_step(f: Callable) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            hidden.grad = None
            pooled, _ = f(hidden, ids, n_words, "mean")
            pooled.backward(grad_out)
            return pooled.detach()

        return step

    def make_fwd(f: Callable) -> Callable[[], torch.Tensor]:
        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return f(hidden, ids, n_words, "mean")[0]

        return fwd

    def checksum(out: torch.Tensor) -> float:
        return float(out.double().sum())

    cells: dict[str, dict[str, Any]] = {}
    fwd_cells: dict[str, dict[str, Any]] = {}
    for impl in args.impls:
        log(f"word_pool B={B} L={L} D={D} {impl} ...")
        if impl == "triton" and not run_triton:
            cells[impl] = {"status": NOT_RUN_NO_GPU}
            fwd_cells[impl] = {"status": NOT_RUN_NO_GPU}
            continue
        if impl == "triton" and triton_fn is None:
            cells[impl] = {"status": triton_missing}
            fwd_cells[impl] = {"status": triton_missing}
            continue
        try:
            f = {"eager": WP.word_pool_reference, "triton": triton_fn}.get(impl) or new_compiled(WP.word_pool_reference)
        except Exception as exc:  # noqa: BLE001
            cells[impl] = fwd_cells[impl] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            continue
        cells[impl] = run_cell(timer, make_step(f), reset, checksum)
        fwd_cells[impl] = run_cell(timer, make_fwd(f), reset, checksum)
        fc = fwd_cells[impl]
        if fc["status"] == "ok":
            fc["gbps_min"] = bytes_min / (fc["median_ms"] * 1e-3) / 1e9
            fc["gbps_full"] = bytes_full / (fc["median_ms"] * 1e-3) / 1e9
        if impl == "triton" and fc["status"] == "ok" and device.type == "cuda":
            try:
                k_ms, note = profile_kernel_time_ms(make_fwd(f), "word_pool_fwd", 20, timer)
            except Exception as exc:  # noqa: BLE001
                k_ms, note = None, f"profiler failed: {type(exc).__name__}: {exc}"
            fc["kernel_ms"] = k_ms
            fc["kernel_note"] = note
            if k_ms:
                fc["kernel_gbps_min"] = bytes_min / (k_ms * 1e-3) / 1e9
                fc["kernel_gbps_full"] = bytes_full / (k_ms * 1e-3) / 1e9
        if impl == "compile":
            del f
            torch._dynamo.reset()
        log(f"word_pool {impl}: fwd+bwd {describe_time(cells[impl])}, fwd {describe_time(fwd_cells[impl])}")
    del hidden, grad_out, ids
    cleanup(device)
    return {**info, "cells": cells, "forward_cells": fwd_cells, **derived(cells)}


# --------------------------------------------------------------------------------------------
# Derived figures, targets, tables
# --------------------------------------------------------------------------------------------


def derived(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speedup (eager time / triton time) and memory ratio (triton peak / eager peak)."""
    e, t = cells.get("eager", {}), cells.get("triton", {})
    out: dict[str, Any] = {"speedup_triton_vs_eager": None, "mem_ratio_triton_vs_eager": None}
    if e.get("status") == "ok" and t.get("status") == "ok":
        out["speedup_triton_vs_eager"] = e["median_ms"] / t["median_ms"]
        if e.get("peak_mem_bytes") and t.get("peak_mem_bytes") is not None:
            out["mem_ratio_triton_vs_eager"] = t["peak_mem_bytes"] / e["peak_mem_bytes"]
        if e.get("value") is not None and t.get("value") is not None:
            out["value_rel_diff_triton_vs_eager"] = abs(t["value"] - e["value"]) / max(abs(e["value"]), 1e-30)
    c = cells.get("compile", {})
    if e.get("status") == "ok" and c.get("status") == "ok" and e.get("value") is not None:
        out["value_rel_diff_compile_vs_eager"] = abs(c["value"] - e["value"]) / max(abs(e["value"]), 1e-30)
    return out


def describe_time(cell: dict[str, Any], unit: str = " ms") -> str:
    if cell.get("status") != "ok":
        return cell.get("status", "not measured")
    return f"{cell['median_ms']:.3f}{unit}"


def describe_mem(cell: dict[str, Any]) -> str:
    if cell.get("status") != "ok":
        return cell.get("status", "not measured")
    if cell.get("peak_mem_bytes") is None:
        return "n/a"
    return f"{cell['peak_mem_bytes'] / 2**20:.1f} MiB"


def fmt_ratio(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}x"


def evaluate_targets(device_name: str, sk_rows, wp, peak_gbps: float | None) -> dict[str, dict[str, str]]:
    """Whether each target of the issue was met, on an H100/H200 only; "not measured" otherwise."""
    res = {k: {"target": v, "status": "not measured"} for k, v in TARGETS_TEXT.items()}
    if not re.search(r"H100|H200", device_name):
        why = f"not measured (targets are for H100/H200; this run: {device_name})"
        for r in res.values():
            r["status"] = why
        return res

    def row(n, d):
        return next((r for r in sk_rows if r["N"] == n and r["D"] == d), None)

    r = row(16384, 128)
    if r is not None:
        sp, mr = r["speedup_triton_vs_eager"], r["mem_ratio_triton_vs_eager"]
        if sp is not None:
            res["structure_kl_speed"]["status"] = f"{'met' if sp >= 3 else 'NOT met'} ({sp:.2f}x)"
        if mr is not None:
            res["structure_kl_memory"]["status"] = f"{'met' if mr <= 0.10 else 'NOT met'} ({100 * mr:.1f}%)"
    big = [r for r in sk_rows if r["N"] == 65536]
    if big:
        tri_ok = all(r["cells"].get("triton", {}).get("status") == "ok" for r in big)
        eager_oom = [r["D"] for r in big if r["cells"].get("eager", {}).get("status") == "OOM"]
        ds = ",".join(str(r["D"]) for r in big)
        if not tri_ok:
            res["structure_kl_64k"]["status"] = f"NOT met (triton did not complete at N=65536 for every D in {ds})"
        elif len(eager_oom) == len(big):
            res["structure_kl_64k"]["status"] = f"met (triton ran, eager OOM, D={ds})"
        else:
            res["structure_kl_64k"]["status"] = (
                f"triton ran at N=65536 (D={ds}); eager OOM only for D={eager_oom or 'none'}, "
                "so 'where eager OOMs' is not shown on this device")
    if wp is not None:
        sp = wp.get("speedup_triton_vs_eager")
        if sp is not None:
            res["word_pool_speed"]["status"] = f"{'met' if sp >= 2 else 'NOT met'} ({sp:.2f}x)"
        fc = wp["forward_cells"].get("triton", {})
        gbps = fc.get("kernel_gbps_min") or fc.get("gbps_min")
        src = "kernel time (profiler)" if fc.get("kernel_gbps_min") else "end-to-end forward"
        if gbps is None:
            pass
        elif not peak_gbps:
            res["word_pool_bandwidth"]["status"] = f"not measured (peak bandwidth unknown: pass --peak-gbps; achieved {gbps:.0f} GB/s)"
        else:
            frac = gbps / peak_gbps
            res["word_pool_bandwidth"]["status"] = (
                f"{'met' if frac >= 0.6 else 'NOT met'} ({gbps:.0f} of {peak_gbps:.0f} GB/s = {100 * frac:.1f}%, {src})")
    return res


def tables(result: dict[str, Any]) -> str:
    """Markdown tables (also what goes to stdout)."""
    out = []
    dev = result["device"]
    out.append(f"# mmkd-ds kernel benchmark: {dev['name']}")
    out.append("")
    out.append(f"- mode: {result['mode']}; date: {result['date']}; torch {result['torch_version']}, "
               f"triton {result['triton_version']}; dtype {result['args']['dtype']}")
    out.append(f"- command: `{result['command']}`")
    out.append(f"- time: median of repeats of forward+backward after warm-up "
               f"({'CUDA events' if dev['type'] == 'cuda' else 'time.perf_counter'}); "
               f"peak memory: {'max_memory_allocated above the inputs' if dev['type'] == 'cuda' else 'n/a on CPU'}")
    if result["mode"] == "cpu-smoke":
        out.append("- CPU smoke run: small sizes, torch rows only; these are not performance figures "
                   "for the kernels. Triton rows: not run (no GPU).")
    out.append("")
    sk = result.get("structure_kl")
    if sk:
        out.append("## structure_kl (forward + backward)")
        out.append("")
        out.append("| N | D | impl | time (ms) | peak mem | speedup vs eager | mem vs eager | loss rel. diff vs eager |")
        out.append("|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in sk:
            for impl in IMPLS:
                if impl not in r["cells"]:
                    continue
                c = r["cells"][impl]
                e = r["cells"].get("eager", {})
                sp = mr = dl = "-"
                if impl != "eager" and c.get("status") == "ok" and e.get("status") == "ok":
                    dl = f"{abs(c['value'] - e['value']) / max(abs(e['value']), 1e-30):.1e}"
                    sp = fmt_ratio(e["median_ms"] / c["median_ms"])
                    if c.get("peak_mem_bytes") is not None and e.get("peak_mem_bytes"):
                        mr = fmt_ratio(c["peak_mem_bytes"] / e["peak_mem_bytes"], pct=True)
                    else:
                        mr = "n/a"
                elif impl != "eager" and c.get("status") == "ok":
                    sp = mr = f"n/a (eager {e.get('status', 'not measured')})"
                out.append(f"| {r['N']} | {r['D']} | {impl} | {describe_time(c, '')} | {describe_mem(c)} | {sp} | {mr} | {dl} |")
        out.append("")
    wp = result.get("word_pool")
    if wp:
        out.append(f"## word_pool (mean; B={wp['B']}, L={wp['L']}, D={wp['D']}, W={wp['W']}, "
                   f"{wp['words_per_content_token']:.2f} words per content token, {wp['dtype']})")
        out.append("")
        out.append("| impl | fwd+bwd (ms) | speedup vs eager | fwd (ms) | fwd GB/s | peak mem (fwd+bwd) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        e = wp["cells"].get("eager", {})
        for impl in IMPLS:
            if impl not in wp["cells"]:
                continue
            c, fc = wp["cells"][impl], wp["forward_cells"][impl]
            sp = "-"
            if impl != "eager" and c.get("status") == "ok" and e.get("status") == "ok":
                sp = fmt_ratio(e["median_ms"] / c["median_ms"])
            gb = f"{fc['gbps_min']:.1f}" if fc.get("gbps_min") is not None else describe_time(fc)
            out.append(f"| {impl} | {describe_time(c, '')} | {sp} | {describe_time(fc, '')} | {gb} | {describe_mem(c)} |")
        out.append("")
        tfc = wp["forward_cells"].get("triton", {})
        peak = result["peak_gbps"]
        if peak["value"]:
            peak_txt = f"{peak['value']:.0f} GB/s ({peak['source']})"
        elif dev["type"] == "cuda":
            peak_txt = f"unknown ({peak['source']})"
        else:
            peak_txt = "n/a on CPU"
        if tfc.get("kernel_ms"):
            frac = f", {100 * tfc['kernel_gbps_min'] / peak['value']:.1f}% of peak" if peak["value"] else ""
            out.append(f"Triton forward kernel alone (torch.profiler): {tfc['kernel_ms'] * 1e3:.1f} us, "
                       f"{tfc['kernel_gbps_min']:.0f} GB/s{frac}. Device peak: {peak_txt}.")
        else:
            out.append(f"Triton forward kernel bandwidth: {tfc.get('kernel_note') or tfc.get('status', 'not measured')}. "
                       f"Device peak: {peak_txt}.")
        out.append(f"GB/s = bytes / median time, bytes = {wp['forward_bytes_min'] / 1e6:.1f} MB "
                   f"({wp['bytes_formula']}; full: {wp['forward_bytes_full'] / 1e6:.1f} MB). "
                   "The fwd column times the public call (input validation, which syncs, included); "
                   "torch.compile of word_pool_reference graph-breaks at that validation (int(word_ids.max())).")
        out.append("")
    out.append("## Targets (from the issue; targets, not results)")
    out.append("")
    out.append("| target | status on this run |")
    out.append("|---|---|")
    for t in result["targets"].values():
        out.append(f"| {t['target']} | {t['status']} |")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on CPU at small sizes (N 256,1024; D 128; word_pool B=8); torch rows only")
    p.add_argument("--ops", nargs="+", choices=("structure_kl", "word_pool"), default=["structure_kl", "word_pool"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--n", type=int, nargs="+", default=None, help="structure_kl N grid (default 1024 4096 16384 65536)")
    p.add_argument("--d", type=int, nargs="+", default=None, help="structure_kl D grid (default 128 768)")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--precision", choices=("ieee", "tf32", "bf16"), default=None,
                   help="structure_kl Triton dots (default: the kernel's DEFAULT_PRECISION)")
    p.add_argument("--wp-shape", type=int, nargs=3, metavar=("B", "L", "D"), default=None,
                   help="word_pool hidden shape (default 256 128 768)")
    p.add_argument("--words-per-token", type=float, default=0.75)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="input dtype of both ops (structure_kl computes in fp32 whatever it is)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5; smoke 2)")
    p.add_argument("--reps", type=int, default=None, help="max timed repeats (default 50; smoke 10)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--cell-budget-s", type=float, default=None,
                   help="stop repeating a cell after this many seconds, min-reps done (default 5; smoke 2)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device peak memory bandwidth in GB/s (default: known for H100 SXM 3350, H200 4800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=str(Path(__file__).resolve().parent / "results"),
                   help="where kernels-<device>.json/.md go (default benchmarks/results); '' to write nothing")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.n = args.n or ([256, 1024] if smoke else [1024, 4096, 16384, 65536])
    args.d = args.d or ([128] if smoke else [128, 768])
    args.wp_shape = tuple(args.wp_shape or ((8, 128, 768) if smoke else (256, 128, 768)))
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 5)
    args.reps = args.reps if args.reps is not None else (10 if smoke else 50)
    args.cell_budget_s = args.cell_budget_s if args.cell_budget_s is not None else (2.0 if smoke else 5.0)
    return args


def resolve_peak(name: str, given: float | None) -> dict[str, Any]:
    if given:
        return {"value": given, "source": "--peak-gbps"}
    for pattern, label, gbps in KNOWN_PEAK_GBPS:
        if re.search(pattern, name):
            return {"value": gbps, "source": f"default for {label}"}
    return {"value": None, "source": "no default for this device: pass --peak-gbps"}


def file_sha256(path: str | None) -> str | None:
    if not path or not os.path.exists(path):
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("kernels.py: no CUDA device. Pass --cpu-smoke to exercise the torch rows on CPU at small "
              "sizes (Triton cannot be benchmarked without a GPU).", file=sys.stderr)
        return 2
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": name, "slug": device_slug(name), "total_memory_bytes": int(props.total_memory),
               "capability": f"{props.major}.{props.minor}", "cuda_version": torch.version.cuda}
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
        dev = {"type": "cpu", "name": name, "slug": "cpu", "cpu_count": os.cpu_count()}
    run_triton = device.type == "cuda"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    # Sanity: the eager baseline computes what the kernel's reference computes.
    s = torch.randn(64, 16, dtype=torch.float64)
    t = torch.randn(64, 16, dtype=torch.float64)
    a = float(structure_kl_eager(s, t, args.tau))
    b = float(SKL.structure_kl_reference(s, t, args.tau))
    if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        raise SystemExit(f"eager baseline disagrees with structure_kl_reference: {a} vs {b}")

    timer = Timer(device, args.warmup, args.reps, args.min_reps, args.cell_budget_s)
    log(f"device: {name}; mode: {'cpu-smoke' if args.cpu_smoke else 'full'}")
    sk_rows = bench_structure_kl(args, device, timer, run_triton, log) if "structure_kl" in args.ops else []
    wp = bench_word_pool(args, device, timer, run_triton, log) if "word_pool" in args.ops else None
    if device.type == "cuda":
        peak = resolve_peak(name, args.peak_gbps)
    else:
        peak = {"value": None, "source": "n/a on CPU"}

    result = {
        "mode": "cpu-smoke" if args.cpu_smoke else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": dev,
        "torch_version": torch.__version__,
        "triton_version": TRITON_VERSION,
        "python_version": platform.python_version(),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "kernel_sources_sha256": {
            "structure_kl.py": file_sha256(getattr(SKL, "__file__", None)),
            "word_pool.py": file_sha256(getattr(WP, "__file__", None)),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timing": {"warmup": args.warmup, "max_reps": args.reps, "min_reps": args.min_reps,
                   "cell_budget_s": args.cell_budget_s,
                   "clock": "cuda events (L2 flushed before each repeat)" if device.type == "cuda" else "time.perf_counter",
                   "statistic": "median"},
        "peak_gbps": peak,
        "structure_kl": sk_rows,
        "word_pool": wp,
    }
    result["targets"] = evaluate_targets(name if device.type == "cuda" else "cpu", sk_rows, wp, peak["value"])
    md = tables(result)
    print(md)

    written = write_results(args.out, f"kernels-{dev['slug']}", result, md)
    cells = [c for r in sk_rows for c in r["cells"].values()] + (list(wp["cells"].values()) if wp else [])
    n_ok = sum(c.get("status") == "ok" for c in cells)
    n_oom = sum(c.get("status") == "OOM" for c in cells)
    n_err = sum(c.get("status") == "error" for c in cells)
    print(f"kernels benchmark on {name}: {n_ok} cells measured, {n_oom} OOM, {n_err} errors, "
          f"{len(cells) - n_ok - n_oom - n_err} not run, {time.perf_counter() - t0:.0f}s"
          + (f"; wrote {', '.join(written)}" if written else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
