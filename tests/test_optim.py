"""Optimiser groups and the learning-rate schedule: epochs, warm-up, linear lr scaling, decay."""

from __future__ import annotations

import math

import pytest
import torch

from mmkd_ds.config.schema import TrainConfig
from mmkd_ds.losses import SentenceHeads
from mmkd_ds.training.optim import build_optimizer, build_scheduler, lr_factor, resolve_schedule


def test_linear_lr_scaling_follows_the_global_batch():
    cfg = TrainConfig(lr=2e-5, lr_scaling="linear", grad_accum=2)
    s = resolve_schedule(cfg, batches_per_epoch=100, micro_batch=32, world_size=8)
    assert s.global_batch == 32 * 8 * 2
    assert s.lr == pytest.approx(2e-5 * 512 / 256)
    # the authors' default: -b 32 in all -> 2e-5 * 32 / 256
    one = resolve_schedule(TrainConfig(lr=2e-5, lr_scaling="linear"), 100, 32, 1)
    assert one.lr == pytest.approx(2.5e-6)
    # without scaling the lr is taken as given
    assert resolve_schedule(TrainConfig(lr=2e-5), 100, 32, 8).lr == 2e-5


def test_epochs_and_warmup_epochs_become_steps():
    cfg = TrainConfig(epochs=15, warmup_epochs=2, grad_accum=2, steps=7, warmup_steps=3)
    s = resolve_schedule(cfg, batches_per_epoch=101, micro_batch=4, world_size=2)
    assert s.steps_per_epoch == 50  # 101 micro-batches per rank, 2 per step
    assert (s.steps, s.warmup_steps) == (750, 100)
    assert "15 epochs of 50" in s.line(cfg) and "warm-up 100 (2 epochs)" in s.line(cfg)
    # steps stay in charge when epochs is 0
    s = resolve_schedule(TrainConfig(steps=7, warmup_steps=3), 101, 4, 2)
    assert (s.steps, s.warmup_steps) == (7, 3)
    # fractional epochs round to whole steps
    assert resolve_schedule(TrainConfig(epochs=0.5), 101, 4, 2).steps == 50


def test_cosine_after_warmup_as_the_authors():
    """main_mmkd.adjust_learning_rate: linear warm-up, then half-cycle cosine to 0."""
    cfg = TrainConfig(epochs=15, warmup_epochs=2, schedule="cosine")
    s = resolve_schedule(cfg, batches_per_epoch=10, micro_batch=2, world_size=1)
    assert lr_factor(0, s) == pytest.approx(1 / 20)
    assert lr_factor(19, s) == pytest.approx(1.0)
    assert lr_factor(20, s) == pytest.approx(1.0)
    for step in (35, 85, 140):
        epoch = step / 10
        expected = 0.5 * (1 + math.cos(math.pi * (epoch - 2) / (15 - 2)))
        assert lr_factor(step, s) == pytest.approx(expected)
    assert lr_factor(150, s) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(3, 3)
    cfg = TrainConfig(lr=1e-3, lr_scaling="linear", warmup_steps=2, steps=10, schedule="linear")
    s = resolve_schedule(cfg, 100, 64, 1)
    opt = build_optimizer(model, cfg, s.lr)
    sched = build_scheduler(opt, s)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 0.5)  # 1e-3 * 64/256, step 0 of warm-up
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_weight_decay_on_matrices_or_all():
    heads = SentenceHeads(8, 8, mlp_hidden=16, out_dim=4)  # linears (2-d) and BatchNorm weights (1-d)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    matrices = build_optimizer(heads, TrainConfig(weight_decay=0.01))
    decayed, exempt = matrices.param_groups
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(trainable)
    everything = build_optimizer(heads, TrainConfig(weight_decay=0.01, weight_decay_on="all"))
    assert len(everything.param_groups) == 1  # the empty no-decay group is left out
    assert len(everything.param_groups[0]["params"]) == len(trainable)
    # the frozen teacher projector is never handed to the optimizer
    frozen = {id(p) for p in heads.g_T.parameters()}
    assert not frozen & {id(p) for g in everything.param_groups for p in g["params"]}


def test_encoder_lr_scale_and_head_warmup(student_tokenizer):
    """The student encoder (pretrained) gets its own lr: 0 while the new parameters warm up,
    then encoder_lr_scale times theirs; the new parameters follow the plain schedule."""
    from test_model import make_student  # a tiny BertForMaskedLM
    from mmkd_ds.config.schema import LossConfig
    from mmkd_ds.models.mmkd import MMKDModel

    model = MMKDModel(make_student(student_tokenizer, 16), 16, LossConfig(head_hidden=8, head_out=4))
    cfg = TrainConfig(lr=1e-3, steps=10, warmup_steps=2, schedule="constant", encoder_lr_scale=0.1,
                      head_warmup_steps=4)
    s = resolve_schedule(cfg, 100, 4, 1)
    opt = build_optimizer(model, cfg, s.lr)
    parts = {g["part"] for g in opt.param_groups}
    assert parts == {"encoder", "new"}
    encoder = {id(p) for p in model.student.bert.parameters()}
    for g in opt.param_groups:  # the split follows student.base_model
        assert all((id(p) in encoder) == (g["part"] == "encoder") for p in g["params"])
    assert any(id(p) == id(model.student.cls.predictions.transform.dense.weight)
               for g in opt.param_groups if g["part"] == "new" for p in g["params"])
    sched = build_scheduler(opt, s)
    seen = []
    for _ in range(6):
        seen.append({g["part"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert [round(r["new"] / 1e-3, 6) for r in seen] == [0.5, 1, 1, 1, 1, 1]
    assert [round(r["encoder"] / 1e-3, 6) for r in seen] == [0, 0, 0, 0, 0.1, 0.1]
    assert "encoder lr x0.1, held at 0 for the first 4 steps" in s.line(cfg)
