"""`mmkd-export` on real ZeRO-2 and ZeRO-3 checkpoints, without a launcher, and the model card.

The checkpoints come from one plain process (a world of one; tests/dist_scripts/zero_checkpoints.py):
one optimizer step of a tiny MMKD-shaped module, saved as training saves it. The export must
hold the student's weights after that step, gathered from the partitions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_export import tiny_mlm

SCRIPT = Path(__file__).parent / "dist_scripts" / "zero_checkpoints.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, student_tokenizer):
    root = tmp_path_factory.mktemp("zero-ckpts")
    init = tiny_mlm(student_tokenizer, False, root / "init")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), str(init)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # What the card reads beside the checkpoint: the shard manifest and the run's metrics.
    (root / "shards").mkdir()
    (root / "shards" / "manifest.json").write_text(json.dumps({"corpus": {
        "fingerprint": "corpus-fp", "identity_pairs": False, "languages": {"de": 24, "sw": 12}, "pairs": 36}}))
    for stage in (2, 3):
        rows = [{"kind": "eval", "step": 0, "eval/retrieval_avg": 0.25, "eval/retrieval_de": 0.3,
                 "eval/retrieval_sw": 0.2, "eval/retrieval_low_resource_avg": 0.2, "eval/retrieval_mean_avg": 0.3,
                 "eval/retrieval_mean_de": 0.35, "eval/retrieval_mean_sw": 0.25},
                {"kind": "eval", "step": 1, "eval/retrieval_avg": 0.5, "eval/retrieval_de": 0.625,
                 "eval/retrieval_sw": 0.375, "eval/retrieval_low_resource_avg": 0.375, "eval/retrieval_mean_avg": 0.4,
                 "eval/retrieval_mean_de": 0.45, "eval/retrieval_mean_sw": 0.35},
                {"kind": "eval", "step": 2, "eval/retrieval_avg": 0.9}]  # after the checkpoint: not its score
        (root / f"zero{stage}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, init=init)


def export(args: list[str], capsys) -> tuple[int, str, str]:
    from mmkd_ds.cli.export import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("stage", [2, 3])
def test_export_zero_checkpoint_without_launcher(runs, stage, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    from mmkd_ds.mlm_head import load_masked_lm

    out = tmp_path / "student"
    rc, stdout, stderr = export(["--checkpoint", str(runs.root / f"zero{stage}" / "checkpoints"), "--out", str(out)],
                                capsys)
    assert rc == 0, stderr
    assert "initial student" in stdout and f"wrote {out}" in stdout

    truth = torch.load(runs.root / f"zero{stage}" / "truth.pt")
    initial = AutoModelForMaskedLM.from_pretrained(runs.init).state_dict()
    exported = load_masked_lm(out)[0].state_dict()  # the encoder, and the head from mlm_head.safetensors
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(truth[key], initial[key])  # the step changed the weights
    for name, value in truth.items():
        torch.testing.assert_close(exported[name], value, msg=name)

    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "| teacher | tiny-teacher |" in card and f"| initial student | {runs.init} |" in card
    assert "| training steps | 1 (of 4 planned) |" in card
    assert f"ZeRO stage {'3' if stage == 3 else '1 or 2'}" in card
    assert "| de | 24 |" in card and "| sw | 12 |" in card and "| total | 36 |" in card
    assert "[CLS] pooling (step 0 -> step 1" in card and "mean pooling (step 0 -> step 1" in card
    assert "| de | 30.0% | 62.5% | +32.5 |" in card and "| average | 25.0% | 50.0% | +25.0 |" in card
    assert "| low-resource | 20.0% | 37.5% | +17.5 |" in card
    assert "Trained with: not recorded" in card and "Exported with: `mmkd-export --checkpoint" in card
    assert card.startswith("---\nlanguage:\n- de\n- en\n- sw\n")


def test_format_hf_from_a_tag_directory_and_replacing_an_export(runs, tmp_path, capsys):
    out = tmp_path / "student"
    tag_dir = runs.root / "zero2" / "checkpoints" / "step00000001"
    for _ in range(2):  # the second run replaces the first export
        rc, stdout, stderr = export(["--checkpoint", str(tag_dir), "--out", str(out), "--format", "hf"], capsys)
        assert rc == 0, stderr
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert not (out / "modules.json").exists() and not (out / "1_Pooling").exists()
    assert "sentence-transformers" not in (out / "README.md").read_text()


def test_mean_pooling_and_student_override(runs, tmp_path, capsys):
    from mmkd_ds.training.st_export import sentence_transformers_pooling

    out = tmp_path / "student"
    rc, stdout, stderr = export(["--checkpoint", str(runs.root / "zero3"), "--out", str(out), "--pooling", "mean",
                                 f"--student.name={runs.init}"], capsys)
    assert rc == 0, stderr
    assert "(from --config/overrides)" in stdout
    assert sentence_transformers_pooling(out) == "mean"


def test_bad_inputs_are_one_line_and_exit_2(runs, tmp_path, capsys):
    ckpts = runs.root / "zero2" / "checkpoints"
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "not found"),
        (["--checkpoint", str(ckpts), "--tag", "step00000099", "--out", str(tmp_path / "o")], "no such checkpoint"),
        (["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")], "no checkpoint in it"),
        (["--checkpoint", str(ckpts), "--out", str(runs.root)], "not an earlier export"),
        (["--checkpoint", str(ckpts), "--out", str(tmp_path / "o"), f"--student.name={tmp_path / 'moved'}"],
         "local path not found"),
    ]
    for args, message in cases:
        rc, _, stderr = export(args, capsys)
        assert rc == 2 and message in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
    # A damaged checkpoint: the optimizer shard cut short.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(ckpts, broken)
    shard = next((broken / "step00000001").glob("zero_pp_rank_0_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    rc, _, stderr = export(["--checkpoint", str(broken), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "cannot read this checkpoint" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    with pytest.raises(SystemExit) as exit_info:
        export(["--out", str(tmp_path / "o")], capsys)
    assert exit_info.value.code == 2


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom mmkd_ds.cli.export import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\nprint('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Outputs, in --out DIR" in done.stdout and "Exit codes:" in done.stdout
    assert "HEAVY []" in done.stdout, done.stdout[-500:]


def test_command_line():
    from mmkd_ds.training.model_card import command_line

    assert command_line(["/venv/bin/mmkd-export", "--out", "a b"]) == "mmkd-export --out 'a b'"
    assert command_line(["launchers/distill.py", "--config", "x.yaml"]) == "python launchers/distill.py --config x.yaml"


def test_default_pooling_is_the_one_trained_with(tmp_path):
    """Without --pooling the export pools as the run trained: loss.sentence_pooling of --config,
    else of the checkpoint's recorded settings, else [CLS] (checkpoints that do not record it)."""
    from mmkd_ds.cli.export import STATE_FILE, trained_pooling

    tag_dir = tmp_path / "checkpoints" / "step00000001"
    tag_dir.mkdir(parents=True)
    assert trained_pooling(tag_dir.parent, tag_dir.name, None) == "cls"  # no state file at all
    (tag_dir / STATE_FILE).write_text(json.dumps({"settings": {"student.name": "x"}}))
    assert trained_pooling(tag_dir.parent, tag_dir.name, None) == "cls"
    (tag_dir / STATE_FILE).write_text(json.dumps({"settings": {"loss.sentence_pooling": "mean"}}))
    assert trained_pooling(tag_dir.parent, tag_dir.name, None) == "mean"
    config = tmp_path / "run.yaml"
    config.write_text("loss:\n  sentence_pooling: cls\n")
    assert trained_pooling(tag_dir.parent, tag_dir.name, str(config)) == "cls"  # --config wins
