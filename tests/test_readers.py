"""The TSV, JSONL and Hugging Face readers, with every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkd_ds.config.schema import SourceConfig
from mmkd_ds.data import readers
from mmkd_ds.data.pairs import Pair
from mmkd_ds.data.readers import lang_from_filename, read_source
from mmkd_ds.data.skips import SkipLog

MAX = 1000  # max_line_bytes for these tests; the long line below is 100 kB


def _read(src: SourceConfig, log: SkipLog | None = None) -> tuple[list[Pair], SkipLog]:
    log = log or SkipLog(report_examples=10)
    return list(read_source(src, log, MAX)), log


def named(path: Path) -> str:
    """How origins name a file of a source given by its path: its directory's name / its name."""
    return f"{path.parent.name}/{path.name}"


def test_tsv_every_bad_line_is_counted_and_good_lines_survive(tmp_path):
    path = tmp_path / "mixed.en-de.tsv"
    lines = [
        b"\xef\xbb\xbfHello world\tHallo Welt",  # 1 BOM (repaired)
        b"Good morning\tGuten Morgen\r",  # 2 CRLF (repaired)
        b"no tab on this line",  # 3
        b"caf\xe9 latin-1\tKaffee",  # 4 invalid UTF-8
        b"bell\x07here\tKlingel",  # 5 control character
        b"",  # 6 blank
        b"x" * 100_000 + b"\ty",  # 7 100 kB line
        b"   \t  ",  # 8 only whitespace: blank
        b"The  cat\tDie\xc2\xa0Katze",  # 9 good, normalised
        b"Last line\tLetzte Zeile",  # 10 good, no final newline
    ]
    path.write_bytes(b"\n".join(lines))
    pairs, log = _read(SourceConfig(path=str(path)))
    assert pairs == [
        Pair("Hello world", "Hallo Welt", "de", f"{named(path)}:1"),
        Pair("Good morning", "Guten Morgen", "de", f"{named(path)}:2"),
        Pair("The cat", "Die Katze", "de", f"{named(path)}:9"),
        Pair("Last line", "Letzte Zeile", "de", f"{named(path)}:10"),
    ]
    assert log.counts == {
        "no_tab": 1,
        "invalid_utf8": 1,
        "control_chars": 1,
        "blank_line": 2,
        "line_too_long": 1,
    }
    assert log.repairs == {"bom": 1, "crlf": 1}
    summary = log.summary()
    for reason, line in [
        ("no_tab", 3),
        ("invalid_utf8", 4),
        ("control_chars", 5),
        ("blank_line", 6),
        ("line_too_long", 7),
        ("bom", 1),
        ("crlf", 2),
    ]:
        reason_line = next(l for l in summary.splitlines() if f" {reason}:" in l)
        assert f"{named(path)}:{line}" in reason_line
    assert len(summary) < 5000  # the 100 kB line is not copied into the report


def test_tsv_crlf_file_throughout(tmp_path):
    path = tmp_path / "win.en-fr.tsv"
    path.write_bytes(b"One\tUn\r\nTwo\tDeux\r\n")
    pairs, log = _read(SourceConfig(path=str(path)))
    assert [(p.en, p.xx) for p in pairs] == [("One", "Un"), ("Two", "Deux")]
    assert log.repairs == {"crlf": 2} and log.total_skipped == 0


def test_tsv_language_column_and_missing_column(tmp_path):
    path = tmp_path / "pairs.tsv"  # no language in the name
    path.write_text("Hello\tHabari\tsw\nHi\tHallo\tDE\nTwo columns only\tZwei\nNo lang\tKein\t \n", encoding="utf-8")
    pairs, log = _read(SourceConfig(path=str(path), lang_column=2))
    assert [(p.en, p.lang) for p in pairs] == [("Hello", "sw"), ("Hi", "de")]
    assert log.counts == {"missing_column": 1, "missing_lang": 1}
    assert f"{named(path)}:3" in log.summary() and f"{named(path)}:4" in log.summary()


def test_tsv_columns_can_be_swapped_and_lang_overrides_name(tmp_path):
    path = tmp_path / "c.en-de.tsv"
    path.write_text("Bonjour\tHello\n", encoding="utf-8")
    pairs, _ = _read(SourceConfig(path=str(path), en_column=1, xx_column=0, lang="FR"))
    assert pairs == [Pair("Hello", "Bonjour", "fr", f"{named(path)}:1")]


def test_tsv_without_any_language_is_a_clear_error(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Hello\tHabari\n", encoding="utf-8")
    with pytest.raises(ValueError, match="pairs.tsv.*lang"):
        _read(SourceConfig(path=str(path)))


@pytest.mark.parametrize(
    "name, lang",
    [
        ("corpus.en-sw.tsv", "sw"),
        ("corpus.sw.tsv", "sw"),
        ("train.en-pt-br.tsv", "pt-br"),
        ("train.en_zh_hans.jsonl", "zh-hans"),
        ("OPUS.EN-DE.TSV", "de"),
        ("x.y.en-ur.txt", "ur"),
        ("pairs.tsv", None),
        ("my.training.tsv", None),
    ],
)
def test_lang_from_filename(name, lang):
    assert lang_from_filename(name) == lang


def test_glob_reads_files_sorted_and_infers_each_language(tmp_path):
    (tmp_path / "b.en-fr.tsv").write_text("Two\tDeux\n", encoding="utf-8")
    (tmp_path / "a.en-de.tsv").write_text("One\tEins\n", encoding="utf-8")
    (tmp_path / "c.en-sw.jsonl").write_text('{"en": "Three", "xx": "Tatu"}\n', encoding="utf-8")
    pairs, _ = _read(SourceConfig(path=str(tmp_path / "*.*")))
    assert [(p.en, p.lang) for p in pairs] == [("One", "de"), ("Two", "fr"), ("Three", "sw")]


def test_missing_file_and_empty_glob_name_the_path(tmp_path):
    missing = tmp_path / "nope.en-de.tsv"
    with pytest.raises(FileNotFoundError, match="nope.en-de.tsv"):
        _read(SourceConfig(path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"none\*\.tsv"):
        _read(SourceConfig(path=str(tmp_path / "none*.tsv")))


def test_unknown_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "data.en-de.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="data.en-de.csv"):
        _read(SourceConfig(path=str(path)))
    # An explicit format reads it anyway.
    path.write_text("a\tb\n", encoding="utf-8")
    pairs, _ = _read(SourceConfig(path=str(path), format="tsv"))
    assert pairs[0].xx == "b"


def test_sample_prefix_globs_the_bundled_split(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SAMPLE_DIR", tmp_path)
    (tmp_path / "train.en-de.tsv").write_text("One\tEins\n", encoding="utf-8")
    (tmp_path / "train.en-sw.tsv").write_text("One\tMoja\n", encoding="utf-8")
    (tmp_path / "heldout.en-de.tsv").write_text("Two\tZwei\n", encoding="utf-8")
    pairs, _ = _read(SourceConfig(path="sample:train"))
    assert [(p.xx, p.lang) for p in pairs] == [("Eins", "de"), ("Moja", "sw")]
    pairs, _ = _read(SourceConfig(path="sample:heldout"))
    assert [p.xx for p in pairs] == ["Zwei"]
    with pytest.raises(FileNotFoundError, match="sample:dev"):
        _read(SourceConfig(path="sample:dev"))


def test_jsonl_every_bad_line_is_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [
        b'\xef\xbb\xbf{"en": "Hello", "xx": "Hallo", "lang": "de"}',  # 1 BOM
        b'{"en": "Hi", "xx": "Salut", "lang": "fr"}\r',  # 2 CRLF
        b'{"en": "broken", "xx": ',  # 3 bad JSON
        b'{"en": "No translation", "lang": "de"}',  # 4 missing field
        b'{"en": "Number", "xx": 42, "lang": "de"}',  # 5 bad field
        b'["en", "xx"]',  # 6 not an object
        b"",  # 7 blank
        b'{"en": "caf\xe9", "xx": "x", "lang": "fr"}',  # 8 invalid UTF-8
        b'{"en": "bell\\u0007", "xx": "x", "lang": "fr"}',  # 9 escaped control character
        b'{"en": "' + b"y" * 100_000 + b'", "xx": "z", "lang": "de"}',  # 10 too long
        b'{"en": "  Spaced   out ", "xx": "Weit\\u00a0weg", "lang": "DE"}',  # 11 good, normalised
        b'{"en": "null", "xx": null, "lang": "de"}',  # 12 null counts as missing
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs, log = _read(SourceConfig(path=str(path)))
    assert pairs == [
        Pair("Hello", "Hallo", "de", f"{named(path)}:1"),
        Pair("Hi", "Salut", "fr", f"{named(path)}:2"),
        Pair("Spaced out", "Weit weg", "de", f"{named(path)}:11"),
    ]
    assert log.counts == {
        "bad_json": 1,
        "missing_field": 3,
        "bad_field": 1,
        "blank_line": 1,
        "invalid_utf8": 1,
        "control_chars": 1,
        "line_too_long": 1,
    }
    assert log.repairs == {"bom": 1, "crlf": 1}
    summary = log.summary()
    for reason, line in [("bad_json", 3), ("missing_field", 4), ("bad_field", 5), ("control_chars", 9)]:
        assert f"{named(path)}:{line}" in next(l for l in summary.splitlines() if f" {reason}:" in l)


def test_jsonl_custom_fields_and_language_from_name(tmp_path):
    path = tmp_path / "data.en-sw.jsonl"
    path.write_text(json.dumps({"source": "Water", "target": "Maji"}) + "\n", encoding="utf-8")
    pairs, _ = _read(SourceConfig(path=str(path), en_field="source", xx_field="target"))
    assert pairs == [Pair("Water", "Maji", "sw", f"{named(path)}:1")]


def test_jsonl_opus_translation_rows(tmp_path):
    path = tmp_path / "opus.jsonl"
    rows = [
        {"translation": {"en": "Good night", "sw": "Usiku mwema"}},  # language: the other key
        {"translation": {"en": "Thanks", "de": "Danke", "fr": "Merci"}},  # ambiguous
        {"translation": "not a dict"},
        {"other": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    pairs, log = _read(SourceConfig(path=str(path), translation_field="translation"))
    assert pairs == [Pair("Good night", "Usiku mwema", "sw", f"{named(path)}:1")]
    assert log.counts == {"missing_field": 3}
    # With the language given, the three-key row gives its French side.
    pairs, log = _read(SourceConfig(path=str(path), translation_field="translation", lang="fr"))
    assert [(p.en, p.xx, p.lang) for p in pairs] == [("Thanks", "Merci", "fr")]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_hf_local_json_translation_rows(tmp_path, hf_cache):
    path = tmp_path / "opus-hf.jsonl"
    rows = [
        {"translation": {"en": "Good  night", "sw": "Usiku mwema"}},
        {"translation": {"en": "Only English"}},  # HF fills "sw" with null: missing
        {"translation": {"en": "Morning", "sw": "Asubuhi"}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    src = SourceConfig(format="hf", hf_name="json", path=str(path), translation_field="translation")
    pairs, log = _read(src)
    assert pairs == [
        Pair("Good night", "Usiku mwema", "sw", "hf:json/default/train:0"),
        Pair("Morning", "Asubuhi", "sw", "hf:json/default/train:2"),
    ]
    assert log.counts == {"missing_field": 1}
    assert "hf:json/default/train:1" in log.summary()


def test_hf_local_json_flat_fields(tmp_path, hf_cache):
    path = tmp_path / "flat.jsonl"
    rows = [
        {"en": "One", "xx": "Eins", "lang": "de"},
        {"en": "Two", "xx": None, "lang": "de"},
        {"en": "Three", "xx": "Trois", "lang": "fr"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    pairs, log = _read(SourceConfig(format="hf", hf_name="json", path=str(path)))
    assert [(p.en, p.xx, p.lang) for p in pairs] == [("One", "Eins", "de"), ("Three", "Trois", "fr")]
    assert log.counts == {"missing_field": 1}


def test_origins_are_relative_to_the_source_root_not_absolute(tmp_path, monkeypatch):
    """A glob's origins name the file below the glob's fixed directory (with that directory's own
    name); the same files read from elsewhere, or through a relative path, give the same pairs."""
    from mmkd_ds.data.readers import origin_name, source_root

    for where in ("a", "b"):
        sub = tmp_path / where / "corpus" / "de"
        sub.mkdir(parents=True)
        (sub / "x.en-de.tsv").write_text("One\tEins\nnot a pair\n", encoding="utf-8")
    pairs_a, log_a = _read(SourceConfig(path=str(tmp_path / "a" / "corpus" / "*" / "*.tsv")))
    assert pairs_a == [Pair("One", "Eins", "de", "corpus/de/x.en-de.tsv:1")]
    assert "corpus/de/x.en-de.tsv:2" in log_a.summary() and str(tmp_path) not in log_a.summary()
    pairs_b, _ = _read(SourceConfig(path=str(tmp_path / "b" / "corpus" / "*" / "*.tsv")))
    assert pairs_b == pairs_a
    monkeypatch.chdir(tmp_path / "a")
    assert _read(SourceConfig(path="corpus/*/*.tsv"))[0] == pairs_a
    # A single file: its directory is the root.
    single = tmp_path / "a" / "corpus" / "de" / "x.en-de.tsv"
    assert _read(SourceConfig(path=str(single)))[0][0].origin == "de/x.en-de.tsv:1"
    # The bundled sample is named as the config names it.
    sample = SourceConfig(path="sample:train")
    assert source_root(sample)[1] == "sample:"
    assert origin_name(readers.SAMPLE_DIR / "train.en-de.tsv", sample) == "sample:train.en-de.tsv"
