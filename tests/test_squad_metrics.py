"""SQuAD v1.1 metrics on hand-worked examples."""

from __future__ import annotations

import pytest

from mmkd_ds.evaluation.squad_metrics import exact_match, f1, normalize_answer, squad_scores


def test_normalisation_matches_the_official_steps():
    assert normalize_answer("The Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  An   apple, a day ") == "apple day"
    # articles only as whole words: "theatre" and "anna" keep their letters
    assert normalize_answer("the theatre of Anna") == "theatre of anna"
    # punctuation inside a word is removed, not replaced by a space (official behaviour)
    assert normalize_answer("U.S.-based") == "usbased"


def test_articles_and_punctuation_are_ignored():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0


def test_partial_overlap_f1():
    # "the big red car" -> [big, red, car]; "a red car" -> [red, car]
    # common = 2: precision 2/3, recall 2/2 = 1, F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert f1("the big red car", ["a red car"]) == pytest.approx(0.8)
    assert exact_match("the big red car", ["a red car"]) == 0.0


def test_max_over_ground_truths():
    truths = ["Paris, France", "in Paris", "the city of Paris"]
    # vs "paris france": p = 1/1, r = 1/2 -> 2/3; vs "in paris": 1/2 recall -> 2/3;
    # vs "city of paris": r = 1/3 -> 0.5. The maximum is 2/3; EM against none.
    assert f1("Paris", truths) == pytest.approx(2 / 3)
    assert exact_match("Paris", truths) == 0.0
    assert exact_match("paris france", truths) == 1.0
    assert f1("City of Paris.", truths) == 1.0


def test_empty_prediction_and_no_overlap_score_zero():
    assert f1("", ["red car"]) == 0.0
    assert exact_match("", ["red car"]) == 0.0
    assert f1("blue bicycle", ["red car"]) == 0.0
    # a prediction that normalises to nothing ("The." -> "") also scores 0
    assert f1("The.", ["red car"]) == 0.0


def test_duplicate_tokens_counted_with_multiplicity():
    # pred [red, red, red] vs truth [red, car]: Counter intersection has red x1 only,
    # precision 1/3, recall 1/2, F1 = 2 * (1/3)(1/2) / (1/3 + 1/2) = 0.4
    assert f1("red red red", ["red car"]) == pytest.approx(0.4)
    # pred [red, red] vs truth [red, red, car]: common 2, precision 1, recall 2/3 -> 0.8
    assert f1("red red", ["red red car"]) == pytest.approx(0.8)


def test_non_ascii_text_is_kept():
    # Swahili: lower-cased, ASCII comma dropped
    assert exact_match("Mji wa Nairobi,", ["mji wa nairobi"]) == 1.0
    assert f1("Mji wa Nairobi", ["Nairobi"]) == pytest.approx(0.5)  # p 1/3, r 1 -> 0.5
    # Urdu: letters kept, different words do not match
    assert exact_match("پاکستان", ["پاکستان"]) == 1.0
    assert exact_match("پاکستان", ["لاہور"]) == 0.0
    assert f1("لاہور شہر", ["لاہور"]) == pytest.approx(2 / 3)  # p 1/2, r 1
    # the Urdu full stop is not ASCII punctuation: kept, as in the official script
    assert normalize_answer("لاہور۔") == "لاہور۔"
    # German umlaut lower-cased
    assert exact_match("ÜBER Köln", ["über köln"]) == 1.0


def test_squad_scores_average_over_references():
    refs = {"q1": ["eiffel tower"], "q2": ["a red car"], "q3": ["blue"]}
    preds = {"q1": "The Eiffel Tower", "q2": "the big red car"}  # q3 unanswered -> 0
    scores = squad_scores(preds, refs)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_squad_scores_errors():
    with pytest.raises(ValueError, match="no references"):
        squad_scores({}, {})
    with pytest.raises(ValueError, match="'zz'"):
        squad_scores({"zz": "x"}, {"q1": ["x"]})
    with pytest.raises(TypeError, match="list of strings"):
        f1("x", "x")
    with pytest.raises(ValueError, match="no ground-truth"):
        exact_match("x", [])
