"""Structure level: KL between the teacher's and the student's in-batch similarity softmaxes.

The computation lives in one place, the kernel op ``mmkd_ds.kernels.structure_kl``: a fused
Triton kernel on CUDA (tiled, O(N * D) memory) and a vectorised torch reference elsewhere. This
module states the objective and holds its heads.
"""

from __future__ import annotations

import importlib

from torch import Tensor

from .heads import BYOLHeads
from .sentence import STRUCTURE_SEED_SALT

# The module, not the function the package could shadow it with.
_kernel = importlib.import_module("mmkd_ds.kernels.structure_kl")


def structure_kl_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    student_cols: Tensor | None = None,
    teacher_cols: Tensor | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Structure loss ``(1/N) sum_i KL(softmax(A_T[i]) || softmax(A_S[i]))``.

    With ``u_hat = u / |u|``: ``A_S = U_hat @ U_hat_cols.T / tau`` and
    ``A_T = V_hat @ V_hat_cols.T / tau``, both ``[N, M]``.

    Args:
        student: ``[N, D_S]`` student head outputs u of the rows (the local batch).
        teacher: ``[N, D_T]`` teacher head outputs v of the same rows; a target, detached.
        tau: temperature (1 = the reference).
        student_cols: ``[M, D_S]`` columns (e.g. the batch gathered across ranks, with
            gradient); default: ``student`` itself (M = N).
        teacher_cols: ``[M, D_T]`` teacher columns, detached; given iff ``student_cols`` is.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        0-dim float32 tensor. ``N == 1`` with no extra columns gives 0 (softmax over one
        column); ``N == 0`` gives a zero still connected to ``student``'s graph.
    """
    return _kernel.structure_kl(
        student, teacher, tau, student_cols=student_cols, teacher_cols=teacher_cols, backend=backend
    )


class StructureHeads(BYOLHeads):
    """The structure level's own heads, independent of the sentence heads (as the authors'
    ``base_projector2``, ``predictor2`` and ``momentum_projector2``).

    ``forward(student_cls [B, H_S], teacher_cls [B, H_T]) -> (u [B, out], v [B, out])`` with
    ``u = q(g(student_cls))`` (predictor on projector, trained) and ``v = g_T(teacher_cls)``
    (projector frozen at a seeded init, salted differently from the sentence level's g_T so the
    two differ even with one seed; BatchNorm statistics still update in training mode). Hand
    the optimizer only the parameters with ``requires_grad``.
    """

    salt = STRUCTURE_SEED_SALT
