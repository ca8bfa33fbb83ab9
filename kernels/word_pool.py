"""Word-level pooling: mean (or first) of each word's subword states.

    word_pool(hidden [B, L, D], word_ids [B, L] int, n_words W, pooling="mean"|"first")
        -> (pooled [B, W, D] in hidden's dtype, counts [B, W] int64)

``word_ids[b, t]`` is the index of the word that subword ``t`` belongs to; ids < 0 (special
tokens, padding) belong to no word. A word with no subword gets a zero vector and count 0.
Ids >= W are an error (ValueError). ``pooling="first"`` takes the word's earliest subword
(smallest ``t``); ``"mean"`` the average of all of them.

Non-contiguous ids (a word's subwords separated by other tokens) are handled correctly by
both implementations: "mean" averages every subword of the word wherever it sits, "first"
takes the earliest one. BERT-style inputs are contiguous, but nothing here relies on it.

Implementations
---------------
* ``word_pool_reference``: vectorised pure torch (scatter / index_add, no Python loop over
  sentences or words), fp32 accumulation; autograd through torch. Used on CPU.
* Triton (Liger-Kernel style: kernels, plain ``word_pool_forward`` / ``word_pool_backward``
  functions, ``WordPoolFunction`` autograd.Function), used on CUDA.

Triton design (atomic-free, deterministic)
------------------------------------------
Forward, ``_word_pool_fwd_kernel``: one program per (word tile of BLOCK_W words, sentence b,
feature tile of BLOCK_D). It scans row b's L tokens in blocks of BLOCK_T; per block it builds
the one-hot match matrix ``M[w, t] = (word_ids[b, t] == w)`` [BLOCK_W, BLOCK_T] and

  * counts[w]   += sum_t M[w, t]
  * first[w]     = min(first[w], min_{t: M[w,t]} t)
  * acc[w, :]   += M @ hidden[b, t-block, d-tile]      (mean only; tl.dot, fp32 accumulator)

Token blocks holding no id of the tile are skipped before hidden is loaded, so for the usual
monotone ids each program reads only the few token blocks of its own words: hidden is read
O(1) times overall, the id row O(W / BLOCK_W) times. Each output element is written by exactly
one program, so there are no atomics and the result is deterministic. "mean" stores
acc / max(count, 1); "first" gathers hidden[b, first[w], d-tile] (exact copy, zero when the
word is empty). The hidden tile is upcast to fp32 before the dot: fp32 inputs use
``input_precision="ieee"`` (no TF32 rounding); fp16/bf16 values are exactly representable in
TF32, so they use ``input_precision="tf32"`` (tensor cores, exact 0/1 one-hot, exact products,
fp32 accumulation). Upcasting also sidesteps a Triton-interpreter bug: its ``tl.dot`` on bf16
operands multiplies the raw uint16 bit patterns (triton 3.9 interpreter ``create_dot``). D need not be a
power of two (masked). Counts and first positions are written by the d-tile-0 programs.

Backward, ``_word_pool_bwd_kernel``: a gather, one program per (token block, sentence b,
feature tile): for each token t with id w >= 0,
  mean:  d hidden[b, t] = d pooled[b, w] / counts[b, w]
  first: d hidden[b, t] = d pooled[b, w] if t == first[b, w] else 0
and 0 for ids < 0. No atomics.

Dispatch
--------
``backend``: "auto" (Triton on CUDA tensors of fp32/fp16/bf16, the reference otherwise),
"triton" (forced; runs on CPU tensors only under the Triton interpreter, i.e. with
``TRITON_INTERPRET=1`` set before triton is imported, otherwise a clear RuntimeError), or
"torch" (the reference). ``backend=None`` (the default) reads the ``MMKD_KERNELS`` environment
variable (auto|triton|torch), falling back to "auto".
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the reference covers CPU-only installs.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

_BACKENDS = ("auto", "triton", "torch")
_POOLINGS = ("mean", "first")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _check_inputs(hidden: torch.Tensor, word_ids: torch.Tensor, n_words: int, pooling: str) -> None:
    if pooling not in _POOLINGS:
        raise ValueError(f"word_pool: pooling must be mean or first, got {pooling!r}")
    if hidden.dim() != 3 or word_ids.dim() != 2 or word_ids.shape != hidden.shape[:2]:
        raise ValueError(f"word_pool: hidden {tuple(hidden.shape)} and word_ids {tuple(word_ids.shape)} do not match")
    if word_ids.dtype.is_floating_point or word_ids.dtype.is_complex or word_ids.dtype == torch.bool:
        raise TypeError(f"word_pool: word_ids must be an integer tensor, got {word_ids.dtype}")
    if int(n_words) < 0:
        raise ValueError(f"word_pool: n_words must be >= 0, got {n_words}")
    if word_ids.numel() and int(word_ids.max()) >= n_words:
        raise ValueError(f"word_pool: word id {int(word_ids.max())} >= n_words {n_words}")


def word_pool_reference(
    hidden: torch.Tensor, word_ids: torch.Tensor, n_words: int, pooling: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch pooling, no Python loop over sentences or words. Accumulates in fp32.

    Args:
        hidden: [B, L, D] subword states.
        word_ids: [B, L] integer word index per subword, < 0 for none.
        n_words: W, the number of word slots per sentence (ids >= W are an error).
        pooling: "mean" of the word's subwords, or "first" (earliest) subword.
    Returns:
        pooled [B, W, D] in hidden's dtype, counts [B, W] int64 (subwords per word).
    """
    _check_inputs(hidden, word_ids, n_words, pooling)
    n_words = int(n_words)
    B, L, D = hidden.shape
    word_ids = word_ids.long()
    valid = word_ids >= 0
    # Flatten (sentence, word) into one slot index so one scatter serves the whole batch;
    # slot B * W is a dump for ids < 0.
    dump = B * n_words
    slot = torch.where(valid, word_ids + torch.arange(B, device=hidden.device)[:, None] * n_words, dump).reshape(-1)
    counts = torch.zeros(dump + 1, dtype=torch.int64, device=hidden.device)
    counts.index_add_(0, slot, torch.ones_like(slot))
    counts = counts[:-1].view(B, n_words)
    if pooling == "mean":
        sums = torch.zeros(dump + 1, D, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, slot, hidden.reshape(-1, D).float())
        pooled = sums[:-1].view(B, n_words, D) / counts.clamp(min=1).unsqueeze(-1)
    else:
        # The first subword of a word is its earliest token: min over t of the flat position
        # (also right for non-contiguous ids). Empty words keep the sentinel B * L.
        flat_pos = torch.arange(B * L, device=hidden.device)
        first = torch.full((dump + 1,), B * L, dtype=torch.int64, device=hidden.device)
        first.scatter_reduce_(0, slot, flat_pos, reduce="amin", include_self=True)
        first = first[:-1]
        present = first < B * L
        rows = hidden.reshape(-1, D)[first.clamp(max=max(B * L - 1, 0))[present]].float()
        pooled = torch.zeros(dump, D, dtype=torch.float32, device=hidden.device)
        pooled = pooled.index_put((present.nonzero().squeeze(-1),), rows).view(B, n_words, D)
    return pooled.to(hidden.dtype), counts


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _word_pool_fwd_kernel(
        hidden_ptr,  # [B, L, D], any strides
        ids_ptr,  # [B, L] int32, contiguous
        out_ptr,  # [B, W, D] hidden's dtype, contiguous
        counts_ptr,  # [B, W] int64, contiguous
        first_ptr,  # [B, W] int32, contiguous (L where the word is empty)
        L,
        W,
        D,
        stride_hb,
        stride_ht,
        stride_hd,
        MEAN: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_w = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)

        w_offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW]
        d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        w_mask = w_offs < W
        d_mask = d_offs < D
        w_lo = pid_w * BLOCK_W
        w_hi = w_lo + BLOCK_W

        hidden_row = hidden_ptr + b * stride_hb
        ids_row = ids_ptr + b * L

        acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_W,), dtype=tl.int32)
        first = tl.full((BLOCK_W,), L, dtype=tl.int32)

        for t0 in range(0, L, BLOCK_T):
            t_offs = t0 + tl.arange(0, BLOCK_T)  # [BT]
            t_mask = t_offs < L
            ids = tl.load(ids_row + t_offs, mask=t_mask, other=-1)  # [BT] int32
            # Any token of this block in the word tile? (ids < 0 never are: w_lo >= 0.)
            in_tile = (ids >= w_lo) & (ids < w_hi)
            n_hit = tl.sum(in_tile.to(tl.int32), axis=0)
            if n_hit > 0:
                match = ids[None, :] == w_offs[:, None]  # [BW, BT]
                cnt += tl.sum(match.to(tl.int32), axis=1)
                pos = tl.where(match, t_offs[None, :], L)
                first = tl.minimum(first, tl.min(pos, axis=1))
                if MEAN:
                    h = tl.load(
                        hidden_row + t_offs[:, None] * stride_ht + d_offs[None, :] * stride_hd,
                        mask=t_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(tl.float32)  # [BT, BD]; fp16/bf16 values are exact in fp32 and tf32
                    onehot = match.to(tl.float32)  # exact 0/1
                    if IEEE:  # fp32 input: no TF32 rounding
                        acc = tl.dot(onehot, h, acc, input_precision="ieee")
                    else:  # fp16/bf16 input: tf32 holds every such value exactly
                        acc = tl.dot(onehot, h, acc, input_precision="tf32")

        out_offs = b * W * D + w_offs[:, None].to(tl.int64) * D + d_offs[None, :]
        out_mask = w_mask[:, None] & d_mask[None, :]
        if MEAN:
            res = acc / tl.maximum(cnt, 1).to(tl.float32)[:, None]
        else:
            present = first < L
            src = tl.where(present, first, 0).to(tl.int64)
            res = tl.load(
                hidden_row + src[:, None] * stride_ht + d_offs[None, :] * stride_hd,
                mask=out_mask & present[:, None],
                other=0.0,
            ).to(tl.float32)
        tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=out_mask)

        if pid_d == 0:
            tl.store(counts_ptr + b * W + w_offs, cnt.to(tl.int64), mask=w_mask)
            tl.store(first_ptr + b * W + w_offs, first, mask=w_mask)

    @triton.jit
    def _word_pool_bwd_kernel(
        grad_out_ptr,  # [B, W, D], any strides
        ids_ptr,  # [B, L] int32, contiguous
        counts_ptr,  # [B, W] int64, contiguous
        first_ptr,  # [B, W] int32, contiguous
        grad_hidden_ptr,  # [B, L, D] contiguous, hidden's dtype
        L,
        W,
        D,
        stride_gb,
        stride_gw,
        stride_gd,
        MEAN: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)

        t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        t_mask = t_offs < L
        d_mask = d_offs < D

        ids = tl.load(ids_ptr + b * L + t_offs, mask=t_mask, other=-1)
        valid = t_mask & (ids >= 0)
        w = tl.where(valid, ids, 0).to(tl.int64)
        if MEAN:
            cnt = tl.load(counts_ptr + b * W + w, mask=valid, other=1)
            scale = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        else:
            fpos = tl.load(first_ptr + b * W + w, mask=valid, other=-1)
            valid = valid & (fpos == t_offs)
            scale = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)

        g = tl.load(
            grad_out_ptr + b * stride_gb + w[:, None] * stride_gw + d_offs[None, :] * stride_gd,
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        g = g * scale[:, None]
        gh_offs = b * L * D + t_offs[:, None].to(tl.int64) * D + d_offs[None, :]
        tl.store(
            grad_hidden_ptr + gh_offs,
            g.to(grad_hidden_ptr.dtype.element_ty),
            mask=t_mask[:, None] & d_mask[None, :],
        )


def _is_interpreted() -> bool:
    """Whether the Triton kernels were built by the interpreter (TRITON_INTERPRET=1 at import)."""
    return _HAS_TRITON and type(_word_pool_fwd_kernel).__name__ == "InterpretedFunction"


def _target_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the launch configuration is chosen for; None under the interpreter."""
    if device.type == "cuda" and not _is_interpreted():
        return torch.cuda.get_device_capability(device)
    return None


def _check_triton_ok(hidden: torch.Tensor) -> None:
    if not _HAS_TRITON:
        raise RuntimeError("word_pool: backend='triton' requested but triton is not installed")
    if hidden.dtype not in _TRITON_DTYPES:
        raise TypeError(f"word_pool: the Triton kernel takes fp32/fp16/bf16 hidden states, got {hidden.dtype}")
    if _target_capability(hidden.device) is None and not _is_interpreted():
        raise RuntimeError(
            f"word_pool: backend='triton' on a {hidden.device.type} tensor needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported (or use backend='torch'/'auto')"
        )


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _fwd_launch_config(
    n_words: int, length: int, dim: int, dtype: torch.dtype, capability: tuple[int, int] | None
) -> dict[str, int]:
    """Tiles, warps and stages of the forward.

    fp32 inputs take the IEEE (FMA, no tensor core) dot, whose operands live in registers: a
    [64 words, 64 tokens] x [64 tokens, 64 features] tile on 4 warps needed 255 registers and
    spilled 180 B on sm_80 (8 warps did worse: ptxas capped it at 32 registers and spilled
    4 KB), so fp32 walks the tokens in blocks of 32 (168 registers at most, no spills).
    fp16 / bf16 take the tf32 tensor-core dot and fit 64 x 64 x 64. The token loop branches
    on whether a block holds any id of the tile, so it is not software-pipelined: one stage,
    no shared-memory buffers to size per target, and every target (``capability``) gets the
    same row today; tests/test_kernel_compile.py checks it on sm_80 / sm_86 / sm_89 / sm_90.
    """
    del capability
    return {
        "BLOCK_W": _pow2(n_words, 16, 64),
        "BLOCK_T": _pow2(length, 16, 32 if dtype == torch.float32 else 64),
        "BLOCK_D": _pow2(dim, 16, 64),
        "num_warps": 4,
        "num_stages": 1,
    }


def _bwd_launch_config(length: int, dim: int, capability: tuple[int, int] | None) -> dict[str, int]:
    """Tiles and warps of the backward gather (no dot, no loop: nothing to pipeline).

    64 x 128 tiles on 4 warps spilled 36-116 B (int64 addresses of 8,192 elements); 64 x 64
    fit in at most 152 registers on every target.
    """
    del capability
    return {"BLOCK_T": _pow2(length, 16, 64), "BLOCK_D": _pow2(dim, 16, 64), "num_warps": 4, "num_stages": 1}


# --------------------------------------------------------------------------------------------
# Plain forward / backward (Liger style)
# --------------------------------------------------------------------------------------------


def word_pool_forward(
    hidden: torch.Tensor,
    word_ids: torch.Tensor,
    n_words: int,
    pooling: str = "mean",
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward. Returns (pooled [B,W,D], counts [B,W] int64, ids int32 [B,L], first int32 [B,W]).

    Validates the inputs (ids >= W raise ValueError; this costs one device sync).
    ``block_sizes`` = (BLOCK_W, BLOCK_T, BLOCK_D) overrides the tiling (powers of two >= 16;
    tests use it to get several tiles along every axis with small shapes).
    """
    _check_inputs(hidden, word_ids, n_words, pooling)
    _check_triton_ok(hidden)
    W = int(n_words)
    B, L, D = hidden.shape
    ids32 = word_ids.to(device=hidden.device, dtype=torch.int32).contiguous()
    pooled = torch.empty(B, W, D, dtype=hidden.dtype, device=hidden.device)
    counts = torch.zeros(B, W, dtype=torch.int64, device=hidden.device)
    first = torch.full((B, W), L, dtype=torch.int32, device=hidden.device)
    if B == 0 or W == 0:
        return pooled, counts, ids32, first
    if L == 0 or D == 0:
        pooled.zero_()
        return pooled, counts, ids32, first
    cfg = _fwd_launch_config(W, L, D, hidden.dtype, _target_capability(hidden.device))
    if block_sizes is not None:
        cfg.update(zip(("BLOCK_W", "BLOCK_T", "BLOCK_D"), block_sizes))
    BLOCK_W, BLOCK_T, BLOCK_D = cfg["BLOCK_W"], cfg["BLOCK_T"], cfg["BLOCK_D"]
    grid = (triton.cdiv(W, BLOCK_W), B, triton.cdiv(D, BLOCK_D))
    _word_pool_fwd_kernel[grid](
        hidden,
        ids32,
        pooled,
        counts,
        first,
        L,
        W,
        D,
        hidden.stride(0),
        hidden.stride(1),
        hidden.stride(2),
        MEAN=pooling == "mean",
        IEEE=hidden.dtype == torch.float32,
        BLOCK_W=BLOCK_W,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return pooled, counts, ids32, first


def word_pool_backward(
    grad_pooled: torch.Tensor,
    ids32: torch.Tensor,
    counts: torch.Tensor,
    first: torch.Tensor,
    pooling: str,
    hidden_shape: tuple[int, int, int],
    hidden_dtype: torch.dtype,
    block_sizes: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton backward: the gather d hidden[b, t] = d pooled[b, id] (/ count | at the first subword).

    ``block_sizes`` = (BLOCK_T, BLOCK_D) overrides the tiling.
    """
    B, L, D = hidden_shape
    W = counts.shape[1]
    grad_hidden = torch.empty(B, L, D, dtype=hidden_dtype, device=grad_pooled.device)
    if grad_hidden.numel() == 0:
        return grad_hidden
    if W == 0:
        return grad_hidden.zero_()
    cfg = _bwd_launch_config(L, D, _target_capability(grad_pooled.device))
    if block_sizes is not None:
        cfg.update(zip(("BLOCK_T", "BLOCK_D"), block_sizes))
    BLOCK_T, BLOCK_D = cfg["BLOCK_T"], cfg["BLOCK_D"]
    grid = (triton.cdiv(L, BLOCK_T), B, triton.cdiv(D, BLOCK_D))
    _word_pool_bwd_kernel[grid](
        grad_pooled,
        ids32,
        counts,
        first,
        grad_hidden,
        L,
        W,
        D,
        grad_pooled.stride(0),
        grad_pooled.stride(1),
        grad_pooled.stride(2),
        MEAN=pooling == "mean",
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return grad_hidden


class WordPoolFunction(torch.autograd.Function):
    """autograd.Function over the Triton forward/backward; counts are not differentiable."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, word_ids: torch.Tensor, n_words: int, pooling: str):
        pooled, counts, ids32, first = word_pool_forward(hidden, word_ids, n_words, pooling)
        ctx.save_for_backward(ids32, counts, first)
        ctx.pooling = pooling
        ctx.hidden_shape = tuple(hidden.shape)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(counts)
        return pooled, counts

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor, grad_counts: torch.Tensor | None):
        ids32, counts, first = ctx.saved_tensors
        if grad_pooled is None:
            return None, None, None, None
        grad_hidden = word_pool_backward(
            grad_pooled, ids32, counts, first, ctx.pooling, ctx.hidden_shape, ctx.hidden_dtype
        )
        return grad_hidden, None, None, None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def resolve_backend(hidden: torch.Tensor, backend: str | None = None) -> str:
    """The implementation a call would use: "triton" or "torch" (see the module docstring)."""
    if backend is None:
        backend = os.environ.get("MMKD_KERNELS", "").strip().lower() or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"word_pool: backend must be one of {_BACKENDS} (or MMKD_KERNELS), got {backend!r}")
    if backend == "auto":
        use = _HAS_TRITON and hidden.is_cuda and hidden.dtype in _TRITON_DTYPES
        return "triton" if use else "torch"
    return backend


def word_pool(
    hidden: torch.Tensor,
    word_ids: torch.Tensor,
    n_words: int,
    pooling: str = "mean",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool subword states into word vectors; see the module docstring for shapes.

    ``backend``: "auto" | "triton" | "torch"; None reads ``MMKD_KERNELS`` (default "auto").
    """
    if resolve_backend(hidden, backend) == "torch":
        return word_pool_reference(hidden, word_ids, n_words, pooling)
    return WordPoolFunction.apply(hidden, word_ids, int(n_words), pooling)
