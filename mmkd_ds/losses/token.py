"""Token level: translation language modelling (TLM) cross-entropy.

The caller gathers the selected (masked) positions before calling, so the loss sees only
them. The public reference scored every position; that is the bug this module does not copy.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def tlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the selected positions.

    Args:
        logits: ``[M, V]`` MLM-head scores of the M selected positions, any float dtype.
        labels: ``[M]`` integer target ids; rows equal to ``-100`` are ignored.

    Returns:
        0-dim float32 tensor: mean CE over the rows whose label is not ``-100``. With no such
        row (``M == 0`` or every label ``-100``) it is a zero that is still connected to
        ``logits``' graph, so ``backward()`` runs on every rank (DeepSpeed needs every rank to
        take part in the gradient reduction even when its batch selected nothing).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [M, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [M]={tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
    # fp32 whatever the input dtype: a half-precision log-sum-exp over a 100k+ vocabulary
    # loses the small probabilities the loss is made of. cross_entropy is log_softmax + NLL,
    # i.e. the stable logsumexp form.
    total = F.cross_entropy(
        logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    # Sum / count with the count clamped at 1 instead of reduction="mean": "mean" returns NaN
    # when every label is ignored, and a Python-side `if count == 0` would force a host sync.
    # With nothing selected the sum is an empty (or all-ignored) sum: 0, still in the graph.
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
