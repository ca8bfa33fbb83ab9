"""Elastic resume of the epoch plan: lanes and remaining ranges (shards/plan.py, ShardLoader).

A run stopped after k steps on W ranks and resumed on W' ranks (other grad_accum, batch size)
must see every sample of the epoch: the keys read across a 2 -> 1 -> 2 sequence of resumes are
counted against one uninterrupted epoch. No data files: the plan alone says which sample each
batch holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmkd_ds.shards.plan import EpochPlan, PlanShard, lanes_consumed, remaining_ranges

SIZES = [7, 3, 12, 5, 9, 1, 4]  # 41 samples in uneven shards


def shards(sizes=SIZES) -> list[PlanShard]:
    return [PlanShard(f"s{i}", n, sum(sizes[:i])) for i, n in enumerate(sizes)]


def read(layout: dict, position: int, ranges, steps: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """Every rank's micro-batches from ``position`` on, for ``steps`` optimizer steps (None: to
    the end of the epoch); returns (per-step global sample lists, per-rank batches)."""
    world, accum, batch = layout["world"], layout["accum"], layout["batch"]
    plans = [EpochPlan(shards(), 3, 0, world, r, batch, layout.get("uneven", "pad"), accum, ranges)
             for r in range(world)]
    end = plans[0].num_batches if steps is None else min(plans[0].num_batches, position + steps * accum)
    per_rank = [[[i for _, i in p.batch(j)] for j in range(position, end)] for p in plans]
    per_step = []
    for s in range(0, end - position, accum):
        per_step.append(sorted(i for rank in per_rank for b in rank[s:s + accum] for i in b))
    return per_step, per_rank


def resume_sequence(layouts: list[dict], stops: list[int]) -> tuple[Counter, list[list[int]]]:
    """Run the epoch through ``layouts`` in turn, stopping after ``stops[i]`` steps of each
    (the last runs to the end); each resume goes through ShardLoader.load_state_dict's rule."""
    from mmkd_ds.shards.stream import ShardLoader, ShardStream
    from mmkd_ds.distributed import ProcessPlace
    from mmkd_ds.shards.writer import ShardRecord

    records = [ShardRecord(s.name, s.samples, 0, "", {}, s.first_index) for s in shards()]
    seen: Counter = Counter()
    steps_read: list[list[int]] = []
    state = None
    for i, layout in enumerate(layouts):
        stream = ShardStream(Path("."), records, ProcessPlace(0, layout["world"], 0), layout["batch"], 3,
                             layout.get("uneven", "pad"), grad_accum=layout["accum"])
        loader = ShardLoader(stream, 0)
        if state is not None:
            loader.load_state_dict(state)
        steps = stops[i] if i < len(stops) else None
        per_step, _ = read(layout, loader.position, loader.ranges, steps)
        steps_read += per_step
        for s in per_step:
            seen.update(s)
        loader.position += len(per_step) * layout["accum"]
        state = loader.state_dict()
    return seen, steps_read


def one_epoch(layout: dict) -> tuple[Counter, list[list[int]]]:
    per_step, _ = read(layout, 0, None, None)
    return Counter(i for s in per_step for i in s), per_step


def L(world, accum=1, batch=3, uneven="pad"):
    return {"world": world, "accum": accum, "batch": batch, "uneven": uneven}


def test_lanes_with_grad_accum_one_are_the_rank_runs():
    plan = EpochPlan(shards(), 3, 0, 2, 1, 3)
    laned = EpochPlan(shards(), 3, 0, 2, 1, 3, grad_accum=1, ranges=[(0, 41)])
    assert [plan.batch(j) for j in range(plan.num_batches)] == [laned.batch(j) for j in range(plan.num_batches)]
    assert plan.key(4) == (0, 1, 4)  # (epoch, rank, batch): the masks of existing runs are kept
    # Rank 1 of 2 with grad_accum 2 reads lanes 2 and 3 in turn, each a contiguous run.
    two = EpochPlan(shards(), 3, 0, 2, 1, 3, grad_accum=2)
    assert two.lanes == 4 and two.lane_batches == 4 and two.num_batches == 8
    assert [two.lane_of(j) for j in range(4)] == [(2, 0), (3, 0), (2, 1), (3, 1)]
    assert lanes_consumed(5, 2) == [3, 2] and lanes_consumed(0, 3) == [0, 0, 0]


@pytest.mark.parametrize("a, b, stops", [
    (L(2), L(1, accum=2), [2, 3]),            # the same global batch: the same steps
    (L(2, batch=2), L(1, accum=2, batch=2), [4, 1]),
    (L(3), L(1, accum=3), [1, 2]),
])
def test_same_global_batch_reads_the_same_steps(a, b, stops):
    """2 -> 1 -> 2 ranks with grad_accum keeping the global batch: every step reads exactly the
    samples of the uninterrupted run's step, so the losses can match."""
    seen, steps = resume_sequence([a, b, a], stops)
    full_seen, full_steps = one_epoch(a)
    assert steps == full_steps and seen == full_seen


@pytest.mark.parametrize("uneven", ["pad", "drop"])
@pytest.mark.parametrize("layouts, stops", [
    ([L(2), L(1), L(2)], [2, 3]),                    # a new global batch (allow_resume_changes)
    ([L(2), L(1, batch=5), L(2, accum=2)], [1, 2]),  # another batch size, then grad_accum
    ([L(2, accum=2), L(1, accum=3), L(3)], [1, 1]),  # lanes read unevenly are re-planned
    ([L(4, batch=2), L(1, batch=4), L(2, batch=3)], [2, 1]),
    ([L(2), L(1), L(2)], [0, 0]),                    # stopped before the first step
])
def test_every_sample_once_across_resumes(uneven, layouts, stops):
    """Across 2 -> 1 -> 2 rank resumes that re-plan the epoch: no sample skipped; repeats only
    where padding fills the last lanes; with uneven=drop, none repeated."""
    layouts = [{**x, "uneven": uneven} for x in layouts]
    seen, _ = resume_sequence(layouts, stops)
    full, _ = one_epoch(layouts[0])
    total = sum(SIZES)
    if uneven == "pad":
        assert set(seen) == set(full) == set(range(total))  # none skipped
        # Repeats come from padding only: at most one lane round per plan (3 plans).
        extra = sum(seen.values()) - total
        assert 0 <= extra < 3 * max(x["world"] * x["accum"] * x["batch"] for x in layouts)
    else:
        assert max(seen.values()) == 1  # none repeated
        # Only the final plan's own tail is left out (fewer than one round of it).
        last = layouts[-1]
        assert total - len(seen) < last["world"] * last["accum"] * last["batch"]


def test_remaining_ranges_are_the_unread_tails():
    plan = EpochPlan(shards(), 3, 0, 2, 0, 3)  # 41 samples: 7 batches per rank, 1 padded
    assert plan.num_batches == 7
    # After 2 batches each: rank 0 read [0, 6), rank 1 [21, 27); the padding (42 > 41) is no sample.
    assert remaining_ranges(plan, 2) == [(6, 21), (27, 41)]
    assert remaining_ranges(plan, 0) == [(0, 41)]
    assert remaining_ranges(plan, 7) == []
    drop = EpochPlan(shards(), 3, 0, 2, 0, 3, "drop")  # 6 batches per rank, 5 samples left out
    assert remaining_ranges(drop, 6) == [(36, 41)]  # a re-plan still reads the left-out tail
    again = EpochPlan(shards(), 3, 0, 1, 0, 4, ranges=[(6, 21), (27, 41)])
    assert again.num_batches == 8 and [again.position_of(i) for i in (0, 14, 15, 28, 29)] == [6, 20, 27, 40, 6]
