"""MTEB bitext files read from disk (mmkd_ds/evaluation/bitext.py), in the layouts the mteb
package leaves in the Hugging Face caches, built here in miniature: the hub snapshot of
mteb/tatoeba-bitext-mining (parquet, the ``default`` config with a ``lang`` column), the
datasets cache (Arrow stream files per config), JSON lines per language, BUCC.v2 and the
original BUCC rows with gold indices; and ``mmkd-eval --task retrieval --bitext DIR``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmkd_ds.evaluation.bitext import language_pair, read_bitext

DEU = [("Guten Morgen.", "Good morning."), ("Ich habe Hunger.", "I am hungry."), ("Wo ist der Bahnhof?", "Where is the station?")]
SWH = [("Habari ya asubuhi.", "Good morning."), ("Nina njaa.", "I am hungry.")]


def tatoeba_rows(lang: str, pairs) -> list[dict]:
    """As the task stores them: sentence1 in the first language of "deu-eng", sentence2 in English."""
    return [{"sentence1": xx, "sentence2": en, "lang": f"{lang}-eng"} for xx, en in pairs]


def write_arrow_stream(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_hub_snapshot_parquet_default_config_and_datasets_cache_count_once(tmp_path):
    hub = tmp_path / "hub" / "datasets--mteb--tatoeba-bitext-mining" / "snapshots" / ("69e8f12" + "0" * 33)
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(tatoeba_rows("deu", DEU) + tatoeba_rows("swh", SWH)),
                   hub / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(tatoeba_rows("deu", DEU[:1])), hub / "train-00000-of-00001.parquet")
    # The datasets cache of the same data, a per-language config without a lang column.
    cache = tmp_path / "datasets" / "mteb___tatoeba-bitext-mining" / "deu-eng" / "0.0.0" / "abc123"
    write_arrow_stream(cache / "tatoeba-bitext-mining-test.arrow",
                       [{"sentence1": xx, "sentence2": en} for xx, en in DEU])
    (cache / "dataset_info.json").write_text("{}")

    bitext = read_bitext(tmp_path)
    assert bitext.counts() == {"deu": 3, "swh": 2}
    assert bitext.duplicates == 1  # the cache's deu-eng repeats the snapshot's
    assert bitext.skipped == {"files of another split than test": 1}
    first = bitext.pairs[0]
    assert (first.en, first.xx, first.lang) == ("Good morning.", "Guten Morgen.", "deu")
    assert read_bitext(tmp_path, languages=["swh"]).counts() == {"swh": 2}
    with pytest.raises(ValueError, match="no pairs for urd"):
        read_bitext(tmp_path, languages=["urd"])


def test_jsonl_per_language_and_bucc_layouts(tmp_path):
    (tmp_path / "test").mkdir()
    with gzip.open(tmp_path / "test" / "deu-eng.jsonl.gz", "wt", encoding="utf-8") as f:
        for xx, en in DEU:
            f.write(json.dumps({"sentence1": xx, "sentence2": en}) + "\n")
    # BUCC.v2: config "de-en", English second; a row with an empty side is skipped.
    (tmp_path / "de-en").mkdir()
    rows = [{"sentence1": xx, "sentence2": en} for xx, en in DEU[:2]] + [{"sentence1": "", "sentence2": "x"}]
    (tmp_path / "de-en" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # Original BUCC: one row of both lists and 1-based gold pairs (i in sentence1, j in sentence2).
    (tmp_path / "fr-en").mkdir()
    bucc = {"sentence1": ["Bonjour.", "Merci.", "Au revoir."], "sentence2": ["Goodbye.", "Hello.", "Thanks.", "Spare."],
            "gold": [[1, 2], [2, 3], [3, 1]]}
    pq.write_table(pa.Table.from_pylist([bucc]), tmp_path / "fr-en" / "test-00000-of-00001.parquet")

    bitext = read_bitext(tmp_path)
    assert bitext.counts() == {"de": 2, "deu": 3, "fr": 3}
    assert bitext.skipped["rows with an empty or missing sentence"] == 1
    fr = [(p.en, p.xx) for p in bitext.pairs if p.lang == "fr"]
    assert fr == [("Hello.", "Bonjour."), ("Thanks.", "Merci."), ("Goodbye.", "Au revoir.")]


def test_language_pair_and_errors(tmp_path):
    assert language_pair("deu-eng") == ("deu", "eng")
    assert language_pair("mteb___bucc-bitext-mining/de-en/0.0.0") == ("de", "en")
    assert language_pair("eng_Latn-kat_Geor") == ("eng_Latn", "kat_Geor")
    assert language_pair("tatoeba-bitext-mining") is None
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_bitext(tmp_path / "missing")
    (tmp_path / "README.md").write_text("no data")
    with pytest.raises(FileNotFoundError, match="no parquet"):
        read_bitext(tmp_path)
    (tmp_path / "fra-deu").mkdir()
    (tmp_path / "fra-deu" / "test.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b"}) + "\n")
    with pytest.raises(ValueError, match="no usable xx-en pair"):
        read_bitext(tmp_path)


def test_mmkd_eval_scores_bitext(tmp_path, student_tokenizer, capsys):
    from conftest import make_tiny_bert
    from mmkd_ds.cli.evaluate import main

    data = tmp_path / "tatoeba"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(tatoeba_rows("deu", DEU) + tatoeba_rows("swh", SWH)),
                   data / "test-00000-of-00001.parquet")
    model = make_tiny_bert(tmp_path / "model", student_tokenizer, hidden=16, layers=1)
    out = tmp_path / "eval"
    assert main(["--task", "retrieval", "--model", str(model), "--bitext", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "retrieval on 5 held-out pairs (deu 3, swh 2) from 1 MTEB bitext files under" in printed
    result = json.loads((out / "retrieval.json").read_text())
    assert {k: v["pairs"] for k, v in result["per_language"].items()} == {"deu": 3, "swh": 2}
    assert result["low_resource_average"] is not None  # swh counts as low-resource, as sw does
    assert main(["--task", "retrieval", "--model", str(model), "--bitext", str(tmp_path / "none")]) == 2
    assert "--bitext" in capsys.readouterr().err
