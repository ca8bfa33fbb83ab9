"""Structure-level KL as a fused, tiled Triton kernel (Liger-Kernel style, one file).

    structure_kl(student [N, D_S], teacher [N, D_T], tau, *, student_cols [M, D_S] | None,
                 teacher_cols [M, D_T] | None) -> 0-dim float32 tensor

    loss = (1/N) sum_i KL( softmax(A_T[i]) || softmax(A_S[i]) )
    A_S = S_hat @ S_hat_cols.T / tau,   A_T = T_hat @ T_hat_cols.T / tau          (both [N, M])
    x_hat = x / max(|x|, eps)  (row-wise, like ``F.normalize``); cols default to the rows (M = N).

The teacher side is a target: no gradient reaches ``teacher`` / ``teacher_cols``. The gradient
reaches ``student`` and, when given separately (e.g. columns all-gathered across data-parallel
ranks with autograd), ``student_cols``.

Layout of this file:

* ``structure_kl_reference``: vectorised pure torch; materialises the [N, M] matrices (that is
  its point: it is the readable ground truth the kernels are tested against).
* Triton kernels: ``_structure_kl_fwd_kernel`` (online softmax over column tiles) and the two
  backward kernels ``_structure_kl_bwd_rows_kernel`` / ``_structure_kl_bwd_cols_kernel``.
* ``structure_kl_forward`` / ``structure_kl_backward``: plain functions that launch them.
* ``StructureKLFunction``: the ``torch.autograd.Function``.
* ``structure_kl``: the public entry point with backend dispatch.

Design
------
Row normalisation is a small separate torch step (O(N*D), fp32): the normalised fp32 copies are
what the kernels read, and they are exactly what the backward needs again, so they are saved
instead of being recomputed. Inputs may be fp32, fp16 or bf16; everything after the
normalisation (dots, softmax statistics, gradients) is fp32.

Forward: one program per tile of BLOCK_N rows keeps its rows of S_hat and T_hat in registers and
walks the columns in tiles of BLOCK_M. For each tile it forms A_S and A_T ([BLOCK_N, BLOCK_M],
never more) and updates, per row, an online softmax of *both* matrices: running max m and
running sum l = sum exp(a - m), plus the running w = sum_j exp(a_T - m_T) (a_T - a_S). At the
end lse = m + log l and

    KL_i = sum_j p_T (a_T - a_S) - lse_T + lse_S = w / l_T - lse_T + lse_S.

Saved for the backward: the normalised inputs and the row norms ([N or M, D] and [N or M]) and
lse_S, lse_T ([N]); no [N, M] tensor is held at any point (memory O((N + M) * D)).

Backward: dL/dA_S[i, j] = (g / N) (p_S[i, j] - p_T[i, j]) with p = exp(a - lse_row), recomputed
tile by tile from the saved per-row log-sum-exps. Then

    dS_hat_rows = dA_S @ S_hat_cols / tau        (kernel over row tiles, loops over columns)
    dS_hat_cols = dA_S.T @ S_hat_rows / tau      (kernel over column tiles, loops over rows)

Each output tile is owned by exactly one program, so there are no atomics (deterministic
results) at the price of recomputing the logits twice. When the columns are the rows themselves
both contributions are summed into the one student gradient. The chain through the
normalisation, dx = (dx_hat - x_hat (x_hat . dx_hat)) / max(|x|, eps) (the projection term only
where |x| > eps, as in ``F.normalize``), and the upstream scale g are applied in torch (O(N*D)).

Dispatch: ``backend="auto"`` reads ``MMKD_KERNELS`` (auto|triton|torch) and otherwise takes
Triton for CUDA tensors and the torch reference elsewhere. ``"triton"`` on CPU tensors needs the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # Triton is optional: the torch reference must work without it (CPU-only installs, macOS).
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "structure_kl",
    "structure_kl_reference",
    "structure_kl_forward",
    "structure_kl_backward",
    "StructureKLFunction",
]

#: Default normalisation epsilon, the one of ``F.normalize``. (mmkd_ds.losses.structure uses
#: 1e-8; the two only differ for rows with norm below 1e-8. Pass ``eps`` to match it exactly.)
EPS: float = 1e-12
#: Environment variable giving the default backend: auto | triton | torch.
ENV_BACKEND: str = "MMKD_KERNELS"
_BACKENDS = ("auto", "triton", "torch")
#: fp32 x fp32 dots in IEEE precision: the default TF32 has a 10-bit mantissa, i.e. ~1e-3
#: relative error on cosines, amplified by 1/tau in the logits. The problem is tiny
#: (N x M x D with D = the head width) so the slower non-tensor-core path costs nothing that
#: matters next to the encoder.
_DOT_PRECISION = "ieee"


# --------------------------------------------------------------------------------------------
# Pure torch reference
# --------------------------------------------------------------------------------------------


def _check_inputs(
    student: Tensor, teacher: Tensor, student_cols: Tensor | None, teacher_cols: Tensor | None, tau: float
) -> tuple[Tensor, Tensor]:
    """Validate shapes / tau and return the effective ``(student_cols, teacher_cols)``."""
    if (student_cols is None) != (teacher_cols is None):
        raise ValueError("structure_kl: pass both student_cols and teacher_cols, or neither")
    try:
        tau_ok = math.isfinite(float(tau)) and float(tau) > 0
    except (TypeError, ValueError):
        tau_ok = False
    if not tau_ok:
        raise ValueError(f"structure_kl: tau must be a finite number > 0, got {tau!r}")
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            "structure_kl: student and teacher must be [N, D] with the same N, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student_cols is None:
        return student, teacher
    assert teacher_cols is not None
    if (
        student_cols.dim() != 2
        or teacher_cols.dim() != 2
        or student_cols.shape[0] != teacher_cols.shape[0]
        or student_cols.shape[1] != student.shape[1]
        or teacher_cols.shape[1] != teacher.shape[1]
    ):
        raise ValueError(
            f"structure_kl: student_cols [M, {student.shape[1]}] and teacher_cols "
            f"[M, {teacher.shape[1]}] expected, got {tuple(student_cols.shape)} and "
            f"{tuple(teacher_cols.shape)}"
        )
    devices = {t.device for t in (student, teacher, student_cols, teacher_cols)}
    if len(devices) != 1:
        raise ValueError(f"structure_kl: all inputs must be on one device, got {sorted(map(str, devices))}")
    return student_cols, teacher_cols


def _normalize_reference(x: Tensor, eps: float) -> Tensor:
    """``x / max(|x|, eps)`` row-wise in fp32 (the formula of ``F.normalize``)."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def structure_kl_reference(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    *,
    student_cols: Tensor | None = None,
    teacher_cols: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """Materialised torch reference of :func:`structure_kl` (builds [N, M]; autograd backward).

    Args:
        student: [N, D_S] student vectors of the rows.
        teacher: [N, D_T] teacher vectors of the same rows (target, detached).
        tau: temperature > 0.
        student_cols: [M, D_S] student column vectors (gradient flows to them); default the rows.
        teacher_cols: [M, D_T] teacher column vectors (detached); given iff student_cols is.
        eps: normalisation epsilon.
    Returns:
        0-dim float32 loss. N == 1 without extra columns gives 0; N == 0 gives a zero that is
        still connected to the inputs' graph.
    """
    student_cols, teacher_cols = _check_inputs(student, teacher, student_cols, teacher_cols, tau)
    u, u_cols = _normalize_reference(student, eps), _normalize_reference(student_cols, eps)
    v = _normalize_reference(teacher.detach(), eps)
    v_cols = _normalize_reference(teacher_cols.detach(), eps)
    log_p_s = (u @ u_cols.T / tau).log_softmax(dim=-1)  # [N, M]
    log_p_t = (v @ v_cols.T / tau).log_softmax(dim=-1)  # [N, M]
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [N]
    # max(N, 1): the empty batch gives a graph-connected 0 rather than 0/0.
    return kl_rows.sum() / max(student.shape[0], 1)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _load_rows(ptr, idx, n, d, stride, BLOCK_D: tl.constexpr):
        """Load rows ``idx`` ([B]) of a row-major [n, d] fp32 matrix as a [B, BLOCK_D] tile.

        D is padded to the power of two BLOCK_D through the mask: padded lanes and rows >= n
        read 0, which leaves every dot product unchanged.
        """
        offs_d = tl.arange(0, BLOCK_D)
        mask = (idx[:, None] < n) & (offs_d[None, :] < d)
        return tl.load(ptr + idx[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _logits(rows, cols, inv_tau, PRECISION: tl.constexpr):
        """[B_r, D] x [B_c, D] -> [B_r, B_c] scaled similarities, fp32 accumulation."""
        return tl.dot(rows, tl.trans(cols), input_precision=PRECISION) * inv_tau

    @triton.jit
    def _grad_logits_tile(s, t, sc, tc, lse_s, lse_t, mask, inv_tau, PRECISION: tl.constexpr):
        """(p_S - p_T) on one [B_r, B_c] tile, recomputed from the per-row log-sum-exps.

        Out-of-range rows / columns are loaded as zeros, so their logits are finite (0); the
        mask zeroes them here instead of relying on -inf arithmetic.
        """
        p_s = tl.exp(_logits(s, sc, inv_tau, PRECISION) - lse_s[:, None])
        p_t = tl.exp(_logits(t, tc, inv_tau, PRECISION) - lse_t[:, None])
        return tl.where(mask, p_s - p_t, 0.0)

    @triton.jit
    def _structure_kl_fwd_kernel(
        s_ptr,  # [N, D_S] fp32 normalised student rows
        t_ptr,  # [N, D_T] fp32 normalised teacher rows
        sc_ptr,  # [M, D_S] fp32 normalised student columns
        tc_ptr,  # [M, D_T] fp32 normalised teacher columns
        kl_ptr,  # [N] fp32 out: KL of each row
        lse_s_ptr,  # [N] fp32 out: logsumexp_j A_S[i, j]
        lse_t_ptr,  # [N] fp32 out: logsumexp_j A_T[i, j]
        n_rows,
        n_cols,
        d_s,
        d_t,
        stride_s,
        stride_t,
        stride_sc,
        stride_tc,
        inv_tau,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_DS: tl.constexpr,
        BLOCK_DT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        # The row tiles stay resident for the whole sweep over the columns.
        s = _load_rows(s_ptr, rows, n_rows, d_s, stride_s, BLOCK_DS)
        t = _load_rows(t_ptr, rows, n_rows, d_t, stride_t, BLOCK_DT)

        m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of A_S[i, :]
        l_s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum exp(A_S - m_s)
        m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum exp(A_T - m_t) (A_T - A_S)

        for start in range(0, n_cols, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            col_ok = (cols < n_cols)[None, :]
            sc = _load_rows(sc_ptr, cols, n_cols, d_s, stride_sc, BLOCK_DS)
            tc = _load_rows(tc_ptr, cols, n_cols, d_t, stride_tc, BLOCK_DT)
            a_s = _logits(s, sc, inv_tau, PRECISION)
            a_t = _logits(t, tc, inv_tau, PRECISION)
            # The difference is taken on the finite logits, before masking with -inf, so that
            # no -inf - -inf = nan ever appears. (Out-of-range columns load as zeros, so their
            # difference is already 0 and e_t is 0 there; the where only makes that explicit.)
            diff = tl.where(col_ok, a_t - a_s, 0.0)
            a_s = tl.where(col_ok, a_s, float("-inf"))
            a_t = tl.where(col_ok, a_t, float("-inf"))

            # Online softmax. The first tile always holds column 0, so m_new is finite from the
            # first iteration on and exp(m_old - m_new) = exp(-inf) = 0 resets the empty sums.
            m_s_new = tl.maximum(m_s, tl.max(a_s, axis=1))
            l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(a_s - m_s_new[:, None]), axis=1)
            m_s = m_s_new

            m_t_new = tl.maximum(m_t, tl.max(a_t, axis=1))
            alpha_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(a_t - m_t_new[:, None])  # 0 on masked columns
            l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
            w = w * alpha_t + tl.sum(e_t * diff, axis=1)
            m_t = m_t_new

        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        # sum_j p_T (a_T - a_S) = w / l_T because p_T = exp(a_T - m_T) / l_T.
        kl = w / l_t - lse_t + lse_s
        tl.store(kl_ptr + rows, kl, mask=row_mask)
        tl.store(lse_s_ptr + rows, lse_s, mask=row_mask)
        tl.store(lse_t_ptr + rows, lse_t, mask=row_mask)

    @triton.jit
    def _structure_kl_bwd_rows_kernel(
        s_ptr,
        t_ptr,
        sc_ptr,
        tc_ptr,
        lse_s_ptr,
        lse_t_ptr,
        ds_ptr,  # [N, D_S] fp32 out: scale * sum_j (p_S - p_T)[i, j] S_hat_cols[j]
        n_rows,
        n_cols,
        d_s,
        d_t,
        stride_s,
        stride_t,
        stride_sc,
        stride_tc,
        stride_ds,
        inv_tau,
        scale,  # 1 / (N * tau): the 1/N of the mean and the 1/tau of the logits
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_DS: tl.constexpr,
        BLOCK_DT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        s = _load_rows(s_ptr, rows, n_rows, d_s, stride_s, BLOCK_DS)
        t = _load_rows(t_ptr, rows, n_rows, d_t, stride_t, BLOCK_DT)
        lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_DS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            sc = _load_rows(sc_ptr, cols, n_cols, d_s, stride_sc, BLOCK_DS)
            tc = _load_rows(tc_ptr, cols, n_cols, d_t, stride_tc, BLOCK_DT)
            g = _grad_logits_tile(s, t, sc, tc, lse_s, lse_t, mask, inv_tau, PRECISION)
            acc += tl.dot(g, sc, input_precision=PRECISION)
        offs_d = tl.arange(0, BLOCK_DS)
        out_mask = row_mask[:, None] & (offs_d[None, :] < d_s)
        tl.store(ds_ptr + rows[:, None] * stride_ds + offs_d[None, :], acc * scale, mask=out_mask)

    @triton.jit
    def _structure_kl_bwd_cols_kernel(
        s_ptr,
        t_ptr,
        sc_ptr,
        tc_ptr,
        lse_s_ptr,
        lse_t_ptr,
        dsc_ptr,  # [M, D_S] fp32 out: scale * sum_i (p_S - p_T)[i, j] S_hat[i]
        n_rows,
        n_cols,
        d_s,
        d_t,
        stride_s,
        stride_t,
        stride_sc,
        stride_tc,
        stride_dsc,
        inv_tau,
        scale,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_DS: tl.constexpr,
        BLOCK_DT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Transposed sweep: this program owns BLOCK_M columns and loops over all row tiles, so
        # dS_hat_cols needs no atomics (each column tile is written by exactly one program).
        pid = tl.program_id(0)
        cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < n_cols
        sc = _load_rows(sc_ptr, cols, n_cols, d_s, stride_sc, BLOCK_DS)
        tc = _load_rows(tc_ptr, cols, n_cols, d_t, stride_tc, BLOCK_DT)
        acc = tl.zeros([BLOCK_M, BLOCK_DS], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            s = _load_rows(s_ptr, rows, n_rows, d_s, stride_s, BLOCK_DS)
            t = _load_rows(t_ptr, rows, n_rows, d_t, stride_t, BLOCK_DT)
            lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
            lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
            g = _grad_logits_tile(s, t, sc, tc, lse_s, lse_t, mask, inv_tau, PRECISION)
            acc += tl.dot(tl.trans(g), s, input_precision=PRECISION)
        offs_d = tl.arange(0, BLOCK_DS)
        out_mask = col_mask[:, None] & (offs_d[None, :] < d_s)
        tl.store(dsc_ptr + cols[:, None] * stride_dsc + offs_d[None, :], acc * scale, mask=out_mask)


# --------------------------------------------------------------------------------------------
# Launch helpers, plain forward / backward
# --------------------------------------------------------------------------------------------


def _interpreter_active() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _HAS_TRITON and type(_structure_kl_fwd_kernel).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _check_block(name: str, value: int, minimum: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"structure_kl: {name} must be a power of two, got {value}")
    if value < minimum:
        raise ValueError(f"structure_kl: {name} must be >= {minimum} on this device, got {value}")
    return value


def _launch_config(
    n: int, m: int, d_s: int, d_t: int, device: torch.device, block_n: int | None, block_m: int | None
) -> dict[str, int]:
    """Block sizes (powers of two) and warps.

    On CUDA tl.dot wants every tile dimension >= 16. The row tiles of S_hat and T_hat stay in
    registers (2 * BLOCK_N * BLOCK_D fp32), so wide heads take fewer rows per program and more
    warps. Under the interpreter (CPU) any power of two works; small blocks are how the tests
    exercise the multi-tile paths.
    """
    on_gpu = device.type == "cuda" and not _interpreter_active()
    minimum = 16 if on_gpu else 1
    bds = max(_next_pow2(d_s), minimum)
    bdt = max(_next_pow2(d_t), minimum)
    widest = max(bds, bdt)
    if block_n is None:
        block_n = 64 if widest <= 64 else 32
        if not on_gpu:
            block_n = min(block_n, max(_next_pow2(n), 1))
    if block_m is None:
        block_m = 64
        if not on_gpu:
            block_m = min(block_m, max(_next_pow2(m), 1))
    return {
        "BLOCK_N": _check_block("block_n", block_n, minimum),
        "BLOCK_M": _check_block("block_m", block_m, minimum),
        "BLOCK_DS": bds,
        "BLOCK_DT": bdt,
        "num_warps": 4 if widest <= 64 else 8,
    }


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """fp32 ``(x_hat [R, D] contiguous, norms [R])`` with ``x_hat = x / max(|x|, eps)``."""
    xf = x.detach().float()
    norm = torch.linalg.vector_norm(xf, dim=-1)
    return (xf / norm.clamp_min(eps)[:, None]).contiguous(), norm


def _normalize_backward(grad_hat: Tensor, x_hat: Tensor, norm: Tensor, eps: float) -> Tensor:
    """Chain ``d x_hat`` -> ``d x`` through ``x_hat = x / max(|x|, eps)`` (fp32, O(R * D)).

    Where |x| > eps: dx = (dx_hat - x_hat (x_hat . dx_hat)) / |x|. Where the clamp is active the
    denominator is the constant eps, so the projection term vanishes: dx = dx_hat / eps. This
    is what autograd gives for ``F.normalize``.
    """
    live = (norm > eps).to(grad_hat.dtype)[:, None]
    proj = (x_hat * grad_hat).sum(dim=-1, keepdim=True) * live
    return (grad_hat - x_hat * proj) / norm.clamp_min(eps)[:, None]


def structure_kl_forward(
    student: Tensor,
    teacher: Tensor,
    student_cols: Tensor | None,
    teacher_cols: Tensor | None,
    tau: float,
    eps: float = EPS,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Triton forward.

    Args:
        student [N, D_S], teacher [N, D_T], student_cols [M, D_S] | None, teacher_cols [M, D_T]
        | None (None: the rows are the columns), tau > 0, eps, optional block sizes.
    Returns:
        ``(loss, saved)``: loss is a 0-dim fp32 tensor, ``saved`` = ``(s_hat [N, D_S],
        t_hat [N, D_T], s_norm [N], sc_hat [M, D_S], tc_hat [M, D_T], sc_norm [M], lse_s [N],
        lse_t [N])`` (fp32; the column entries are the row tensors themselves when the columns
        are the rows). Requires N >= 1 and M >= 1.
    """
    n = student.shape[0]
    s_hat, s_norm = _normalize(student, eps)
    t_hat, _ = _normalize(teacher, eps)
    if student_cols is None:
        sc_hat, tc_hat, sc_norm = s_hat, t_hat, s_norm
    else:
        assert teacher_cols is not None
        sc_hat, sc_norm = _normalize(student_cols, eps)
        tc_hat, _ = _normalize(teacher_cols, eps)
    m = sc_hat.shape[0]
    cfg = _launch_config(n, m, s_hat.shape[1], t_hat.shape[1], student.device, block_n, block_m)

    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _structure_kl_fwd_kernel[grid](
        s_hat, t_hat, sc_hat, tc_hat, kl, lse_s, lse_t,
        n, m, s_hat.shape[1], t_hat.shape[1],
        s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0),
        1.0 / tau,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_DS=cfg["BLOCK_DS"],
        BLOCK_DT=cfg["BLOCK_DT"], PRECISION=_DOT_PRECISION, num_warps=cfg["num_warps"],
    )  # fmt: skip
    # The mean over rows is a [N] reduction in torch: deterministic, no atomics.
    loss = kl.sum() / n
    return loss, (s_hat, t_hat, s_norm, sc_hat, tc_hat, sc_norm, lse_s, lse_t)


def structure_kl_backward(
    grad_output: Tensor,
    saved: tuple[Tensor, ...],
    tau: float,
    cols_are_rows: bool,
    eps: float = EPS,
    need_rows: bool = True,
    need_cols: bool = True,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Triton backward.

    Args:
        grad_output: 0-dim upstream gradient g (any value; not assumed to be 1).
        saved: the tuple returned by :func:`structure_kl_forward`.
        tau, eps: as in the forward.
        cols_are_rows: the columns are the rows (no ``student_cols``): both the row and the
            column contributions go into the one student gradient.
        need_rows / need_cols: which gradients are wanted (``ctx.needs_input_grad``).
    Returns:
        ``(d_student [N, D_S] | None, d_student_cols [M, D_S] | None)`` in fp32. With
        ``cols_are_rows`` the second entry is None and the first holds both contributions.
    """
    s_hat, t_hat, s_norm, sc_hat, tc_hat, sc_norm, lse_s, lse_t = saved
    n, m = s_hat.shape[0], sc_hat.shape[0]
    d_s = s_hat.shape[1]
    cfg = _launch_config(n, m, d_s, t_hat.shape[1], s_hat.device, block_n, block_m)
    meta = dict(
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_DS=cfg["BLOCK_DS"],
        BLOCK_DT=cfg["BLOCK_DT"], PRECISION=_DOT_PRECISION, num_warps=cfg["num_warps"],
    )  # fmt: skip
    inv_tau = 1.0 / tau
    scale = 1.0 / (n * tau)
    g = grad_output.to(device=s_hat.device, dtype=torch.float32)
    if cols_are_rows:
        need_rows = need_cols = need_rows or need_cols

    ds_hat = dsc_hat = None
    if need_rows:
        ds_hat = torch.empty_like(s_hat)
        _structure_kl_bwd_rows_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            s_hat, t_hat, sc_hat, tc_hat, lse_s, lse_t, ds_hat,
            n, m, d_s, t_hat.shape[1],
            s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0), ds_hat.stride(0),
            inv_tau, scale, **meta,
        )  # fmt: skip
    if need_cols:
        dsc_hat = torch.empty_like(sc_hat)
        _structure_kl_bwd_cols_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            s_hat, t_hat, sc_hat, tc_hat, lse_s, lse_t, dsc_hat,
            n, m, d_s, t_hat.shape[1],
            s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0), dsc_hat.stride(0),
            inv_tau, scale, **meta,
        )  # fmt: skip

    if cols_are_rows:
        assert ds_hat is not None and dsc_hat is not None
        # Same tensor on both sides of A_S = S_hat S_hat^T: the two contributions add.
        return g * _normalize_backward(ds_hat + dsc_hat, s_hat, s_norm, eps), None
    d_rows = g * _normalize_backward(ds_hat, s_hat, s_norm, eps) if ds_hat is not None else None
    d_cols = g * _normalize_backward(dsc_hat, sc_hat, sc_norm, eps) if dsc_hat is not None else None
    return d_rows, d_cols


class StructureKLFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward, no gradient for the teacher side."""

    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        teacher: Tensor,
        student_cols: Tensor | None,
        teacher_cols: Tensor | None,
        tau: float,
        eps: float,
        block_n: int | None,
        block_m: int | None,
    ) -> Tensor:
        loss, saved = structure_kl_forward(
            student, teacher, student_cols, teacher_cols, tau, eps, block_n, block_m
        )
        cols_are_rows = student_cols is None
        if cols_are_rows:
            # sc_hat / tc_hat / sc_norm alias the row tensors: save each tensor once.
            s_hat, t_hat, s_norm, _, _, _, lse_s, lse_t = saved
            ctx.save_for_backward(s_hat, t_hat, s_norm, lse_s, lse_t)
        else:
            ctx.save_for_backward(*saved)
        ctx.cols_are_rows = cols_are_rows
        ctx.tau, ctx.eps, ctx.block_n, ctx.block_m = tau, eps, block_n, block_m
        ctx.student_dtype = student.dtype
        ctx.cols_dtype = None if student_cols is None else student_cols.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_rows or need_cols):
            return (None,) * 8
        if ctx.cols_are_rows:
            s_hat, t_hat, s_norm, lse_s, lse_t = ctx.saved_tensors
            saved = (s_hat, t_hat, s_norm, s_hat, t_hat, s_norm, lse_s, lse_t)
        else:
            saved = ctx.saved_tensors
        d_rows, d_cols = structure_kl_backward(
            grad_output, saved, ctx.tau, ctx.cols_are_rows, ctx.eps,
            need_rows, need_cols, ctx.block_n, ctx.block_m,
        )  # fmt: skip
        d_rows = d_rows.to(ctx.student_dtype) if (d_rows is not None and need_rows) else None
        d_cols = d_cols.to(ctx.cols_dtype) if (d_cols is not None and need_cols) else None
        return d_rows, None, d_cols, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for an explicit or ``"auto"`` request on ``device``.

    ``"auto"`` takes the ``MMKD_KERNELS`` environment variable when it is set (auto|triton|
    torch), else Triton for CUDA tensors and the torch reference for everything else.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"structure_kl: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={os.environ[ENV_BACKEND]!r}: expected one of {_BACKENDS}")
        backend = env
    if backend == "auto":
        return "triton" if (device.type == "cuda" and _HAS_TRITON) else "torch"
    if backend == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("structure_kl: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not _interpreter_active():
            raise RuntimeError(
                f"structure_kl: backend 'triton' on {device.type} tensors needs the Triton "
                "interpreter: set TRITON_INTERPRET=1 before triton is imported, or use "
                "backend='torch' / CUDA tensors"
            )
    return backend


def structure_kl(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    *,
    student_cols: Tensor | None = None,
    teacher_cols: Tensor | None = None,
    backend: str = "auto",
    eps: float = EPS,
    block_n: int | None = None,
    block_m: int | None = None,
) -> Tensor:
    """Structure-level KL ``(1/N) sum_i KL(softmax(A_T[i]) || softmax(A_S[i]))``.

    Args:
        student: [N, D_S] student vectors u of the rows (fp32 / fp16 / bf16).
        teacher: [N, D_T] teacher vectors v of the same rows; a target, gets no gradient.
        tau: temperature > 0 of both similarity matrices.
        student_cols: [M, D_S] student column vectors (e.g. gathered across ranks with autograd;
            they receive a gradient); default: ``student`` (M = N).
        teacher_cols: [M, D_T] teacher column vectors; given iff ``student_cols`` is.
        backend: "auto" (``MMKD_KERNELS`` if set, else Triton on CUDA / torch elsewhere),
            "triton" (also on CPU under ``TRITON_INTERPRET=1``) or "torch".
        eps: row-normalisation epsilon (``F.normalize``'s default).
        block_n, block_m: Triton row / column tile sizes (powers of two); None = defaults.
    Returns:
        0-dim float32 loss. The Triton path holds O((N + M) * D) memory, never [N, M].
    """
    _check_inputs(student, teacher, student_cols, teacher_cols, tau)
    if _resolve_backend(backend, student.device) == "torch":
        return structure_kl_reference(
            student, teacher, tau, student_cols=student_cols, teacher_cols=teacher_cols, eps=eps
        )
    m = student.shape[0] if student_cols is None else student_cols.shape[0]
    if student.shape[0] == 0 or m == 0:
        # Nothing to tile. A graph-connected zero, like the reference (whose rows sum to 0).
        zero = student.float().sum() * 0.0
        return zero if student_cols is None else zero + student_cols.float().sum() * 0.0
    return StructureKLFunction.apply(
        student, teacher, student_cols, teacher_cols, float(tau), float(eps), block_n, block_m
    )
