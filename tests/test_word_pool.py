"""word_pool: the Triton kernels (run on CPU through the Triton interpreter, which conftest.py
switches on before triton is imported) and the vectorised torch reference, both checked
against a naive Python-loop pooling, values and gradients."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd_ds.kernels.word_pool import word_pool, word_pool_reference

# The module itself: ``import mmkd_ds.kernels.word_pool as wp`` would give the function that
# mmkd_ds.kernels re-exports under the same name.
wp = importlib.import_module("mmkd_ds.kernels.word_pool")

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {  # output rounding only: the naive pooling runs in fp64 on the same (rounded) inputs
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
}


# ------------------------------------------------------------------------------------------
# Naive pooling, written with plain Python loops
# ------------------------------------------------------------------------------------------


def naive_pool(hidden, word_ids, n_words, pooling):
    """pooled [B, W, D] fp64, counts [B, W] int64, first position per word (-1 when empty)."""
    B, L, D = hidden.shape
    h = hidden.double()
    pooled = torch.zeros(B, n_words, D, dtype=torch.float64)
    counts = torch.zeros(B, n_words, dtype=torch.int64)
    first = torch.full((B, n_words), -1, dtype=torch.int64)
    for b in range(B):
        for w in range(n_words):
            toks = [t for t in range(L) if int(word_ids[b, t]) == w]
            counts[b, w] = len(toks)
            if not toks:
                continue
            first[b, w] = toks[0]
            if pooling == "mean":
                pooled[b, w] = sum(h[b, t] for t in toks) / len(toks)
            else:
                pooled[b, w] = h[b, toks[0]]
    return pooled, counts, first


def naive_grad(grad_out, word_ids, n_words, pooling, L):
    """d hidden [B, L, D] fp64 for upstream gradient grad_out [B, W, D]."""
    B, W, D = grad_out.shape
    _, counts, first = naive_pool(torch.zeros(B, L, 1), word_ids, n_words, "mean")
    g = grad_out.double()
    out = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            w = int(word_ids[b, t])
            if w < 0:
                continue
            if pooling == "mean":
                out[b, t] = g[b, w] / int(counts[b, w])
            elif int(first[b, w]) == t:
                out[b, t] = g[b, w]
    return out


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------


def case_odd():
    """B=3, L=13, D=20: specials, single- and multi-token words, a word at the sequence end,
    an empty word slot, and a row with no word at all."""
    ids = torch.tensor(
        [
            [-1, 0, 1, 1, 1, 2, 3, 3, 4, -1, -1, -1, -1],  # word 5 empty; SEP + padding
            [-1, 0, 0, 1, 2, 3, 4, 4, 5, 5, 5, 5, 5],  # word 5 runs to the last token
            [-1] * 13,  # no word at all
        ]
    )
    return ids, 6, 20


def case_noncontig():
    """Words whose subwords are separated by other tokens; words at both sequence ends."""
    ids = torch.tensor(
        [
            [-1, 0, 1, 0, 0, 2, 1, -1, 3, 2, -1],
            [3, 3, 2, 1, 0, -1, 0, 1, 2, 3, 3],
        ]
    )
    return ids, 5, 12  # word 4 never occurs


def case_random():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(-1, 10, (4, 24), generator=g)
    ids[2] = -1
    return ids, 10, 48


CASES = {"odd": case_odd, "noncontig": case_noncontig, "random": case_random}


def make_hidden(ids, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = ids.shape
    return (torch.randn(B, L, D, generator=g) * 2).to(dtype)


def run(backend, hidden, ids, W, pooling, grad_out):
    h = hidden.clone().requires_grad_(True)
    pooled, counts = word_pool(h, ids, W, pooling, backend=backend)
    pooled.backward(grad_out)
    return pooled, counts, h.grad


# ------------------------------------------------------------------------------------------
# Values, counts and gradients against the naive loop (both backends) and each other
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_naive_and_reference(case, pooling, dtype):
    ids, W, D = CASES[case]()
    B, L = ids.shape
    hidden = make_hidden(ids, D, dtype)
    grad_out = torch.randn(B, W, D, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    want, want_counts, _ = naive_pool(hidden, ids, W, pooling)
    want_grad = naive_grad(grad_out, ids, W, pooling, L)

    results = {}
    for backend in ("triton", "torch"):
        pooled, counts, grad = run(backend, hidden, ids, W, pooling, grad_out)
        assert pooled.shape == (B, W, D) and pooled.dtype == dtype, backend
        assert counts.dtype == torch.int64 and torch.equal(counts, want_counts), backend
        torch.testing.assert_close(pooled.double(), want, **TOL[dtype], msg=lambda m: f"{backend}: {m}")
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), want_grad, **TOL[dtype], msg=lambda m: f"{backend} grad: {m}")
        # Empty words are exactly zero; tokens of no word get exactly zero gradient.
        assert (pooled[counts == 0] == 0).all()
        assert (grad[ids < 0] == 0).all()
        results[backend] = (pooled, grad)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=2 * TOL[dtype]["atol"], rtol=2 * TOL[dtype]["rtol"])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **tol)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], **tol)


def test_first_takes_earliest_subword_and_routes_gradient_there():
    ids, W, D = case_noncontig()
    hidden = make_hidden(ids, D, torch.float32)
    grad_out = torch.randn(ids.shape[0], W, D)
    for backend in ("triton", "torch"):
        pooled, counts, grad = run(backend, hidden, ids, W, "first", grad_out)
        # row 0: word 0 at t=1, 3, 4 -> t=1; word 1 at t=2, 6 -> t=2; word 2 at t=5, 9 -> t=5
        assert torch.equal(pooled[0, 0], hidden[0, 1]), backend
        assert torch.equal(pooled[0, 1], hidden[0, 2]), backend
        assert torch.equal(pooled[0, 2], hidden[0, 5]), backend
        assert torch.equal(grad[0, 1], grad_out[0, 0]) and (grad[0, 3:5] == 0).all(), backend
        assert (grad[0, 6] == 0).all() and (grad[0, 9] == 0).all(), backend
        assert torch.equal(counts[0], torch.tensor([3, 2, 2, 1, 0])), backend


def test_mean_of_split_word_is_mean_of_all_its_subwords():
    ids, W, D = case_noncontig()
    hidden = make_hidden(ids, D, torch.float32)
    for backend in ("triton", "torch"):
        pooled, _ = word_pool(hidden, ids, W, "mean", backend=backend)
        want = (hidden[1, 4] + hidden[1, 6]) / 2  # word 0 of row 1
        torch.testing.assert_close(pooled[1, 0], want, atol=1e-6, rtol=1e-6)
        want3 = (hidden[1, 0] + hidden[1, 1] + hidden[1, 9] + hidden[1, 10]) / 4
        torch.testing.assert_close(pooled[1, 3], want3, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_triton_several_tiles_on_every_axis(pooling):
    """Blocks of 16 give 2 word tiles, 2 token blocks and 2 feature tiles (D=20, masked), so
    tile skipping, the per-tile count store and cross-block first/accumulation are exercised."""
    ids = torch.tensor(
        [
            [-1] + list(range(18)) + [17, 18, 19, 19, -1],  # words 16-19 only in token block 1
            [0, 0, 5, 5, 5, -1, 18, 18, 3, 19, 7, 7, 1, 2, 4, 6, 0, 5, 18, 16, 16, -1, 0, 9],
        ]
    )
    B, L = ids.shape
    W, D = 20, 20
    hidden = make_hidden(ids, D, torch.float32, seed=3)
    grad_out = torch.randn(B, W, D, generator=torch.Generator().manual_seed(4))
    want, want_counts, want_first = naive_pool(hidden, ids, W, pooling)

    pooled, counts, ids32, first = wp.word_pool_forward(hidden, ids, W, pooling, block_sizes=(16, 16, 16))
    assert torch.equal(counts, want_counts)
    assert torch.equal(first.long(), torch.where(want_first < 0, L, want_first))
    torch.testing.assert_close(pooled.double(), want, atol=1e-5, rtol=1e-5)

    grad = wp.word_pool_backward(grad_out, ids32, counts, first, pooling, (B, L, D), torch.float32, block_sizes=(16, 16))
    torch.testing.assert_close(grad.double(), naive_grad(grad_out, ids, W, pooling, L), atol=1e-6, rtol=1e-6)


def test_fp32_accumulation_for_half_inputs():
    """16 fp16 subwords of 5000: an fp16 running sum would overflow (max 65504) to inf."""
    ids = torch.tensor([[-1] + [0] * 16 + [1, -1]])
    hidden = torch.full((1, 19, 20), 5000.0, dtype=torch.float16)
    hidden[0, 17] = 3.0
    for backend in ("triton", "torch"):
        pooled, counts = word_pool(hidden, ids, 2, "mean", backend=backend)
        assert torch.isfinite(pooled).all(), backend
        assert (pooled[0, 0] == 5000).all() and (pooled[0, 1] == 3).all(), backend
        assert counts.tolist() == [[16, 1]]


def test_triton_strided_inputs_and_expanded_grad():
    """Non-contiguous hidden (a transposed view) and a stride-0 upstream gradient."""
    ids, W, D = case_odd()
    B, L = ids.shape
    base = torch.randn(B, D, L)
    hidden = base.transpose(1, 2)  # [B, L, D], stride(2) == L
    assert not hidden.is_contiguous()
    want, _, _ = naive_pool(hidden, ids, W, "mean")
    h = base.clone().requires_grad_(True)  # leaf [B, D, L]; the op sees its transposed view
    pooled, _ = word_pool(h.transpose(1, 2), ids, W, "mean", backend="triton")
    torch.testing.assert_close(pooled.double(), want, atol=1e-5, rtol=1e-5)
    g_row = torch.randn(1, 1, D)
    pooled.backward(g_row.expand(B, W, D))
    want_grad = naive_grad(g_row.expand(B, W, D).contiguous(), ids, W, "mean", L)
    torch.testing.assert_close(h.grad.transpose(1, 2).double(), want_grad, atol=1e-6, rtol=1e-6)


def test_triton_under_inference_mode():
    """teacher_forward pools inside torch.inference_mode()."""
    ids, W, D = case_odd()
    hidden = make_hidden(ids, D, torch.float32)
    with torch.inference_mode():
        pooled, counts = word_pool(hidden, ids, W, "mean", backend="triton")
    want, want_counts, _ = naive_pool(hidden, ids, W, "mean")
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(pooled.double(), want, atol=1e-5, rtol=1e-5)


def test_counts_not_differentiable_and_no_grad_for_ids():
    ids, W, D = case_odd()
    h = make_hidden(ids, D, torch.float32).requires_grad_(True)
    pooled, counts = word_pool(h, ids, W, "mean", backend="triton")
    assert pooled.requires_grad and not counts.requires_grad
    assert pooled.grad_fn is not None and "WordPool" in type(pooled.grad_fn).__name__


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_ids_at_or_above_n_words_raise(backend):
    ids, W, D = case_odd()
    hidden = make_hidden(ids, D, torch.float32)
    bad = ids.clone()
    bad[1, 4] = W
    with pytest.raises(ValueError, match="n_words"):
        word_pool(hidden, bad, W, "mean", backend=backend)
    with pytest.raises(ValueError, match="pooling"):
        word_pool(hidden, ids, W, "max", backend=backend)
    with pytest.raises(ValueError, match="do not match"):
        word_pool(hidden, ids[:, :-1], W, "mean", backend=backend)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from mmkd_ds.kernels.word_pool import word_pool\n"
        "h = torch.zeros(1, 3, 4); ids = torch.tensor([[-1, 0, 0]])\n"
        "assert word_pool(h, ids, 1)[1].tolist() == [[2]]\n"  # auto still works (reference)
        "try:\n"
        "    word_pool(h, ids, 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMKD_KERNELS")}
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout


def test_unsupported_dtype_for_triton():
    ids, W, D = case_odd()
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        word_pool(make_hidden(ids, D, torch.float64), ids, W, backend="triton")
    # the reference still takes fp64
    assert word_pool(make_hidden(ids, D, torch.float64), ids, W, backend="torch")[0].dtype == torch.float64


# ------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------


class _Boom(Exception):
    pass


def _forbid(monkeypatch, name):
    def boom(*a, **k):
        raise _Boom(name)

    if name == "triton":
        monkeypatch.setattr(wp.WordPoolFunction, "apply", boom)
    else:
        monkeypatch.setattr(wp, "word_pool_reference", boom)


def test_auto_on_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("MMKD_KERNELS", raising=False)
    ids, W, D = case_odd()
    hidden = make_hidden(ids, D, torch.float32)
    assert wp.resolve_backend(hidden) == "torch"
    assert wp.resolve_backend(hidden, "auto") == "torch"
    _forbid(monkeypatch, "triton")
    pooled, counts = word_pool(hidden, ids, W, "mean")  # default backend
    pooled2, _ = word_pool(hidden, ids, W, "mean", backend="auto")
    assert torch.equal(pooled, word_pool_reference(hidden, ids, W, "mean")[0])
    assert torch.equal(pooled, pooled2)
    with pytest.raises(_Boom):
        word_pool(hidden, ids, W, "mean", backend="triton")


def test_env_var_sets_default_backend(monkeypatch):
    ids, W, D = case_odd()
    hidden = make_hidden(ids, D, torch.float32)
    monkeypatch.setenv("MMKD_KERNELS", "triton")
    assert wp.resolve_backend(hidden) == "triton"
    h = hidden.clone().requires_grad_(True)
    pooled, _ = word_pool(h, ids, W, "mean")
    assert "WordPool" in type(pooled.grad_fn).__name__  # went through the Triton Function
    assert wp.resolve_backend(hidden, "torch") == "torch"  # an explicit backend wins

    monkeypatch.setenv("MMKD_KERNELS", "torch")
    _forbid(monkeypatch, "triton")
    pooled, _ = word_pool(hidden, ids, W, "mean")
    assert torch.equal(pooled, word_pool_reference(hidden, ids, W, "mean")[0])

    monkeypatch.setenv("MMKD_KERNELS", "auto")
    assert wp.resolve_backend(hidden) == "torch"

    monkeypatch.setenv("MMKD_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MMKD_KERNELS"):
        word_pool(hidden, ids, W, "mean")


# ------------------------------------------------------------------------------------------
# The word loss on top of the pooling: both backends, both anchors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["first", "mean"])
@pytest.mark.parametrize("anchor", ["teacher", "student"])
def test_word_loss_gradient_through_both_backends(pooling, anchor):
    """With the authors' teacher anchor every real word's subwords get gradient (the unmasked
    ones as negatives of the softmax over student words); with the student anchor only the
    scored words do. Triton and torch agree, and specials and padding get none either way."""
    from mmkd_ds.losses import word_infonce_loss

    ids, W, D = case_odd()
    hidden = make_hidden(ids, D, torch.float32, seed=3) * 0.3
    teacher = torch.randn(ids.shape[0], W, D, generator=torch.Generator().manual_seed(4)) * 0.3
    grads = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_(True)
        pooled, counts = word_pool(h, ids, W, pooling, backend=backend)
        valid = counts > 0
        target = torch.zeros_like(valid)
        target[0, 1] = target[1, 3] = True  # one scored word in each sentence with words
        loss = word_infonce_loss(pooled, teacher, valid, target, anchor=anchor)
        loss.backward()
        grads[backend] = h.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)
    g = grads["torch"].abs().sum(-1)  # [B, L]
    assert torch.all(g[ids < 0] == 0)  # specials, padding and the word-less row
    scored_tokens = ((ids[0] == 1).nonzero().flatten(), (ids[1] == 3).nonzero().flatten())
    assert g[0, scored_tokens[0][0]] > 0 and g[1, scored_tokens[1][0]] > 0
    other = (ids[0] >= 0) & (ids[0] != 1)  # the unscored words of sentence 0
    first_of_other = [int((ids[0] == w).nonzero()[0]) for w in ids[0][other].unique().tolist()]
    if anchor == "teacher":
        assert all(g[0, t] > 0 for t in first_of_other)
    else:
        assert torch.all(g[0][other] == 0)
