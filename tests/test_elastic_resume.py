"""Elastic resume for real: 2 ranks ZeRO-2 -> 1 rank ZeRO-2 -> 2 ranks ZeRO-3 (CPU, gloo).

Each resume goes through DeepSpeed's universal checkpoint (ds_to_universal, load_universal)
and keeps the global batch (grad_accum 1 -> 2 -> 1); the per-step losses match an
uninterrupted 2-rank run, which needs the model, Adam moments, lr position and data to be
restored: each step reads the same samples (lanes, shards/plan.py) and the student has no
dropout (the per-rank dropout streams cannot follow a change of ranks). The sample keys the
ranks logged (train.log_sample_keys) hold every sample of the epoch exactly once, each step the
same ones as the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from test_distill import launch, losses_by_step, ok, setup  # noqa: F401  (the module fixture)


@pytest.fixture(scope="module")
def no_dropout_student(setup, tmp_path_factory):  # noqa: F811
    from transformers import BertForMaskedLM

    out = tmp_path_factory.mktemp("student-no-dropout")
    model = BertForMaskedLM.from_pretrained(setup.student_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    for f in setup.student_dir.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy2(f, out / f.name)
    return out


def test_resume_on_one_rank_then_on_two_with_zero3(setup, no_dropout_student, tmp_path):  # noqa: F811
    common = [f"--student.name={no_dropout_student}", "--train.eval_every=0", "--train.save_every=0",
              "--train.export=false", "--train.steps=6", "--train.log_sample_keys=true"]
    full = tmp_path / "full"
    ok(launch(setup, full, *common))
    reference = losses_by_step(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "elastic"
    ok(launch(setup, run, *common, "--train.stop_at=2"))
    assert json.loads((run / "checkpoints" / "step00000002" / "mmkd_state.json").read_text())["world_size"] == 2
    out = ok(launch(setup, run, *common, "--resume", "--train.stop_at=4", gpus=1))
    assert ("resume on another layout: world size 2 -> 1, grad_accum 1 -> 2 (the global batch kept), "
            "ZeRO stage 2 -> 2, converted to DeepSpeed's universal checkpoint at") in out, out[-3000:]
    assert (run / "checkpoints" / "step00000002_universal" / "zero" / "optimizer_state.pt").is_file()
    assert json.loads((run / "checkpoints" / "step00000004" / "mmkd_state.json").read_text())["world_size"] == 1
    out = ok(launch(setup, run, *common, "--resume", stage=3))
    assert ("world size 1 -> 2, grad_accum 2 -> 1 (the global batch kept), ZeRO stage 2 -> 3, "
            "converted to DeepSpeed's universal checkpoint at") in out, out[-3000:]
    assert "distill: done at step 6" in out

    resumed = losses_by_step(run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    # fp32 on CPU: another rank count sums the gradients in another order, by how much depends on
    # the machine. Measured: on the development machine steps 1-5 equal (once, 2e-5 relative at
    # step 5), and step 6, the first update under ZeRO-3 (its own gradient-norm order, then Adam
    # amplifying the difference in the small structure loss), within 1e-3 on the structure loss
    # and 1.4e-4 on the total; on a CI machine 1.2e-4 on step 5's structure loss. A wrong resume,
    # measured by breaking this one on purpose at both resumes: Adam moments zeroed moved the
    # first loss they reach by 2e-2 on the total and 1e-1 or more on the structure loss; the lr
    # position one step behind, by 8e-3 on the total and 3e-2 on the structure loss; step 6 by
    # 2.6e-2 and 2.8e-2 on the total. Hence 2e-3 on every loss of steps 1-5, and at step 6 5e-3
    # on the total and 5e-2 on the parts.
    for step in range(1, 7):
        for name, value in reference[step].items():
            rel = 2e-3 if step <= 5 else 5e-3 if name == "loss/total" else 5e-2
            assert resumed[step][name] == pytest.approx(value, rel=rel, abs=1e-6), (step, name)

    # The epoch's samples (48 = 6 steps x 8), as the ranks logged what they trained on: across
    # the three layouts every one once, and every step the same samples as the uninterrupted run.
    from mmkd_ds.training.sample_log import read_sample_keys

    seen, expected = read_sample_keys(run), read_sample_keys(full)
    assert sorted(seen) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    keys = [k for step in sorted(seen) for k in seen[step]]
    assert len(keys) == 48 and len(set(keys)) == 48
    assert set(keys) == {k for step in expected for k in expected[step]}
    for step in seen:
        assert sorted(seen[step]) == sorted(expected[step]), step
    # The per-rank files: ranks 0-1 for steps 1-2 and 5-6, rank 0 alone (2 micro-batches) for 3-4.
    assert (run / "sample_keys" / "rank1.jsonl").is_file()
