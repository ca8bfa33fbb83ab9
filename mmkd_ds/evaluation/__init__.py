"""Evaluation of distilled students: parallel-sentence retrieval (Tatoeba style) on held-out pairs.

See :mod:`mmkd_ds.evaluation.retrieval`.
"""

from mmkd_ds.evaluation.retrieval import (
    RetrievalResult,
    embed_sentences,
    evaluate_retrieval,
    load_encoder,
    retrieval_accuracy,
)

__all__ = ["RetrievalResult", "embed_sentences", "evaluate_retrieval", "load_encoder", "retrieval_accuracy"]
