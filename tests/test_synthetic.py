"""The synthetic corpus: determinism, consistency of its made-up languages, TSV round trip."""

from __future__ import annotations

import re
from collections import Counter

from mmkd_ds.config.schema import DataConfig, SourceConfig
from mmkd_ds.data.filters import filter_pairs
from mmkd_ds.data.readers import read_source
from mmkd_ds.data.skips import SkipLog
from mmkd_ds.data.synthetic import _ARTICLES, _language, main, synthetic_pairs, write_synthetic_tsv

_WORD = re.compile(r"[^\s,.?!]+")


def test_same_seed_same_pairs_other_seed_differs():
    a = list(synthetic_pairs(200, seed=1))
    assert a == list(synthetic_pairs(200, seed=1))
    b = list(synthetic_pairs(200, seed=2))
    assert [p.en for p in a] != [p.en for p in b]
    assert len({p.en for p in a} & {p.en for p in b}) < 5


def test_shape_languages_and_diversity():
    pairs = list(synthetic_pairs(400, seed=0, langs=("de", "ur", "hi")))
    assert [p.lang for p in pairs[:6]] == ["de", "ur", "hi", "de", "ur", "hi"]
    lengths = [len(p.en.split()) for p in pairs]
    assert min(lengths) >= 4 and max(lengths) <= 30
    assert len(set(lengths)) > 15  # varied lengths
    assert len({p.en for p in pairs}) == len(pairs)
    assert all(p.en[-1] in ".?!" and p.xx[-1] == p.en[-1] for p in pairs)
    assert all(re.search("[\u0600-\u06ff]", p.xx) for p in pairs if p.lang == "ur")
    assert all(re.search("[\u0900-\u097f]", p.xx) for p in pairs if p.lang == "hi")
    # Every pair passes the default filters, so a synthetic run loses nothing.
    log = SkipLog()
    assert len(list(filter_pairs(pairs, DataConfig(), log))) == len(pairs) and log.total_skipped == 0


def test_translations_follow_one_lexicon_whatever_the_seed():
    for seed in (0, 99):
        for pair in synthetic_pairs(120, seed=seed):
            language = _language(pair.lang)
            en_words = [w.lower() for w in _WORD.findall(pair.en)]
            if language.drop_articles and any(w not in _ARTICLES for w in en_words):
                en_words = [w for w in en_words if w not in _ARTICLES]
            # Numbers are not in the lexicon and are copied unchanged.
            expected = Counter(t.lower() for w in en_words for t in language.lexicon.get(w, (w,)))
            got = Counter(w.lower() for w in _WORD.findall(pair.xx))
            assert got == expected, pair


def test_tsv_round_trip_through_the_reader(tmp_path):
    files = write_synthetic_tsv(tmp_path, 200, seed=3, langs=("de", "sw"), pairs_per_file=60)
    assert [f.name for f in files] == [
        "synthetic-000.en-de.tsv",
        "synthetic-000.en-sw.tsv",
        "synthetic-001.en-de.tsv",
        "synthetic-001.en-sw.tsv",
    ]
    assert not list(tmp_path.glob("*.part"))
    log = SkipLog()
    read = list(read_source(SourceConfig(path=str(tmp_path / "synthetic-*.tsv")), log, 20_000))
    assert log.total_skipped == 0 and log.total_repaired == 0
    key = lambda p: (p.lang, p.en, p.xx)  # noqa: E731
    assert sorted(map(key, read)) == sorted(map(key, synthetic_pairs(200, 3, ("de", "sw"))))


def test_main_writes_files_and_prints_summary(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--pairs", "10", "--seed", "4", "--langs", "fr,ur,sw"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mmkd-synth: wrote 10 pairs (fr 4, ur 3, sw 3) in 3 files")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        "synthetic-000.en-fr.tsv",
        "synthetic-000.en-sw.tsv",
        "synthetic-000.en-ur.tsv",
    ]
