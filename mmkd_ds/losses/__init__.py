"""The four MMKD objectives as pure functions over tensors, plus the sentence/structure heads.

- token:     :func:`tlm_loss`
- word:      :func:`word_infonce_loss`
- sentence:  :func:`byol_loss`, :class:`SentenceHeads`
- heads:     :class:`MLPHead` (the authors' ``_build_mlp``), :class:`BYOLHeads`
- structure: :func:`structure_kl_loss` (materialised reference), :class:`StructureHeads`
"""

from .heads import BYOLHeads, MLPHead
from .sentence import SentenceHeads, byol_loss
from .structure import StructureHeads, structure_kl_loss
from .token import tlm_loss
from .word import word_infonce_loss

__all__ = [
    "BYOLHeads",
    "MLPHead",
    "SentenceHeads",
    "StructureHeads",
    "byol_loss",
    "structure_kl_loss",
    "tlm_loss",
    "word_infonce_loss",
]
