"""Elastic resume for real: 2 ranks ZeRO-2 -> 1 rank ZeRO-2 -> 2 ranks ZeRO-3 (CPU, gloo).

Each resume goes through DeepSpeed's universal checkpoint (ds_to_universal, load_universal)
and keeps the global batch (grad_accum 1 -> 2 -> 1); the per-step losses match an
uninterrupted 2-rank run, which needs the model, Adam moments, lr position and data to be
restored: each step reads the same samples (lanes, shards/plan.py) and the student has no
dropout (the per-rank dropout streams cannot follow a change of ranks). The stream states
the runs saved account for every sample of the epoch exactly once.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

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
              "--train.export=false", "--train.steps=6"]
    full = tmp_path / "full"
    ok(launch(setup, full, *common))
    reference = losses_by_step(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "elastic"
    ok(launch(setup, run, *common, "--train.stop_at=2"))
    states = [json.loads((run / "checkpoints" / "step00000002" / "mmkd_state.json").read_text())]
    out = ok(launch(setup, run, *common, "--resume", "--train.stop_at=4", gpus=1))
    assert ("resume on another layout: world size 2 -> 1, grad_accum 1 -> 2 (the global batch kept), "
            "ZeRO stage 2 -> 2, converted to DeepSpeed's universal checkpoint at") in out, out[-3000:]
    assert (run / "checkpoints" / "step00000002_universal" / "zero" / "optimizer_state.pt").is_file()
    states.append(json.loads((run / "checkpoints" / "step00000004" / "mmkd_state.json").read_text()))
    out = ok(launch(setup, run, *common, "--resume", stage=3))
    assert ("world size 1 -> 2, grad_accum 2 -> 1 (the global batch kept), ZeRO stage 2 -> 3, "
            "converted to DeepSpeed's universal checkpoint at") in out, out[-3000:]
    assert "distill: done at step 6" in out

    resumed = losses_by_step(run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    # fp32 on CPU: another rank count sums the gradients in another order. Measured here: steps
    # 1-3 (step 3 the first after the 2 -> 1 resume) equal to 1e-6 relative; step 4 within 3e-5;
    # step 5 (the first after the 1 -> 2 ZeRO-3 resume) within 2e-5 (1.8e-5 on the structure
    # loss); step 6 (Adam amplifying that noise in the small structure loss) 3e-3 on the
    # structure loss and 1.4e-4 on the total. A lost Adam moment, lr position or batch moves the
    # first step after a resume by 1e-3 or more, so 1e-4 still tells them apart.
    for step in range(1, 7):
        for name, value in reference[step].items():
            rel = 1e-5 if step in (1, 2, 3) else 1e-4 if step in (4, 5) else 1e-2
            assert resumed[step][name] == pytest.approx(value, rel=rel, abs=1e-6), (step, name)
        assert resumed[step]["loss/total"] == pytest.approx(reference[step]["loss/total"], rel=1e-3)

    # The epoch's samples (48 = 6 steps x 8): every one read once across the three layouts.
    seen = Counter()
    for state, (world, accum, start, end) in zip([None, *states], [(2, 1, 0, 2), (1, 2, 2, 4), (2, 1, 4, 6)]):
        seen.update(samples_read(setup, state, world, accum, end - start))
    assert sum(seen.values()) == 48 and len(seen) == 48


def samples_read(setup, state, world: int, accum: int, steps: int) -> list[int]:
    """The samples ``steps`` optimizer steps read on ``world`` ranks after resuming ``state``
    (None: from the start), from the stream state the run saved, through the loader's rule."""
    from mmkd_ds.config import load_config
    from mmkd_ds.distributed import ProcessPlace
    from mmkd_ds.shards.stream import build_loader

    cfg = load_config(setup.config)
    out = []
    for rank in range(world):
        loader = build_loader(cfg.stream, None, ProcessPlace(rank, world, rank), cfg.precompute.out_dir, grad_accum=accum)
        if state is not None:
            loader.load_state_dict(state["stream"])
        plan = loader.stream.plan(loader.epoch, loader.ranges)
        for j in range(loader.position, loader.position + steps * accum):
            out += [index for _, index in plan.batch(j)]
    return out
