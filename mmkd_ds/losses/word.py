"""Word level: per-sentence InfoNCE between student and teacher word vectors.

The authors' form (``compute_tacl_loss``, from TaCL): each TEACHER word t_j is the anchor and
must pick out the student's vector s_j of the same word among the student's words of the same
sentence (negatives are the other words of that sentence only, never other sentences); the loss
is the mean over the scored (masked) words of each sentence, then the mean over the sentences
that have one. The unmasked student words thus get gradient as negatives.

Options kept from the project's first form: ``anchor="student"`` (each student word picks its
teacher word among the teacher's words) and ``reduction="word"`` (one mean over all scored
words of the batch, so long sentences weigh more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SIMS = ("dot", "cosine")
_ANCHORS = ("teacher", "student")
_REDUCTIONS = ("sentence", "word")


def word_infonce_loss(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    target: Tensor,
    sim: str = "dot",
    tau: float = 1.0,
    anchor: str = "teacher",
    reduction: str = "sentence",
) -> Tensor:
    """Per-sentence word InfoNCE over the target words.

    With ``anchor="teacher"`` (the authors'): ``logits[b, j, k] = sim(teacher[b, j],
    student[b, k]) / tau``; with ``anchor="student"``: ``sim(student[b, j], teacher[b, k]) /
    tau``. Columns ``k`` where ``valid[b, k]`` is False are excluded;
    ``loss[b, j] = -log_softmax_k(logits[b, j])[j]``. ``reduction="sentence"`` (the authors'):
    the mean of ``loss[b, j]`` over the scored ``j`` (``target & valid``) of each sentence,
    then the mean over the sentences with at least one scored word; ``"word"``: the mean over
    all scored ``(b, j)``.

    Args:
        student: ``[B, W, D]`` student word vectors (already mapped to the teacher's size).
        teacher: ``[B, W, D]`` teacher word vectors; a target, detached here.
        valid: ``[B, W]`` bool, True for real words (False: padding past the sentence end).
        target: ``[B, W]`` bool, the words that are scored (the masked words, or all words).
        sim: ``"dot"`` (raw dot product, the reference) or ``"cosine"``.
        tau: temperature dividing the similarities (both sims; 1 = the reference).
        anchor: ``"teacher"`` (softmax over the student's words) or ``"student"`` (over the
            teacher's words).
        reduction: ``"sentence"`` or ``"word"``, as above.

    Returns:
        0-dim float32 tensor. No scored word -> a zero still connected to ``student``'s graph.
        A sentence with a single valid word contributes 0 (softmax over one column) and, with
        ``reduction="sentence"``, counts as a sentence. Padding (``~valid``) gets no gradient.
    """
    if sim not in _SIMS:
        raise ValueError(f"sim must be one of {_SIMS}, got {sim!r}")
    if anchor not in _ANCHORS:
        raise ValueError(f"anchor must be one of {_ANCHORS}, got {anchor!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must both be [B, W, D], got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    bw = student.shape[:2]
    if valid.shape != bw or target.shape != bw:
        raise ValueError(
            f"valid and target must be [B, W]={tuple(bw)}, got {tuple(valid.shape)} "
            f"and {tuple(target.shape)}"
        )
    if valid.dtype != torch.bool or target.dtype != torch.bool:
        raise TypeError("valid and target must be bool tensors")

    # fp32 accumulation: the [B, W, W] similarity matrix and its log-sum-exp are cheap at
    # sentence length, and half precision would round the dot products of 768-d vectors.
    s = student.float()
    t = teacher.detach().float()  # frozen teacher: a target, never a gradient path
    # Zero the padded vectors so garbage (even NaN/inf) in padding cannot leak into the
    # scored rows' softmax nor, through 0 * NaN, into the gradient.
    s = s.masked_fill(~valid.unsqueeze(-1), 0.0)
    t = t.masked_fill(~valid.unsqueeze(-1), 0.0)
    if sim == "cosine":
        s = F.normalize(s, dim=-1, eps=1e-8)
        t = F.normalize(t, dim=-1, eps=1e-8)
    rows, cols = (t, s) if anchor == "teacher" else (s, t)
    logits = torch.einsum("bjd,bkd->bjk", rows, cols) / tau  # [B, W, W]

    w = logits.shape[-1]
    eye = torch.eye(w, dtype=torch.bool, device=logits.device)
    # Invalid columns drop out of the softmax. The diagonal is always kept: for a valid row it
    # is a valid column anyway, and for a padded row (possibly an all-padding sentence) it
    # keeps at least one finite entry, so no row is all -inf and no NaN appears anywhere.
    keep = valid.unsqueeze(1) | eye  # [B, 1, W] | [W, W] -> [B, W, W]
    logits = logits.masked_fill(~keep, float("-inf"))
    per_word = -torch.diagonal(logits.log_softmax(dim=-1), dim1=1, dim2=2)  # [B, W]

    scored = target & valid
    # where + sum / clamp(count) rather than boolean indexing: no host sync, no data-dependent
    # shapes, and an empty selection still yields a graph-connected zero.
    per_word = torch.where(scored, per_word, torch.zeros_like(per_word))
    if reduction == "word":
        return per_word.sum() / scored.sum().clamp(min=1)
    count = scored.sum(dim=1)  # [B]
    per_sentence = per_word.sum(dim=1) / count.clamp(min=1)  # 0 where nothing is scored
    return per_sentence.sum() / (count > 0).sum().clamp(min=1)
