"""Every Triton kernel compiles for sm_80 / sm_86 / sm_89 / sm_90 and fits: shared memory within
the target's per-block limit, no register spills. No GPU needed (triton ships ptxas).

The launches are the real ones: ``mmkd_ds.kernels.compile_check.capture_launches`` records what
``structure_kl_forward`` / ``structure_kl_backward`` / ``word_pool_forward`` / ``word_pool_backward``
pass to the kernels when called with meta tensors for each target, so block sizes, warps,
stages, constexprs and argument dtypes come from the launch code, not from this file.

Compiling needs a process where triton was imported without ``TRITON_INTERPRET`` (conftest.py
sets it for the other tests), so the test runs this file as a script in a subprocess. Identical
compilations are done once, and results are cached in ``.compile_cache/`` (gitignored) keyed by
kernel source, specialisation, options, target and triton version; run the script by hand to
see the table: ``python tests/test_kernel_compile.py`` (``--no-cache`` to recompile all).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".compile_cache" / "kernels.json"

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")
HEAD_WIDTHS = (64, 128, 384, 768, 1024, 1000, 4096)  # 1000: odd width (masked last chunk)
N_ROWS = 4096  # rows / columns of the structure loss (the config does not depend on N beyond 64)
WORD_POOL_SHAPE = (8, 128, 64)  # B, L, W


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def collect_launches(target_name: str) -> list[tuple[str, object]]:
    """``(case label, Launch)`` for every kernel launch the code makes on ``target_name``."""
    import torch

    from mmkd_ds.kernels.compile_check import TARGETS as KNOWN
    from mmkd_ds.kernels.compile_check import capture_launches

    skl = importlib.import_module("mmkd_ds.kernels.structure_kl")
    wp = importlib.import_module("mmkd_ds.kernels.word_pool")
    cap = KNOWN[target_name].capability
    out = []
    for d in HEAD_WIDTHS:
        # Input dtype does not reach the structure kernels (they read fp32 normalised copies),
        # the precision of their dots does.
        for precision in skl.PRECISIONS:
            with capture_launches(skl, cap) as launches:
                x = _meta(N_ROWS, d, dtype=torch.bfloat16)
                _, saved = skl.structure_kl_forward(x, x, x, x, 0.05, precision=precision)
                skl.structure_kl_backward(_meta((), dtype=torch.float32), saved, 0.05, False, precision=precision)
            out += [(f"structure_kl D={d} {precision}", launch) for launch in launches]
    b, seq, w = WORD_POOL_SHAPE
    for d in HEAD_WIDTHS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for pooling in ("mean", "first"):
                with capture_launches(wp, cap) as launches:
                    pooled, counts, ids, first = wp.word_pool_forward(
                        _meta(b, seq, d, dtype=dtype), torch.zeros(b, seq, dtype=torch.long), w, pooling
                    )
                    wp.word_pool_backward(_meta(b, w, d, dtype=dtype), ids, counts, first, pooling, (b, seq, d), dtype)
                label = f"word_pool D={d} {str(dtype).removeprefix('torch.')} {pooling}"
                out += [(label, launch) for launch in launches]
    return out


def run(use_cache: bool = True) -> list[dict]:
    """Compile everything; one row per (target, case, kernel) with the measured resources."""
    from mmkd_ds.kernels.compile_check import TARGETS as KNOWN
    from mmkd_ds.kernels.compile_check import compile_all

    jobs, labels = [], []
    for name in TARGETS:
        for label, launch in collect_launches(name):
            jobs.append((launch, KNOWN[name].capability))
            labels.append((name, label))
    results = compile_all(jobs, cache_file=CACHE if use_cache else None)
    rows = []
    for (name, label), res in zip(labels, results):
        row = dict(vars(res))
        row.update(target=name, case=label, limit=KNOWN[name].shared_limit, problems=res.problems(KNOWN[name]))
        rows.append(row)
    return rows


def test_every_kernel_fits_every_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    kernels = {r["kernel"] for r in rows}
    # All five kernels were captured and compiled for all four targets.
    assert kernels == {
        "_structure_kl_fwd_kernel",
        "_structure_kl_bwd_rows_kernel",
        "_structure_kl_bwd_cols_kernel",
        "_word_pool_fwd_kernel",
        "_word_pool_bwd_kernel",
    }, kernels
    assert {r["target"] for r in rows} == set(TARGETS)
    assert all(r["registers"] > 0 for r in rows)  # the ptxas log was really read
    bad = [f"{r['target']} {r['case']} {r['kernel']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    assert not bad, "\n".join(bad)
    print(f"compile check: {len(rows)} launches, {len({r['key'] for r in rows})} compilations, "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip


def test_the_check_flags_what_does_not_fit():
    """The verdict itself: over the shared limit, over 255 registers, or any spill is a problem
    (figures of the kernels before issue 13: structure_kl backward at D=128 on sm_80, word_pool
    forward fp32 on sm_80)."""
    from mmkd_ds.kernels.compile_check import TARGETS as KNOWN
    from mmkd_ds.kernels.compile_check import CompileResult

    def result(shared, regs, stores, loads):
        return CompileResult("k", "sm_80", shared, regs, stores, loads, 8, 3, {}, "key")

    sm80 = KNOWN["sm_80"]
    assert result(sm80.shared_limit, 255, 0, 0).problems(sm80) == []
    assert "shared 172032 B > 166912 B" in result(172_032, 128, 0, 0).problems(sm80)
    assert result(32_768, 255, 180, 180).problems(sm80) == ["spills: 180 B stores, 180 B loads"]
    assert len(result(10**6, 256, 1, 0).problems(sm80)) == 3


def _table(rows: list[dict]) -> str:
    seen, lines = set(), []
    lines.append("| target | case | kernel | warps | stages | shared B (limit) | regs | spills st/ld |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        k = (r["target"], r["key"], r["case"].split(" D=")[0])
        if k in seen:
            continue
        seen.add(k)
        lines.append(
            f"| {r['target']} | {r['case']} | {r['kernel'].strip('_')} | {r['num_warps']} | {r['num_stages']} "
            f"| {r['shared']} ({r['limit']}) | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter replaces the JIT functions")
    sys.path.insert(0, str(REPO))
    t0 = time.monotonic()
    result = run(use_cache="--no-cache" not in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        print(_table(result))
        print(f"{len(result)} launches, {len({r['key'] for r in result})} compilations, {time.monotonic() - t0:.1f} s")
