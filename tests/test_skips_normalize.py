"""SkipLog bookkeeping and text normalisation."""

from __future__ import annotations

import pytest

from mmkd_ds.data.normalize import has_control_chars, normalize_text
from mmkd_ds.data.skips import SkipLog


def test_skip_and_repair_are_counted_separately():
    log = SkipLog(report_examples=2)
    log.skip("no_tab", "a.tsv:3", "no tab")
    log.skip("no_tab", "a.tsv:5")
    log.skip("no_tab", "a.tsv:9")
    log.skip("blank_line", "a.tsv:4")
    log.repair("crlf", "a.tsv:1")
    assert log.counts == {"no_tab": 3, "blank_line": 1}
    assert log.repairs == {"crlf": 1}
    assert log.total_skipped == 4
    assert log.total_repaired == 1
    # Only the first report_examples are kept, in order, as (origin, reason, detail).
    assert log.examples["no_tab"] == [("a.tsv:3", "no_tab", "no tab"), ("a.tsv:5", "no_tab", "")]


def test_summary_names_reasons_counts_and_file_lines():
    log = SkipLog(report_examples=2)
    for line in (3, 5, 9):
        log.skip("no_tab", f"a.tsv:{line}")
    log.skip("invalid_utf8", "b.tsv:7", "byte 4")
    log.repair("bom", "a.tsv:1")
    text = log.summary()
    lines = text.splitlines()
    assert lines[0] == "skipped 4, repaired 1"
    no_tab = next(l for l in lines if "no_tab" in l)
    assert "3" in no_tab and "a.tsv:3" in no_tab and "a.tsv:5" in no_tab
    assert "a.tsv:9" not in no_tab and "1 more" in no_tab
    assert any("invalid_utf8" in l and "b.tsv:7 (byte 4)" in l for l in lines)
    assert any(l.strip().startswith("repaired bom: 1") and "a.tsv:1" in l for l in lines)
    assert log.short() == "no_tab 3, invalid_utf8 1"
    assert log.short("repaired") == "bom 1"


def test_empty_summary_and_long_detail_is_shortened():
    log = SkipLog()
    assert log.summary() == "nothing skipped or repaired"
    log.skip("line_too_long", "x:1", "y" * 1000)
    assert len(log.examples["line_too_long"][0][2]) <= 80


def test_merge_adds_counts_and_keeps_example_limit():
    a = SkipLog(report_examples=2)
    b = SkipLog(report_examples=5)
    a.skip("no_tab", "a:1")
    b.skip("no_tab", "b:1")
    b.skip("no_tab", "b:2")
    b.skip("bad_json", "b:3")
    b.repair("crlf", "b:4")
    a.merge(b)
    assert a.counts == {"no_tab": 3, "bad_json": 1}
    assert a.repairs == {"crlf": 1}
    assert [o for o, _, _ in a.examples["no_tab"]] == ["a:1", "b:1"]
    assert b.counts == {"no_tab": 2, "bad_json": 1}  # the other log is left as it was


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Cafe\u0301", "Caf\u00e9"),  # decomposed accent -> NFC
        ("\ufeffHello\ufeff world", "Hello world"),  # BOM anywhere
        ("  a \t b\n\nc\u00a0\u00a0d\u3000e\u2028f  ", "a b c d e f"),  # Unicode whitespace runs
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x0b", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_control_chars_detected(ch):
    assert has_control_chars(f"abc{ch}def")


@pytest.mark.parametrize("s", ["tab\there", "new\nline", "cr\rhere", "ünïcödé €", "اردو", ""])
def test_allowed_chars_are_not_control(s):
    assert not has_control_chars(s)
