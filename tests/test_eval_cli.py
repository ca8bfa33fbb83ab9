"""`mmkd-eval`: the transfer tasks end to end through the command line, and retrieval."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_bert
from mmkd_ds.cli.evaluate import main
from test_classification import nli_rows, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, student_tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("encoder"), student_tokenizer)


def test_xnli_from_local_data_writes_tables(tmp_path, tiny_model, capsys):
    data = tmp_path / "xnli"
    write_jsonl(data / "en" / "train.jsonl", nli_rows(24, 0))
    for i, lang in enumerate(("en", "sw")):
        write_jsonl(data / lang / "test.jsonl", nli_rows(6, i + 1))
    out = tmp_path / "out"
    code = main(["--task", "xnli", "--model", str(tiny_model), "--languages", "en,sw", "--data-dir", str(data),
                 "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sw | 6 |" in printed and "eval xnli" in printed and "low-resource" in printed
    result = json.loads((out / "xnli.json").read_text())
    assert set(result["scores"]) == {"en", "sw"} and result["settings"]["seed"] == 42
    assert (out / "xnli.md").read_text().count("|") > 8
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_language_is_a_clear_error(tmp_path, tiny_model, capsys):
    data = tmp_path / "xnli"
    write_jsonl(data / "en" / "train.jsonl", nli_rows(8, 0))
    write_jsonl(data / "en" / "test.jsonl", nli_rows(4, 1))
    code = main(["--task", "xnli", "--model", str(tiny_model), "--languages", "en,ur", "--data-dir", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'ur'" in err and str(data / "ur") in err


def test_transfer_task_needs_languages(tiny_model, capsys):
    assert main(["--task", "pawsx", "--model", str(tiny_model)]) == 2
    assert "--languages" in capsys.readouterr().err


def test_retrieval_before_and_after(tmp_path, tiny_model, capsys):
    out = tmp_path / "eval"
    assert main(["--task", "retrieval", "--model", str(tiny_model), "--baseline", str(tiny_model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # The same model on both sides: every language's change is +0.0.
    for lang in ("de", "fr", "sw", "ur"):
        assert f"| {lang} | 60 |" in printed
    assert printed.count("| +0.0 |") == 6  # 4 languages, the average and the low-resource average
    assert json.loads((out / "retrieval.json").read_text())["per_language"].keys() == {"de", "fr", "sw", "ur"}
    # retrieval.md holds the same before/after table, then the model's per-direction table.
    saved = (out / "retrieval.md").read_text()
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0] == "| language | pairs | before | after | change |" and "\n".join(table) in saved
    assert saved.index("| change |") < saved.index("| xx→en |")
    assert (out / "retrieval_baseline.json").is_file()


def test_retrieval_pools_as_the_config_trained_unless_told(tiny_model, capsys):
    """--pooling defaults to loss.sentence_pooling (here an override), and --pooling wins."""
    assert main(["--task", "retrieval", "--model", str(tiny_model), "--loss.sentence_pooling=mean"]) == 0
    printed = capsys.readouterr().out
    assert "retrieval (mean)" in printed and "retrieval (cls)" not in printed
    assert main(["--task", "retrieval", "--model", str(tiny_model), "--loss.sentence_pooling=mean",
                 "--pooling", "cls"]) == 0
    assert "retrieval (cls)" in capsys.readouterr().out
