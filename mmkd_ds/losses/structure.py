"""Structure level: KL between the teacher's and the student's in-batch similarity softmaxes.

This is the plain, materialised torch reference (it builds the full N x M similarity matrix).
The fused Triton kernel ``mmkd_ds.kernels.structure_kl`` computes the same value tile by tile
in O(N * D) memory and is tested against this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sentence import STRUCTURE_SEED_SALT, ProjectionMLP, frozen_head


def structure_kl_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    student_cols: Tensor | None = None,
    teacher_cols: Tensor | None = None,
) -> Tensor:
    """Reference structure loss ``(1/N) sum_i KL(softmax(A_T[i]) || softmax(A_S[i]))``.

    With ``u_hat = u / |u|``: ``A_S = U_hat @ U_hat_cols.T / tau`` and
    ``A_T = V_hat @ V_hat_cols.T / tau``, both ``[N, M]``.

    Args:
        student: ``[N, D_S]`` student head outputs u of the rows (the local batch).
        teacher: ``[N, D_T]`` teacher head outputs v of the same rows; a target, detached.
        tau: temperature (1 = the reference).
        student_cols: ``[M, D_S]`` columns (e.g. the batch gathered across ranks, with
            gradient); default: ``student`` itself (M = N).
        teacher_cols: ``[M, D_T]`` teacher columns, detached; given iff ``student_cols`` is.

    Returns:
        0-dim float32 tensor. ``N == 1`` with no extra columns gives 0 (softmax over one
        column); ``N == 0`` gives a zero still connected to ``student``'s graph.
    """
    if (student_cols is None) != (teacher_cols is None):
        raise ValueError("pass both student_cols and teacher_cols, or neither")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if student_cols is None:
        student_cols, teacher_cols = student, teacher
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must be [N, D] with the same N, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if (
        student_cols.dim() != 2
        or teacher_cols.dim() != 2
        or student_cols.shape[0] != teacher_cols.shape[0]
        or student_cols.shape[1] != student.shape[1]
        or teacher_cols.shape[1] != teacher.shape[1]
    ):
        raise ValueError(
            f"student_cols [M, {student.shape[1]}] and teacher_cols [M, {teacher.shape[1]}] "
            f"expected, got {tuple(student_cols.shape)} and {tuple(teacher_cols.shape)}"
        )

    # fp32 throughout; eps in normalize so a zero vector gives a zero row, not NaN.
    u = F.normalize(student.float(), dim=-1, eps=1e-8)
    u_cols = F.normalize(student_cols.float(), dim=-1, eps=1e-8)
    # The teacher side is the target distribution: no gradient through it.
    v = F.normalize(teacher.detach().float(), dim=-1, eps=1e-8)
    v_cols = F.normalize(teacher_cols.detach().float(), dim=-1, eps=1e-8)

    log_p_s = (u @ u_cols.T / tau).log_softmax(dim=-1)  # [N, M]
    log_p_t = (v @ v_cols.T / tau).log_softmax(dim=-1)  # [N, M]
    # KL(p_T || p_S) = sum_j p_T (log p_T - log p_S), all in log space (no log(softmax)).
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [N]
    # N is a Python int: dividing by max(N, 1) keeps the empty case a graph-connected 0.
    return kl_rows.sum() / max(student.shape[0], 1)


class StructureHeads(nn.Module):
    """The structure level's own head pair, independent of the sentence heads.

    ``student_head``: H_S -> m -> out, trained. ``teacher_head``: H_T -> m -> out, frozen at a
    seeded init (local generator; salted differently from SentenceHeads.g_T, so the two
    teacher heads differ even with one seed), BatchNorm statistics still updating in training
    mode. Hand the optimizer only the parameters with ``requires_grad``.
    """

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        mlp_hidden: int = 2048,
        out_dim: int = 128,
        teacher_seed: int = 0,
    ) -> None:
        super().__init__()
        self.student_head = ProjectionMLP(student_hidden, mlp_hidden, out_dim)
        self.teacher_head = frozen_head(
            teacher_hidden, mlp_hidden, out_dim, teacher_seed, STRUCTURE_SEED_SALT
        )

    def forward(self, student_cls: Tensor, teacher_cls: Tensor) -> tuple[Tensor, Tensor]:
        """``student_cls [B, H_S]``, ``teacher_cls [B, H_T]`` -> ``(u [B, out], v [B, out])``."""
        u = self.student_head(student_cls)
        with torch.no_grad():
            v = self.teacher_head(teacher_cls)
        return u, v
