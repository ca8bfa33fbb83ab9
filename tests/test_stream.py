"""Streaming shards into training: ranks x workers, equal batches, exact resume, bad shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmkd_ds.config.schema import StreamConfig, TeacherConfig
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.shards.format import sample_key
from mmkd_ds.shards.manifest import ManifestError
from mmkd_ds.shards.plan import EpochPlan, PlanShard
from mmkd_ds.shards.reader import ShardError
from mmkd_ds.shards.stream import build_loader
from mmkd_ds.shards.writer import shard_name
from shard_factory import TEACHER_NAME, make_shards

TEACHER = TeacherConfig(name=TEACHER_NAME)


def keys(batch) -> list[str]:
    return [s.key for s in batch]


def loader_for(shards: Path, rank: int, world: int, **kw):
    cfg = StreamConfig(**{"batch_size": 3, "num_workers": 2, "seed": 5, **kw})
    return build_loader(cfg, TEACHER, ProcessPlace(rank, world, rank), shards)


UNEVEN = [7, 3, 12, 5, 9]  # 36 samples; 2 ranks x batch 3 divides it


def test_two_ranks_two_workers_uneven_shards(tmp_path):
    make_shards(tmp_path, UNEVEN)
    seen: Counter = Counter()
    counts = []
    for rank in (0, 1):
        loader = loader_for(tmp_path, rank, 2)
        batches = list(loader.iter_epoch())
        counts.append(len(batches))
        assert all(len(b) == 3 for b in batches)
        seen.update(k for b in batches for k in keys(b))
        # Batches arrive in plan order whatever the number of workers.
        plan = loader.stream.plan(0)
        assert [keys(b) for b in batches] == [[sample_key(i) for _, i in plan.batch(j)] for j in range(len(batches))]
    assert counts == [6, 6]
    assert seen == Counter(sample_key(i) for i in range(36))  # every sample once


def test_epochs_reshuffle_deterministically(tmp_path):
    make_shards(tmp_path, UNEVEN)
    a = loader_for(tmp_path, 0, 2, num_workers=0)
    b = loader_for(tmp_path, 0, 2, num_workers=2)
    ea0, ea1 = list(a.iter_epoch()), list(a.iter_epoch())
    eb0 = list(b.iter_epoch())
    assert [keys(x) for x in ea0] == [keys(x) for x in eb0]  # same seed and epoch, any worker count
    assert [keys(x) for x in ea0] != [keys(x) for x in ea1]  # a new epoch, a new order
    assert a.epoch == 2 and a.position == 0


@pytest.mark.parametrize("uneven, expected_batches", [("pad", 3), ("drop", 2)])
def test_equal_batches_when_epoch_does_not_divide(uneven, expected_batches):
    shards = [PlanShard(f"s{i}", n, sum([5, 1, 8][:i])) for i, n in enumerate([5, 1, 8])]  # 14 samples
    plans = [EpochPlan(shards, seed=1, epoch=0, world_size=2, rank=r, batch_size=3, uneven=uneven) for r in (0, 1)]
    assert [p.num_batches for p in plans] == [expected_batches] * 2
    got = [i for p in plans for j in range(p.num_batches) for _, i in p.batch(j)]
    if uneven == "pad":
        assert set(got) == set(range(14)) and len(got) == 18  # all seen, 4 repeats
    else:
        assert len(set(got)) == len(got) == 12  # 2 left out, none repeated


def test_resume_continues_at_the_next_sample(tmp_path):
    make_shards(tmp_path, UNEVEN)
    full = loader_for(tmp_path, 1, 2)
    it = iter(full)
    reference = [keys(next(it)) for _ in range(10)]  # crosses into the second epoch (6 per epoch)

    first = loader_for(tmp_path, 1, 2)
    it = iter(first)
    got = [keys(next(it)) for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4

    # A fresh loader (another process after a restart; other worker count) picks up the state.
    second = loader_for(tmp_path, 1, 2, num_workers=3)
    second.load_state_dict(state)
    it = iter(second)
    got += [keys(next(it)) for _ in range(6)]
    assert got == reference


def test_resume_refuses_another_order_but_replans_another_layout(tmp_path):
    make_shards(tmp_path, UNEVEN)
    saved = loader_for(tmp_path, 0, 2)
    saved.position = 2
    state = saved.state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader_for(tmp_path, 0, 2, seed=6).load_state_dict(state)
    loader_for(tmp_path, 0, 2, seed=6).load_state_dict(state, allow_changes=True)
    # Another world size or batch size re-plans the rest of the epoch (tests/test_plan_elastic.py).
    other = loader_for(tmp_path, 0, 4)
    assert "epoch 0 re-planned: its 24 unread samples" in other.load_state_dict(state)
    assert other.position == 0 and other.ranges == [(6, 18), (24, 36)]
    assert "re-planned" in loader_for(tmp_path, 0, 2, batch_size=4).load_state_dict(state)


def test_truncated_shard_is_named(tmp_path):
    make_shards(tmp_path, UNEVEN)
    path = tmp_path / shard_name(2)
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(ShardError, match="shard-000002.tar: truncated"):
        loader_for(tmp_path, 0, 1)


def test_altered_shard_is_named(tmp_path):
    make_shards(tmp_path, UNEVEN)
    path = tmp_path / shard_name(3)
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000003.tar: altered"):
        loader_for(tmp_path, 0, 1)


def test_missing_shard_is_named(tmp_path):
    make_shards(tmp_path, UNEVEN)
    (tmp_path / shard_name(0)).unlink()
    with pytest.raises(ShardError, match="shard-000000.tar: missing"):
        loader_for(tmp_path, 0, 1)


def test_skip_mode_leaves_bad_shards_out_and_counts_them(tmp_path):
    make_shards(tmp_path, UNEVEN)
    path = tmp_path / shard_name(2)  # the 12-sample shard
    path.write_bytes(path.read_bytes()[:-700])
    loader = loader_for(tmp_path, 0, 1, on_bad_shard="skip", batch_size=4)
    assert list(loader.skipped_shards) == [shard_name(2)]
    got = {k for b in loader.iter_epoch() for k in keys(b)}
    assert got == {sample_key(i) for i in range(36) if not 10 <= i < 22}


def test_truncation_inside_a_sample_is_caught_when_reading(tmp_path):
    """With size-only verification, a shard cut and padded back to its size fails on read."""
    make_shards(tmp_path, UNEVEN)
    path = tmp_path / shard_name(1)
    data = path.read_bytes()
    path.write_bytes(data[:1024] + b"\0" * (len(data) - 1024))
    loader = loader_for(tmp_path, 0, 1, verify="size", num_workers=0, batch_size=36)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(loader.iter_epoch())


def test_manifest_teacher_mismatch_names_the_field(tmp_path):
    make_shards(tmp_path, UNEVEN)
    cfg = StreamConfig(batch_size=3)
    with pytest.raises(ManifestError, match=r"teacher\.pooling"):
        build_loader(cfg, TeacherConfig(name="tiny-teacher", pooling="mean"), ProcessPlace(0, 1, 0), tmp_path)
    with pytest.raises(ManifestError, match=r"teacher\.name"):
        build_loader(cfg, TeacherConfig(name="bert-base-cased"), ProcessPlace(0, 1, 0), tmp_path)
