"""Sentence level: BYOL-style loss between the student's and the teacher's [CLS] projections.

z = q(g(S(x)[CLS])) with projector g and predictor q; z' = g_T(T(e)[CLS]) with a teacher-side
projector g_T that receives no gradient (frozen at a seeded init, or an EMA of g).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import BYOLHeads

_TEACHER_HEADS = ("frozen", "ema")

# Seeds of the frozen heads are salted per head kind, so that the sentence-level g_T and the
# structure-level teacher head stay independent even when a config passes one seed to both.
SENTENCE_SEED_SALT = 0x5E47
STRUCTURE_SEED_SALT = 0x57C7


def byol_loss(z: Tensor, z_teacher: Tensor) -> Tensor:
    """BYOL regression loss ``mean_i (2 - 2 cos(z_i, z'_i))``.

    Args:
        z: ``[B, d]`` student predictions q(g(.)).
        z_teacher: ``[B, d]`` teacher projections g_T(.); a target, detached here.

    Returns:
        0-dim float32 tensor in [0, 4]. ``B == 0`` -> a zero still connected to ``z``'s graph.
    """
    if z.dim() != 2 or z.shape != z_teacher.shape:
        raise ValueError(
            f"z and z_teacher must both be [B, d], got {tuple(z.shape)} and {tuple(z_teacher.shape)}"
        )
    # normalize with eps: a zero vector maps to 0 (cos 0, loss 2) instead of 0/0 = NaN.
    zn = F.normalize(z.float(), dim=-1, eps=1e-8)
    tn = F.normalize(z_teacher.detach().float(), dim=-1, eps=1e-8)
    per_row = 2.0 - 2.0 * (zn * tn).sum(dim=-1)  # [B]
    # sum / max(B, 1): B is a Python int, so the empty case needs no host sync and stays 0.
    return per_row.sum() / max(z.shape[0], 1)


class SentenceHeads(BYOLHeads):
    """The sentence level's heads (:class:`~mmkd_ds.losses.heads.BYOLHeads`): projector g,
    predictor q (trained) and teacher-side projector g_T (no gradient).

    Args:
        student_hidden: H_S, size of the student's [CLS] vector.
        teacher_hidden: H_T, size of the teacher's [CLS] vector.
        mlp_hidden: m, hidden width of the three MLPs (768 as the authors').
        out_dim: size of z and z' (128 in the paper).
        teacher_seed: seed of g_T's initialisation (local generator, global RNG untouched).
        teacher_head: ``"frozen"`` (reference: g_T stays at its init) or ``"ema"`` (g_T tracks
            g through :meth:`update_ema`; requires ``student_hidden == teacher_hidden``).
        ema_decay: decay of the EMA, in [0, 1].
        final_bn, bias: the heads' form (see :class:`~mmkd_ds.losses.heads.MLPHead`).

    g_T is a child module, so ``.train()``/``.eval()`` reach it: in training mode it normalises
    with batch statistics and updates its running statistics (under no_grad), as in the
    reference. Its parameters have ``requires_grad=False``; hand the optimizer only
    ``p for p in heads.parameters() if p.requires_grad``.
    """

    salt = SENTENCE_SEED_SALT

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        mlp_hidden: int = 768,
        out_dim: int = 128,
        teacher_seed: int = 0,
        teacher_head: str = "frozen",
        ema_decay: float = 0.99,
        final_bn: bool = True,
        bias: bool = False,
    ) -> None:
        if teacher_head not in _TEACHER_HEADS:
            raise ValueError(f"teacher_head must be one of {_TEACHER_HEADS}, got {teacher_head!r}")
        if teacher_head == "ema" and student_hidden != teacher_hidden:
            # An EMA of g only makes sense if g and g_T have the same shapes, i.e. both read
            # [CLS] vectors of the same size.
            raise ValueError(
                f"teacher_head='ema' needs student_hidden == teacher_hidden, got "
                f"{student_hidden} != {teacher_hidden}; use teacher_head='frozen'"
            )
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        # In "ema" mode g_T also starts from its seeded init (not a copy of g) and is pulled
        # toward g by update_ema.
        super().__init__(student_hidden, teacher_hidden, mlp_hidden, out_dim, teacher_seed,
                         final_bn=final_bn, bias=bias)
        self.teacher_head = teacher_head
        self.ema_decay = float(ema_decay)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``g_T <- decay * g_T + (1 - decay) * g`` on parameters; call after each optimizer step.

        A no-op in ``"frozen"`` mode, so the training loop may call it unconditionally.
        BatchNorm running statistics are buffers, not parameters: g_T keeps its own, updated
        by its forward passes.
        """
        if self.teacher_head != "ema":
            return
        for p_t, p_s in zip(self.g_T.parameters(), self.g.parameters()):
            p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - self.ema_decay)
