"""Every command explains itself: --help (purpose, example, outputs, defaults, exit codes, how to
list the config keys) without loading torch or DeepSpeed, and --print-config prints the resolved
config with the schema's comments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmkd_ds.config import config_to_dict, load_config
from mmkd_ds.config.printing import config_yaml, field_comments
from mmkd_ds.config.schema import SourceConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]

# (name, command line without --help, takes --config)
COMMANDS = [
    ("mmkd-distill", [sys.executable, "-m", "mmkd_ds.cli.distill"], True),
    ("launchers/distill.py", [sys.executable, str(REPO / "launchers" / "distill.py")], True),
    ("mmkd-precompute", [sys.executable, "-m", "mmkd_ds.cli.precompute"], True),
    ("launchers/precompute.py", [sys.executable, str(REPO / "launchers" / "precompute.py")], True),
    ("mmkd-eval", [sys.executable, "-m", "mmkd_ds.cli.evaluate"], True),
    ("launchers/evaluate.py", [sys.executable, str(REPO / "launchers" / "evaluate.py")], True),
    ("mmkd-init-student", [sys.executable, "-m", "mmkd_ds.cli.init_student"], True),
    ("mmkd-synth", [sys.executable, "-m", "mmkd_ds.data.synthetic"], False),
]


@pytest.mark.parametrize("name,command,takes_config", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_explains_the_command(name, command, takes_config):
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "example" in text.lower(), name
    assert "outputs" in text.lower(), name
    assert "default" in text.lower(), name
    assert "deepscale" not in text.lower() + result.stderr.lower(), name
    if takes_config:
        assert "--print-config" in text and "Exit codes:" in text, name


def test_distill_help_names_the_launcher_outputs_and_exit_codes():
    text = subprocess.run([sys.executable, str(REPO / "launchers" / "distill.py"), "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120).stdout
    assert "deepspeed --num_gpus" in text
    for output in ("checkpoints/", "metrics.jsonl", "tensorboard/", "student/"):
        assert output in text
    for code in ("0  done", "2  bad config", "3  too many non-finite", "1  any other failure"):
        assert code in text
    assert "--deepspeed_config" in text


def test_distill_help_loads_no_heavy_module():
    """--help parses before importing: no torch, DeepSpeed or transformers."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['distill.py', '--help']\n"
             "try:\n"
             f"    runpy.run_path({str(REPO / 'launchers' / 'distill.py')!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('LOADED', sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "LOADED []" in result.stdout, result.stdout + result.stderr


def _mains():
    from mmkd_ds.cli.distill import main as distill
    from mmkd_ds.cli.evaluate import main as evaluate
    from mmkd_ds.cli.init_student import main as init_student
    from mmkd_ds.cli.precompute import main as precompute

    return {"distill": distill, "eval": evaluate, "init-student": init_student, "precompute": precompute}


@pytest.fixture
def run_yaml(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  sources:\n    - path: corpus/*.tsv\n  heldout: []\n"
                    "precompute:\n  shard_size: 123\ntrain:\n  lr: 0.002\n")
    return path


@pytest.mark.parametrize("command", ["distill", "eval", "init-student", "precompute"])
def test_print_config_is_the_resolved_config_with_comments(command, run_yaml, capsys):
    overrides = ["--train.steps=7", "--data.alpha=0.5"]
    assert _mains()[command](["--print-config", "--config", str(run_yaml), *overrides]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == config_to_dict(load_config(run_yaml, overrides))
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["train"]["lr"] == 0.002  # override and file
    assert printed["precompute"]["shard_size"] == 123
    assert printed["data"]["sources"][0]["path"] == str(run_yaml.parent / "corpus" / "*.tsv")  # resolved
    # A field's comment, as written above it in schema.py, right above the key.
    assert "  # Pairs per shard (the last shard of the corpus may hold fewer).\n  shard_size: 123\n" in out
    assert "# The distillation loop." in out  # a section's docstring


def test_print_config_without_a_file_prints_the_defaults(capsys):
    from mmkd_ds.cli.precompute import main

    assert main(["--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == config_to_dict(load_config(None))
    assert "no --config" in out.splitlines()[0]


def test_print_config_reports_a_bad_key(capsys):
    from mmkd_ds.cli.evaluate import main

    assert main(["--print-config", "--train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_comments_come_from_the_schema_source():
    comments = field_comments(TrainConfig)
    assert comments["steps"] == ["Optimizer steps (each of grad_accum micro-batches); the schedule spans them."]
    # A group documented once: the comment stays above the first field only.
    source = field_comments(SourceConfig)
    assert source["en_column"][0].startswith("TSV: 0-based column") and source["xx_column"] == []


def test_config_yaml_round_trips_odd_values():
    cfg = load_config(None, ["--data.sources=[{path: 'a: b # c', lang: 'no'}]", "--data.heldout=[]",
                             "--student.name=1e3", "--train.lr=1.0e-5", "--train.out_dir='yes'",
                             "--teacher.revision='0123'"])
    assert yaml.safe_load(config_yaml(cfg, ["header"])) == config_to_dict(cfg)


def test_eval_and_init_student_still_require_their_arguments(capsys):
    from mmkd_ds.cli.evaluate import main as evaluate
    from mmkd_ds.cli.init_student import main as init_student

    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--task", "retrieval"])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        init_student([])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_distill_refuses_a_missing_deepspeed_json_at_once(tmp_path, capsys):
    from mmkd_ds.cli.distill import main

    assert main(["--deepspeed_config", str(tmp_path / "nope.json")]) == 2
    assert "DeepSpeed config not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{zero")
    assert main(["--deepspeed_config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_eval_without_config_says_which_pairs(tmp_path, student_tokenizer, capsys):
    from conftest import make_tiny_bert
    from mmkd_ds.cli.evaluate import main

    model = make_tiny_bert(tmp_path / "encoder", student_tokenizer)
    assert main(["--task", "retrieval", "--model", str(model)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "held-out pairs" in line]
    assert len(lines) == 1 and "sample:heldout" in lines[0] and "de 60" in lines[0] and "no --config" in lines[0]
