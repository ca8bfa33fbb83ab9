"""build_corpus / build_heldout: the whole read -> filter -> mix -> shuffle chain."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mmkd_ds.config.schema import DataConfig, SourceConfig
from mmkd_ds.data.corpus import CorpusError, build_corpus, build_heldout


@pytest.fixture
def corpus_dir(tmp_path):
    de = [f"Sentence number {i}\tSatz Nummer {i}" for i in range(12)]
    de.insert(3, "this line has no tab")
    (tmp_path / "a.en-de.tsv").write_text("\n".join(de) + "\n", encoding="utf-8")
    (tmp_path / "b.en-sw.tsv").write_bytes(b"One\tMoja\r\nTwo\tMbili\r\nThree \xff\tTatu\r\n")
    rows = [{"en": f"Line {i}", "xx": f"Ligne {i}", "lang": "fr"} for i in range(6)]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    text += json.dumps({"en": "far too long for its translation here", "xx": "x", "lang": "fr"}) + "\n"
    (tmp_path / "c.jsonl").write_text(text, encoding="utf-8")
    return tmp_path


def _cfg(d, **kw) -> DataConfig:
    kw.setdefault("heldout", [])
    return DataConfig(
        sources=[SourceConfig(path=str(d / "*.tsv")), SourceConfig(path=str(d / "c.jsonl"))], **kw
    )


def test_build_corpus_counts_and_summary(corpus_dir):
    corpus = build_corpus(_cfg(corpus_dir))
    assert corpus.lang_counts == {"de": 12, "fr": 6, "sw": 2}
    assert corpus.mixed_counts == corpus.lang_counts
    assert len(corpus.pairs) == 20
    assert corpus.log.counts == {"no_tab": 1, "invalid_utf8": 1, "bad_json": 1, "length_ratio": 1}
    assert corpus.log.repairs == {"crlf": 3}
    assert corpus.summary() == (
        "corpus: 20 pairs (de 12, fr 6, sw 2); skipped 4 "
        "(bad_json 1, invalid_utf8 1, length_ratio 1, no_tab 1); repaired 3 (crlf 3)"
    )
    # Origins name a file relative to its source's root (with the root's name), not by its
    # absolute path: they go into the shards.
    assert f"{corpus_dir.name}/a.en-de.tsv:4" in corpus.log.summary()
    assert f"{corpus_dir.name}/c.jsonl:7" in corpus.log.summary()
    assert str(corpus_dir) not in corpus.log.summary()


def test_build_corpus_is_shuffled_deterministically(corpus_dir):
    a = build_corpus(_cfg(corpus_dir, seed=5)).pairs
    assert a == build_corpus(_cfg(corpus_dir, seed=5)).pairs
    assert a != build_corpus(_cfg(corpus_dir, seed=6)).pairs
    in_file_order = build_heldout(DataConfig(heldout=_cfg(corpus_dir).sources)).pairs
    assert a != in_file_order and Counter(a) == Counter(in_file_order)


def test_build_corpus_mixing_and_identity_pairs(corpus_dir):
    corpus = build_corpus(_cfg(corpus_dir, alpha=0.0, mix_size=30, identity_pairs=True))
    # 20 translation pairs plus one identity pair per distinct English sentence (all distinct).
    assert corpus.lang_counts == {"de": 12, "en": 20, "fr": 6, "sw": 2}
    assert corpus.mixed_counts == {"de": 8, "en": 8, "fr": 7, "sw": 7}  # largest remainder
    assert len(corpus.pairs) == 30
    assert all(p.en == p.xx for p in corpus.pairs if p.lang == "en")
    assert re.match(r"corpus: 30 pairs \(de 8, en 8, fr 7, sw 7\) mixed from 40 usable; skipped 4", corpus.summary())


def test_no_usable_pair_raises_with_reasons(tmp_path):
    path = tmp_path / "bad.en-de.tsv"
    path.write_bytes(b"no tab here\n\xff\xfe\tx\nHello\t \n")
    with pytest.raises(CorpusError) as info:
        build_corpus(DataConfig(sources=[SourceConfig(path=str(path))], heldout=[]))
    message = str(info.value)
    for reason in ("no_tab", "invalid_utf8", "empty_side"):
        assert reason in message
    assert str(path) in message and f"{tmp_path.name}/bad.en-de.tsv:2" in message
    assert isinstance(info.value, ValueError)


def test_heldout_keeps_file_order_and_may_be_empty(corpus_dir):
    held = build_heldout(DataConfig(heldout=[SourceConfig(path=str(corpus_dir / "a.en-de.tsv"))]))
    assert [p.en for p in held.pairs] == [f"Sentence number {i}" for i in range(12)]
    assert held.log.counts == {"no_tab": 1}
    empty = build_heldout(DataConfig(heldout=[]))
    assert empty.pairs == [] and empty.lang_counts == {}


def test_heldout_with_no_usable_pair_raises(tmp_path):
    path = tmp_path / "held.en-de.tsv"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="blank_line"):
        build_heldout(DataConfig(heldout=[SourceConfig(path=str(path))]))
