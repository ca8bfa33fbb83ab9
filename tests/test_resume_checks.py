"""check_resume: a resume that would change what is trained is refused, naming the field."""

import pytest

from mmkd_ds.training.checkpoint import ResumeError, check_resume

STREAM = {"batch_size": 4, "fingerprint": "abc", "shards": ["a.tar", "b.tar"], "seed": 1234}
SAVED = {"world_size": 2, "stream": dict(STREAM)}


def test_same_run_resumes():
    check_resume(SAVED, 2, dict(STREAM), allow_changes=False)


@pytest.mark.parametrize("world, change, message", [
    # Another world size or batch size is an elastic resume: tests/test_elastic.py.
    (2, {"fingerprint": "xyz"}, "corpus fingerprint was 'abc'"),
    (2, {"shards": ["a.tar"]}, "shard set was 'one list' at the checkpoint and is 'another' now"),
    (2, {"seed": 7}, "stream.seed was 1234"),
])
def test_changed_field_is_refused_by_name(world, change, message):
    with pytest.raises(ResumeError, match="cannot resume") as err:
        check_resume(SAVED, world, {**STREAM, **change}, allow_changes=False)
    assert message in str(err.value) and "train.allow_resume_changes=true" in str(err.value)
    check_resume(SAVED, world, {**STREAM, **change}, allow_changes=True)  # the documented escape


# -- the learning-rate schedule on resume (training/optim.py: resume_schedule, apply_schedule) --

from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from mmkd_ds.config.schema import RunConfig, TrainConfig  # noqa: E402
from mmkd_ds.training.checkpoint import run_settings, settings_changes  # noqa: E402
from mmkd_ds.training.optim import (  # noqa: E402
    Schedule,
    apply_schedule,
    build_optimizer,
    build_scheduler,
    fixed_schedule,
    lr_factor,
    resume_schedule,
)

PEAK = 1e-3


def planned(steps: int, kind: str = "linear", **train) -> Schedule:
    return fixed_schedule(TrainConfig(steps=steps, warmup_steps=4, lr=PEAK, schedule=kind, **train))


def lrs(schedule: Schedule, start: int, end: int) -> list[float]:
    return [PEAK * lr_factor(s, schedule) for s in range(start, end + 1)]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_longer_run_continues_the_lr_from_where_it_was(kind):
    old = planned(20, kind)
    new, note = resume_schedule(old.record(), planned(40, kind), 12, allow_changes=False)
    assert f"the {kind} decay re-planned from step 12" in note and "to 0 at step 40" in note
    assert "run length 20 -> 40 steps" in note
    assert lr_factor(12, new) == pytest.approx(lr_factor(12, old))  # no jump
    after = lrs(new, 12, 40)
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert after[1] < after[0]  # still decaying, not held
    if kind == "linear":  # a straight line from (12, lr) to (40, 0)
        assert lr_factor(26, new) == pytest.approx(lr_factor(12, old) / 2)
    # What the issue saw: the configured 40-step schedule would move the lr at step 12.
    assert lr_factor(12, planned(40, kind)) != pytest.approx(lr_factor(12, old))
    # A shorter run is re-planned the same way; a resume with the length unchanged keeps the
    # re-planned schedule from the checkpoint's record.
    shorter, _ = resume_schedule(old.record(), planned(16, kind), 12, allow_changes=False)
    assert lr_factor(12, shorter) == pytest.approx(lr_factor(12, old)) and lr_factor(16, shorter) == pytest.approx(0)
    again, note = resume_schedule(new.record(), planned(40, kind), 30, allow_changes=False)
    assert again == new and note == ""


def test_warm_up_and_constant_schedules_simply_continue():
    new, note = resume_schedule(planned(20).record(), planned(40), 2, allow_changes=False)
    assert new.replan_from is None and new.steps == 40 and "decay after the warm-up now ends at step 40" in note
    assert lrs(new, 0, 40) == lrs(planned(40), 0, 40)
    const, note = resume_schedule(planned(20, "constant").record(), planned(40, "constant"), 20, allow_changes=False)
    assert lr_factor(30, const) == 1.0 and "continues" in note


def test_a_finished_decay_is_not_extended_silently():
    with pytest.raises(ResumeError) as err:
        resume_schedule(planned(20).record(), planned(40), 20, allow_changes=False)
    message = str(err.value)
    assert "\n" not in message and "reached lr 0 at step 20" in message
    assert "start a new run from the exported student" in message and "train.allow_resume_changes=true" in message
    chosen, note = resume_schedule(planned(20).record(), planned(40), 20, allow_changes=True)
    assert chosen == planned(40) and "applies from step 20" in note


@pytest.mark.parametrize("change, message", [
    ({"lr": 2e-3}, "peak lr (train.lr) was 0.001 at the checkpoint and is 0.002 now"),
    ({"warmup_steps": 8}, "warm-up steps (train.warmup_steps / warmup_epochs) was 4"),
    ({"schedule": "cosine"}, "train.schedule was 'linear'"),
    ({"encoder_lr_scale": 0.5}, "train.encoder_lr_scale was 1.0"),
])
def test_a_changed_schedule_shape_is_refused_by_name(change, message):
    cfg = TrainConfig(**{"steps": 20, "warmup_steps": 4, "lr": PEAK, **change})
    with pytest.raises(ResumeError, match="cannot resume") as err:
        resume_schedule(planned(20).record(), fixed_schedule(cfg), 10, allow_changes=False)
    assert message in str(err.value) and "train.allow_resume_changes=true" in str(err.value)
    chosen, note = resume_schedule(planned(20).record(), fixed_schedule(cfg), 10, allow_changes=True)
    assert chosen == fixed_schedule(cfg) and message in note


def test_an_older_checkpoint_without_a_schedule_uses_the_configured_one():
    chosen, note = resume_schedule(None, planned(40), 10, allow_changes=False)
    assert chosen == planned(40) and "records none" in note


def test_restored_scheduler_follows_the_resumed_schedule():
    """As the loop does it: the engine's optimizer and scheduler are built from the configured
    (40-step) schedule, the checkpoint's states (taken after 12 steps of a 20-step run) are
    loaded into them, then apply_schedule. The lr goes on from where it was, to 0 at step 40."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(steps=20, warmup_steps=4, lr=PEAK)
    old = fixed_schedule(cfg)
    opt = build_optimizer(model, cfg, old.lr)
    sched = build_scheduler(opt, old)
    for _ in range(12):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    lr_at_12 = opt.param_groups[0]["lr"]

    def restored(schedule_after_resume=None) -> list[float]:
        longer = fixed_schedule(replace(cfg, steps=40))
        opt2 = build_optimizer(model, cfg, longer.lr)
        sched2 = build_scheduler(opt2, longer)
        opt2.load_state_dict(saved_opt)
        sched2.load_state_dict(saved_sched)
        if schedule_after_resume:
            apply_schedule(sched2, schedule_after_resume)
        seen = [opt2.param_groups[0]["lr"]]
        for _ in range(12, 40):
            opt2.step()
            sched2.step()
            seen.append(opt2.param_groups[0]["lr"])
        return seen

    resumed, _ = resume_schedule(old.record(), fixed_schedule(replace(cfg, steps=40)), 12, allow_changes=False)
    seen = restored(resumed)
    assert seen[0] == pytest.approx(lr_at_12) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert seen == pytest.approx(lrs(resumed, 12, 40))
    assert all(a > b for a, b in zip(seen[:-1], seen[1:]))
    # Without apply_schedule the restored scheduler jumps (what the issue saw).
    unfixed = restored()
    assert unfixed[1] > lr_at_12 * 1.4  # 0.75e-3 after 0.5e-3


def test_every_resume_says_which_settings_changed():
    cfg = RunConfig()
    saved = {"settings": run_settings(cfg), "config": {}}
    assert settings_changes(saved, cfg) == "resume: no setting changed since the checkpoint"
    cfg.train.steps = 400
    cfg.train.eval_every = 0
    cfg.loss.structure_weight = 3.0
    line = settings_changes(saved, cfg)
    assert line.startswith("resume: 3 settings changed since the checkpoint: ")
    assert "train.steps 200 -> 400" in line and "train.eval_every" in line and "\n" not in line
    assert "loss.structure_weight" in line and line.count("[changes what is computed]") == 1
    # An older checkpoint recorded only the settings that change what is computed.
    from mmkd_ds.training.checkpoint import config_fingerprint

    older = settings_changes({"config": config_fingerprint(RunConfig())}, cfg)
    assert "train.steps" not in older and "loss.structure_weight" in older and "older checkpoint" in older
