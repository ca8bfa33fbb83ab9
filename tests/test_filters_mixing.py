"""Length filters, language weights and mixing, identity pairs, the seeded shuffle."""

from __future__ import annotations

from collections import Counter

import pytest

from mmkd_ds.config.schema import DataConfig
from mmkd_ds.data.filters import filter_pairs
from mmkd_ds.data.mixing import add_identity_pairs, language_weights, mix_languages, shuffle_pairs
from mmkd_ds.data.pairs import Pair
from mmkd_ds.data.skips import SkipLog


def _p(en: str, xx: str, lang: str = "de", origin: str = "t:1") -> Pair:
    return Pair(en, xx, lang, origin)


def test_filter_pairs_drops_and_counts_each_reason():
    cfg = DataConfig(max_words=6, max_length_ratio=2.0)
    pairs = [
        _p("Hello world", "Hallo Welt", origin="f:1"),  # kept
        _p("", "Leer", origin="f:2"),  # empty_side
        _p("Not empty", "", origin="f:3"),  # empty_side
        _p("one two three four five six seven", "eins", origin="f:4"),  # too_many_words (en 7)
        _p("one two three four", "eins", origin="f:5"),  # length_ratio 4 > 2
        _p("one two three four", "eins zwei", origin="f:6"),  # ratio exactly 2: kept
        # Punctuation counts as words (shared pre-tokenizer): 4 words against 1 -> dropped,
        # although a whitespace count (2 against 1) would keep it.
        _p("Yes, no!", "Ja", origin="f:7"),
        _p("a b c d e f", "a b c d e f", origin="f:8"),  # exactly max_words: kept
    ]
    log = SkipLog()
    kept = list(filter_pairs(pairs, cfg, log))
    assert [p.origin for p in kept] == ["f:1", "f:6", "f:8"]
    assert log.counts == {"empty_side": 2, "too_many_words": 1, "length_ratio": 2}
    assert "f:4" in log.summary() and "f:5" in log.summary()


def test_language_weights_for_alpha_0_half_1():
    counts = {"de": 100, "sw": 25, "ur": 0}
    assert language_weights(counts, 0.0) == pytest.approx({"de": 0.5, "sw": 0.5})
    assert language_weights(counts, 0.5) == pytest.approx({"de": 2 / 3, "sw": 1 / 3})
    assert language_weights(counts, 1.0) == pytest.approx({"de": 0.8, "sw": 0.2})
    assert language_weights({}, 1.0) == {}


def _corpus(sizes: dict[str, int]) -> list[Pair]:
    return [_p(f"{lang} sentence {i}", f"x {i}", lang, f"{lang}.tsv:{i + 1}") for lang, n in sizes.items() for i in range(n)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("size", [0, 1, 10, 97, 1000])
def test_mix_total_is_exact(alpha, size):
    pairs = _corpus({"de": 60, "fr": 30, "sw": 7})
    mixed = mix_languages(pairs, alpha, size, seed=3)
    assert len(mixed) == (size or len(pairs))


def test_mix_alpha_0_gives_even_shares_and_upsamples():
    pairs = _corpus({"de": 60, "fr": 30, "sw": 7})
    mixed = mix_languages(pairs, 0.0, 100, seed=1)
    counts = Counter(p.lang for p in mixed)
    assert sorted(counts.values()) == [33, 33, 34]
    sw = Counter(p for p in mixed if p.lang == "sw")
    # 33 or 34 from 7 pairs: every pair 4 times, a seeded few a 5th time.
    assert set(sw) == {p for p in pairs if p.lang == "sw"}
    assert set(sw.values()) <= {4, 5}
    de = [p for p in mixed if p.lang == "de"]
    assert len(set(de)) == len(de)  # down-sampling never repeats a pair


def test_mix_alpha_half_shares():
    pairs = _corpus({"de": 400, "sw": 100})
    counts = Counter(p.lang for p in mix_languages(pairs, 0.5, 300, seed=0))
    assert counts == {"de": 200, "sw": 100}  # sqrt: 20 : 10


def test_mix_alpha_1_full_size_is_the_input_multiset():
    pairs = _corpus({"de": 13, "fr": 29, "sw": 5, "ur": 1})
    mixed = mix_languages(pairs, 1.0, len(pairs), seed=42)
    assert Counter(mixed) == Counter(pairs)


def test_mix_is_deterministic_and_depends_on_seed():
    pairs = _corpus({"de": 50, "sw": 50})
    a = mix_languages(pairs, 0.0, 40, seed=7)
    assert a == mix_languages(pairs, 0.0, 40, seed=7)
    assert a != mix_languages(pairs, 0.0, 40, seed=8)


def test_mix_empty_input():
    assert mix_languages([], 1.0, 10, seed=0) == []


def test_identity_pairs_one_per_distinct_english():
    pairs = [_p("Hi", "Hallo", "de", "a:1"), _p("Hi", "Salut", "fr", "b:1"), _p("Bye", "Tschüss", "de", "a:2")]
    out = add_identity_pairs(pairs)
    assert out[:3] == pairs
    assert out[3:] == [Pair("Hi", "Hi", "en", "a:1"), Pair("Bye", "Bye", "en", "a:2")]


def test_shuffle_is_a_deterministic_permutation():
    pairs = _corpus({"de": 50})
    a = shuffle_pairs(pairs, 5)
    assert a == shuffle_pairs(pairs, 5)
    assert a != pairs and sorted(a, key=lambda p: p.origin) == sorted(pairs, key=lambda p: p.origin)
    assert a != shuffle_pairs(pairs, 6)
    assert pairs == _corpus({"de": 50})  # the input list is not modified
