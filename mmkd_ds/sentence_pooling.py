"""One vector per sentence from token states: the single definition of a sentence embedding.

The teacher's targets (``teacher.sentence``), the student's sentence vector in training
(``loss.sentence_pooling``) and held-out retrieval (``mmkd-eval --pooling``) all pool here, so
a vector trained with one pooling is evaluated with exactly the same one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing the choices costs no torch import
    from torch import Tensor

SENTENCE_POOLINGS = ("cls", "mean")


def sentence_vectors(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """``hidden`` [B, L, H], ``attention_mask`` [B, L] (1 = real token) -> [B, H], hidden's dtype.

    "cls": the state at position 0. "mean": the mean over the positions whose mask is 1
    (special tokens included, as sentence-transformers' mean pooling); padding positions are left
    out whatever they hold. A row with no real token gives zeros, not NaN.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"sentence pooling must be one of {SENTENCE_POOLINGS}, got {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
