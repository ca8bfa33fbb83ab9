"""The four MMKD objectives as pure functions over tensors, plus the sentence/structure heads.

- token:     :func:`tlm_loss`
- word:      :func:`word_infonce_loss`
- sentence:  :func:`byol_loss`, :class:`ProjectionMLP`, :class:`SentenceHeads`
- structure: :func:`structure_kl_loss` (materialised reference), :class:`StructureHeads`
"""

from .sentence import ProjectionMLP, SentenceHeads, byol_loss
from .structure import StructureHeads, structure_kl_loss
from .token import tlm_loss
from .word import word_infonce_loss

__all__ = [
    "ProjectionMLP",
    "SentenceHeads",
    "StructureHeads",
    "byol_loss",
    "structure_kl_loss",
    "tlm_loss",
    "word_infonce_loss",
]
