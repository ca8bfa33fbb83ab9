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

Forward: one program per tile of BLOCK_N rows walks the columns in tiles of BLOCK_M. For each
tile it forms A_S and A_T ([BLOCK_N, BLOCK_M], never more), each as a sum over D in chunks of
BLOCK_K (``_sim_tile``: no program holds a whole row, so registers and shared memory do not grow
with D and any D works; the row chunks are re-read from L2 for every column tile), and updates, per row, an online softmax of *both* matrices: running max m and
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
results) at the price of recomputing the logits. The backward grids are (tiles, D_S / BLOCK_DO):
a program accumulates one [BLOCK, BLOCK_DO] chunk of features, so its accumulator does not grow
with D either; heads wider than BLOCK_DO recompute the logits once per chunk (a compute cost,
no memory cost: ``_GPU_BLOCK_DO`` is the widest chunk measured without spills).

Launch configuration: ``_launch_config`` reads a small table keyed by compute capability
(``_GPU_CONFIGS``, ``_GPU_BLOCK_DO``) that tests/test_kernel_compile.py checks by compiling the
launches the code really makes for sm_80, sm_86, sm_89 and sm_90 at D = 64 ... 4096 and odd D,
fp32 / bf16 / fp16 inputs and every precision: all fit (at most 49,152 B of shared memory and
234 registers per thread, no spills; before: 163-172 KB of shared memory at D = 128, 11-12 KB
of spills in the column backward, 0.8-1.3 MB at D = 768). On GPU the normalised copies are
zero-padded to rows of 16 elements (``_normalize``): aligned loads for every D; an odd D made
ptxas spill on sm_80.

Precision
---------
``precision`` sets the inputs of every dot (similarities and gradient): ``"ieee"`` fp32 FMA (no
tensor cores), ``"tf32"`` tensor cores on 10-bit-mantissa inputs, ``"bf16"`` inputs rounded to
bf16 (7-bit mantissa), fp32 accumulation in all three. Error against the fp64 formula
(tests/test_structure_kl.py::precision_errors: N = 64, D = 96, clustered embeddings; the
interpreter ignores ``input_precision``, so under it the kernel rounds the dot inputs itself,
to nearest; tensor cores may truncate instead, up to twice these errors):

    precision   tau    loss rel. error   max |grad error| / max |grad|
    ieee        0.05   2.0e-07           8.9e-07
    ieee        0.1    5.3e-08           6.6e-07
    tf32        0.05   3.8e-05           6.1e-04
    tf32        0.1    4.2e-05           6.4e-04
    bf16        0.05   4.2e-04           4.7e-03
    bf16        0.1    3.5e-04           4.8e-03

Default ``"ieee"``: it is the only one that keeps the fp32 results of the torch reference
(1e-5 on the loss, 1e-4 on gradients, the tolerances the tests hold the kernels to); tf32
costs ~6e-4 of the gradient and bf16 ~5e-3, i.e. at the size of a bf16 encoder's own rounding,
and their speed-up is not measured yet (no GPU run so far). With head widths D <= 768 and
N a batch, the loss is a small part of a training step; pass ``precision="tf32"`` where it is
not (large N), after checking the table's errors are acceptable. When the columns are the rows themselves
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
#: Precisions of the similarity (and gradient) dots; see "Precision" in the module docstring.
PRECISIONS: tuple[str, ...] = ("ieee", "tf32", "bf16")
#: The default, chosen from the accuracy table in the module docstring.
DEFAULT_PRECISION: str = "ieee"


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
    def _round_mantissa(x, DROP: tl.constexpr):
        """fp32 ``x`` rounded to nearest (ties away from zero) on 23 - DROP mantissa bits."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (1 << (DROP - 1))) & ((0xFFFFFFFF >> DROP) << DROP)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
        """``acc + a @ b`` for fp32 tiles a [R, K], b [K, C], fp32 accumulation.

        PRECISION "ieee" (fp32 FMA), "tf32" (tensor cores, inputs on a 10-bit mantissa) or
        "bf16" (inputs rounded to bf16, tensor cores). The Triton interpreter ignores
        ``input_precision`` and its bf16 dot multiplies the raw uint16 bit patterns (triton
        3.9 ``create_dot``), so under it (EMULATE) the inputs are rounded here (tf32: 13
        mantissa bits dropped, bf16: 16) and multiplied in fp32, which is exact for such
        products: the CPU tests then measure the precision a GPU would have.
        """
        if PRECISION == "ieee":
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif EMULATE:
            if PRECISION == "tf32":
                acc = tl.dot(_round_mantissa(a, 13), _round_mantissa(b, 13), acc, input_precision="ieee")
            else:
                acc = tl.dot(_round_mantissa(a, 16), _round_mantissa(b, 16), acc, input_precision="ieee")
        elif PRECISION == "tf32":
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        return acc

    @triton.jit
    def _sim_tile(
        x_ptr, x_idx, n_x, stride_x, y_ptr, y_idx, n_y, stride_y, d, inv_tau,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ):  # fmt: skip
        """Scaled similarities ``x[x_idx] . y[y_idx] * inv_tau`` as a [BLOCK_R, BLOCK_C] fp32 tile.

        The dot runs over D in chunks of BLOCK_K (masked: padded lanes and rows out of range
        read 0, which leaves every dot unchanged), so no program ever holds a whole row: the
        registers and shared memory needed do not grow with D.
        """
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        x_ok = (x_idx < n_x)[:, None]
        y_ok = (y_idx < n_y)[None, :]
        for k in range(0, d, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + x_idx[:, None] * stride_x + offs[None, :], mask=x_ok & (offs[None, :] < d), other=0.0)
            # y loaded transposed ([BLOCK_K, BLOCK_C]) so the dot needs no tl.trans.
            y = tl.load(y_ptr + y_idx[None, :] * stride_y + offs[:, None], mask=y_ok & (offs[:, None] < d), other=0.0)
            acc = _dot(x, y, acc, PRECISION, EMULATE)
        return acc * inv_tau

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
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        EMULATE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows

        m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of A_S[i, :]
        l_s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum exp(A_S - m_s)
        m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum exp(A_T - m_t) (A_T - A_S)

        for start in range(0, n_cols, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            col_ok = (cols < n_cols)[None, :]
            # The row chunks are re-read for every column tile (from L2): keeping whole rows
            # resident is what made wide heads exceed the shared memory / register budget.
            a_s = _sim_tile(
                s_ptr, rows, n_rows, stride_s, sc_ptr, cols, n_cols, stride_sc, d_s, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
            a_t = _sim_tile(
                t_ptr, rows, n_rows, stride_t, tc_ptr, cols, n_cols, stride_tc, d_t, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
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
        BLOCK_K: tl.constexpr,
        BLOCK_DO: tl.constexpr,
        PRECISION: tl.constexpr,
        EMULATE: tl.constexpr,
    ):
        # Grid (row tiles, output chunks of BLOCK_DO features): the accumulator is
        # [BLOCK_N, BLOCK_DO] whatever D is; wide heads recompute the logits once per chunk.
        pid = tl.program_id(0)
        offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            col_ok = cols < n_cols
            a_s = _sim_tile(
                s_ptr, rows, n_rows, stride_s, sc_ptr, cols, n_cols, stride_sc, d_s, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
            a_t = _sim_tile(
                t_ptr, rows, n_rows, stride_t, tc_ptr, cols, n_cols, stride_tc, d_t, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
            # (p_S - p_T) from the saved per-row log-sum-exps. Out-of-range rows / columns
            # have finite logits (zero loads); the mask zeroes them instead of -inf arithmetic.
            g = tl.exp(a_s - lse_s[:, None]) - tl.exp(a_t - lse_t[:, None])
            g = tl.where(row_mask[:, None] & col_ok[None, :], g, 0.0)
            sc = tl.load(
                sc_ptr + cols[:, None] * stride_sc + offs_o[None, :],
                mask=col_ok[:, None] & (offs_o[None, :] < d_s),
                other=0.0,
            )
            acc = _dot(g, sc, acc, PRECISION, EMULATE)
        out_mask = row_mask[:, None] & (offs_o[None, :] < d_s)
        tl.store(ds_ptr + rows[:, None] * stride_ds + offs_o[None, :], acc * scale, mask=out_mask)

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
        BLOCK_K: tl.constexpr,
        BLOCK_DO: tl.constexpr,
        PRECISION: tl.constexpr,
        EMULATE: tl.constexpr,
    ):
        # Transposed sweep: this program owns BLOCK_M columns (and one chunk of BLOCK_DO
        # features) and loops over all row tiles, so dS_hat_cols needs no atomics. The logits
        # are formed rows x columns as in the other kernels (same summation order, so the two
        # gradients see bit-identical logits) and the (p_S - p_T) tile is transposed instead.
        pid = tl.program_id(0)
        offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < n_cols
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < n_rows
            lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
            lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
            a_s = _sim_tile(
                s_ptr, rows, n_rows, stride_s, sc_ptr, cols, n_cols, stride_sc, d_s, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
            a_t = _sim_tile(
                t_ptr, rows, n_rows, stride_t, tc_ptr, cols, n_cols, stride_tc, d_t, inv_tau,
                BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, EMULATE,
            )  # fmt: skip
            g = tl.exp(a_s - lse_s[:, None]) - tl.exp(a_t - lse_t[:, None])  # [BLOCK_N, BLOCK_M]
            g = tl.where(row_ok[:, None] & col_mask[None, :], g, 0.0)
            s = tl.load(
                s_ptr + rows[:, None] * stride_s + offs_o[None, :],
                mask=row_ok[:, None] & (offs_o[None, :] < d_s),
                other=0.0,
            )
            acc = _dot(tl.trans(g), s, acc, PRECISION, EMULATE)
        out_mask = col_mask[:, None] & (offs_o[None, :] < d_s)
        tl.store(dsc_ptr + cols[:, None] * stride_dsc + offs_o[None, :], acc * scale, mask=out_mask)


# --------------------------------------------------------------------------------------------
# Launch helpers, plain forward / backward
# --------------------------------------------------------------------------------------------


def _interpreter_active() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _HAS_TRITON and type(_structure_kl_fwd_kernel).__name__ == "InterpretedFunction"


def _target_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the launch configuration is chosen for; None under the interpreter."""
    if device.type == "cuda" and not _interpreter_active():
        return torch.cuda.get_device_capability(device)
    return None


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _check_block(name: str, value: int, minimum: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"structure_kl: {name} must be a power of two, got {value}")
    if value < minimum:
        raise ValueError(f"structure_kl: {name} must be >= {minimum} on this device, got {value}")
    return value


#: Launch configuration per GPU generation: (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages).
#: A program holds two [BLOCK_N, BLOCK_M] fp32 logit tiles and, per pipeline stage, one
#: [BLOCK_N + BLOCK_M, BLOCK_K] fp32 chunk of the inputs in shared memory: none of it grows
#: with D, so one row per generation serves every head width. Chosen with the compile check
#: (tests/test_kernel_compile.py; figures in the module docstring): 64 x 64 tiles on 8 warps
#: with 16-wide D chunks and two stages is the largest tiling measured that has no register
#: spills for all three precisions on sm_80 and sm_90 (4 warps, 32-wide chunks or three
#: stages spilled 8-190 B somewhere) and it uses <= 24 KB of shared memory, so the
#: 101,376 B parts (sm_86 / sm_89) take the same row.
_GPU_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (8, 0): (64, 64, 16, 8, 2),
    (8, 6): (64, 64, 16, 8, 2),
    (8, 9): (64, 64, 16, 8, 2),
    (9, 0): (64, 64, 16, 8, 2),
}
#: Any other capability gets the row of the smallest shared-memory budget.
_GPU_FALLBACK = (8, 6)
#: Output chunk of the backward kernels per precision: the [BLOCK_N, BLOCK_DO] accumulator,
#: one program per (tile, chunk); wider chunks recompute the logits fewer times. The FMA
#: ("ieee") dot keeps its operands in registers and spills from 64 on; the tensor-core dots
#: fit 128 without spills.
_GPU_BLOCK_DO: dict[str, int] = {"ieee": 32, "tf32": 128, "bf16": 128}
#: Rows of the normalised copies are zero-padded to a multiple of this many elements on GPU
#: (see _normalize); not under the interpreter, where alignment buys nothing.
_GPU_ROW_ALIGN = 16
_INTERP_ROW_ALIGN = 1
#: Under the interpreter (CPU tests): D chunks of 32 (test heads of 33-48 walk two, plus a
#: masked one; wider chunks for wide heads, see _launch_config). Interpreted ops are slow, so
#: fewer chunks keep the kernel tests' time in the suite's budget.
_INTERP_BLOCK_K = 32
_INTERP_BLOCK_DO = 32


def _launch_config(
    n: int,
    m: int,
    d_s: int,
    capability: tuple[int, int] | None,
    block_n: int | None,
    block_m: int | None,
    precision: str = "ieee",
) -> dict[str, int]:
    """Block sizes (powers of two), warps and pipeline stages for ``capability``.

    ``capability`` None means the interpreter: any power of two works there (tl.dot on CUDA
    wants every tile dimension >= 16), and small blocks are how the tests exercise the
    multi-tile paths. ``block_n`` / ``block_m`` override the table.
    """
    if capability is None:
        minimum = 1
        bn = block_n if block_n is not None else min(64, _next_pow2(max(n, 1)))
        bm = block_m if block_m is not None else min(64, _next_pow2(max(m, 1)))
        # At least 32 wide, and a quarter of the padded width for wide heads: ~4 chunks, the
        # last one masked for odd widths (interpreted ops are slow).
        quarter = _next_pow2(d_s) // 4
        bk, bdo, warps, stages = max(_INTERP_BLOCK_K, quarter), max(_INTERP_BLOCK_DO, quarter), 4, 1
    else:
        minimum = 16
        row = _GPU_CONFIGS.get(tuple(capability), _GPU_CONFIGS[_GPU_FALLBACK])
        bn = block_n if block_n is not None else row[0]
        bm = block_m if block_m is not None else row[1]
        bk, warps, stages = row[2], row[3], row[4]
        bdo = _GPU_BLOCK_DO[precision]
    # The output chunk never needs to be wider than the (padded) head.
    bdo = max(minimum, min(bdo, _next_pow2(d_s)))
    return {
        "BLOCK_N": _check_block("block_n", bn, minimum),
        "BLOCK_M": _check_block("block_m", bm, minimum),
        "BLOCK_K": bk,
        "BLOCK_DO": bdo,
        "num_warps": warps,
        "num_stages": stages,
    }


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"structure_kl: precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _row_align(capability: tuple[int, int] | None) -> int:
    """Row width (elements) the normalised copies are zero-padded to for the kernels."""
    return _INTERP_ROW_ALIGN if capability is None else _GPU_ROW_ALIGN


def _normalize(x: Tensor, eps: float, align: int = 1) -> tuple[Tensor, Tensor]:
    """fp32 ``(x_hat [R, D], norms [R])`` with ``x_hat = x / max(|x|, eps)``.

    ``x_hat`` is a view of a zero-padded [R, D_pad] buffer, D_pad = D rounded up to ``align``
    (``x_hat.stride(0)`` = D_pad). The kernels are given D_pad as the width: the zero columns
    change no dot product, and rows whose width and stride are multiples of 16 elements get
    aligned, vectorised loads for every D (an odd D made ptxas spill on sm_80).
    """
    xf = x.detach().float()
    norm = torch.linalg.vector_norm(xf, dim=-1)
    r, d = xf.shape
    width = -(-d // align) * align
    if width == d:
        return (xf / norm.clamp_min(eps)[:, None]).contiguous(), norm
    buf = xf.new_zeros(r, width)
    buf[:, :d] = xf / norm.clamp_min(eps)[:, None]
    return buf[:, :d], norm


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
    precision: str = DEFAULT_PRECISION,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Triton forward.

    Args:
        student [N, D_S], teacher [N, D_T], student_cols [M, D_S] | None, teacher_cols [M, D_T]
        | None (None: the rows are the columns), tau > 0, eps, optional block sizes, precision
        of the dots (ieee | tf32 | bf16).
    Returns:
        ``(loss, saved)``: loss is a 0-dim fp32 tensor, ``saved`` = ``(s_hat [N, D_S],
        t_hat [N, D_T], s_norm [N], sc_hat [M, D_S], tc_hat [M, D_T], sc_norm [M], lse_s [N],
        lse_t [N])`` (fp32; the column entries are the row tensors themselves when the columns
        are the rows). Requires N >= 1 and M >= 1.
    """
    n = student.shape[0]
    capability = _target_capability(student.device)
    align = _row_align(capability)
    s_hat, s_norm = _normalize(student, eps, align)
    t_hat, _ = _normalize(teacher, eps, align)
    if student_cols is None:
        sc_hat, tc_hat, sc_norm = s_hat, t_hat, s_norm
    else:
        assert teacher_cols is not None
        sc_hat, sc_norm = _normalize(student_cols, eps, align)
        tc_hat, _ = _normalize(teacher_cols, eps, align)
    m = sc_hat.shape[0]
    cfg = _launch_config(
        n, m, s_hat.stride(0), capability, block_n, block_m, _check_precision(precision)
    )

    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _structure_kl_fwd_kernel[grid](
        s_hat, t_hat, sc_hat, tc_hat, kl, lse_s, lse_t,
        n, m, s_hat.stride(0), t_hat.stride(0),  # padded widths (see _normalize)
        s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0),
        1.0 / tau,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        PRECISION=_check_precision(precision), EMULATE=_interpreter_active(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
    precision: str = DEFAULT_PRECISION,
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
    # The kernels walk the padded rows (zeros past D, see _normalize) and write padded
    # gradient rows, sliced back to D below.
    w_s, w_t = s_hat.stride(0), t_hat.stride(0)
    cfg = _launch_config(
        n, m, w_s, _target_capability(s_hat.device), block_n, block_m, _check_precision(precision)
    )
    meta = dict(
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_DO=cfg["BLOCK_DO"], PRECISION=_check_precision(precision),
        EMULATE=_interpreter_active(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    n_chunks = triton.cdiv(w_s, cfg["BLOCK_DO"])
    inv_tau = 1.0 / tau
    scale = 1.0 / (n * tau)
    g = grad_output.to(device=s_hat.device, dtype=torch.float32)
    if cols_are_rows:
        need_rows = need_cols = need_rows or need_cols

    ds_hat = dsc_hat = None
    if need_rows:
        ds_hat = s_hat.new_empty(n, w_s)
        _structure_kl_bwd_rows_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), n_chunks)](
            s_hat, t_hat, sc_hat, tc_hat, lse_s, lse_t, ds_hat,
            n, m, w_s, w_t,
            s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0), ds_hat.stride(0),
            inv_tau, scale, **meta,
        )  # fmt: skip
    if need_cols:
        dsc_hat = sc_hat.new_empty(m, w_s)
        _structure_kl_bwd_cols_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), n_chunks)](
            s_hat, t_hat, sc_hat, tc_hat, lse_s, lse_t, dsc_hat,
            n, m, w_s, w_t,
            s_hat.stride(0), t_hat.stride(0), sc_hat.stride(0), tc_hat.stride(0), dsc_hat.stride(0),
            inv_tau, scale, **meta,
        )  # fmt: skip

    ds_hat = None if ds_hat is None else ds_hat[:, :d_s]
    dsc_hat = None if dsc_hat is None else dsc_hat[:, :d_s]
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
        precision: str,
    ) -> Tensor:
        loss, saved = structure_kl_forward(
            student, teacher, student_cols, teacher_cols, tau, eps, block_n, block_m, precision
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
        ctx.precision = precision
        ctx.student_dtype = student.dtype
        ctx.cols_dtype = None if student_cols is None else student_cols.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_rows or need_cols):
            return (None,) * 9
        if ctx.cols_are_rows:
            s_hat, t_hat, s_norm, lse_s, lse_t = ctx.saved_tensors
            saved = (s_hat, t_hat, s_norm, s_hat, t_hat, s_norm, lse_s, lse_t)
        else:
            saved = ctx.saved_tensors
        d_rows, d_cols = structure_kl_backward(
            grad_output, saved, ctx.tau, ctx.cols_are_rows, ctx.eps,
            need_rows, need_cols, ctx.block_n, ctx.block_m, ctx.precision,
        )  # fmt: skip
        d_rows = d_rows.to(ctx.student_dtype) if (d_rows is not None and need_rows) else None
        d_cols = d_cols.to(ctx.cols_dtype) if (d_cols is not None and need_cols) else None
        return d_rows, None, d_cols, None, None, None, None, None, None


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
    precision: str = DEFAULT_PRECISION,
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
        block_n, block_m: Triton row / column tile sizes (powers of two); None = the table.
        precision: Triton dots in "ieee" fp32, "tf32" or "bf16" (fp32 accumulation); see the
            module docstring for the accuracy of each. The torch path ignores it (fp32).
    Returns:
        0-dim float32 loss. The Triton path holds O((N + M) * D) memory, never [N, M].
    """
    _check_inputs(student, teacher, student_cols, teacher_cols, tau)
    _check_precision(precision)
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
        student, teacher, student_cols, teacher_cols, float(tau), float(eps), block_n, block_m, precision
    )
