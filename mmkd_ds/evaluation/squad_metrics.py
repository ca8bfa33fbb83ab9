"""SQuAD v1.1 answer metrics: exact match and token-level F1, as the official script computes them.

Normalisation is the official ``evaluate-v1.1.py`` one, step for step: lower-case, drop every
character of ``string.punctuation`` (ASCII punctuation only, so e.g. the Urdu full stop "۔" or
the Chinese "，" are kept, as in the official script), replace the English articles a/an/the
(whole words, ``\\b`` boundaries) by a space, and collapse whitespace. Non-ASCII letters are
kept untouched (``str.lower`` lower-cases them).

Per question the score is the maximum over its ground-truth answers. Scores here are in [0, 1]
(the project's :class:`~mmkd_ds.evaluation.report.TaskResult` convention); the official script
reports the same numbers multiplied by 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_truths(ground_truths, who: str) -> list[str]:
    if isinstance(ground_truths, str):
        raise TypeError(f"{who}: ground_truths must be a list of strings, got a single string {ground_truths!r}")
    truths = list(ground_truths)
    if not truths:
        raise ValueError(f"{who}: no ground-truth answers")
    return truths


def _f1_single(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(truth_tokens)  # multiset intersection
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truths: list[str]) -> float:
    """1.0 if the normalised prediction equals some normalised ground truth, else 0.0."""
    truths = _check_truths(ground_truths, "exact_match")
    pred = normalize_answer(prediction)
    return float(max(pred == normalize_answer(t) for t in truths))


def f1(prediction: str, ground_truths: list[str]) -> float:
    """Token-level F1 (bag of normalised tokens, counted with multiplicity), max over ground truths.

    As in the official script, no common token gives 0 (an empty prediction always scores 0).
    """
    truths = _check_truths(ground_truths, "f1")
    return max(_f1_single(prediction, t) for t in truths)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """``{"exact_match": ..., "f1": ...}`` averaged over the questions of ``references``, in [0, 1].

    Multiply by 100 to compare with the official script's output. As in the official script, a
    question without a prediction scores 0; a prediction for an id that is not in ``references``
    is an error (it means predictions and references come from different data).
    """
    if not references:
        raise ValueError("squad_scores: no references")
    extra = sorted(set(predictions) - set(references))
    if extra:
        shown = ", ".join(map(repr, extra[:5])) + (" ..." if len(extra) > 5 else "")
        raise ValueError(f"squad_scores: {len(extra)} prediction id(s) not in the references: {shown}")
    em_total = f1_total = 0.0
    for qid, truths in references.items():
        if qid not in predictions:
            continue
        em_total += exact_match(predictions[qid], truths)
        f1_total += f1(predictions[qid], truths)
    n = len(references)
    return {"exact_match": em_total / n, "f1": f1_total / n}
