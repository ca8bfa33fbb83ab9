"""The epoch plan: which sample every batch of every rank holds, as a pure function.

Given the shard list (from the manifest), the seed, the epoch, the world size and the batch
size, every rank computes the same plan with no communication:

1. the shards are permuted with ``rng(seed, epoch)`` and, inside each shard, the samples with
   ``rng(seed, epoch, shard)``: one global order of the epoch's T samples;
2. every rank gets ``n`` batches of ``B``: ``n = ceil(T / (W*B))`` when ``uneven="pad"`` (the
   positions past T wrap to the start of the order, so a few samples repeat) or
   ``floor(T / (W*B))`` with ``"drop"`` (the tail of this epoch's order is left out);
3. rank r reads the contiguous positions ``[r*n*B, (r+1)*n*B)`` of that order, so each rank
   reads whole shards except at most two boundary ones, and batch j is its j-th run of B.

Ranks thus always have the same number of batches, whatever the shard sizes, and no rank
waits forever in a collective. Each sample is seen exactly once per epoch when W*B divides T.
Batch j is the same whatever the number of data-loader workers, so a checkpoint only needs
(epoch, batches consumed).

Lanes. With gradient accumulation G the order is cut into L = W*G contiguous *lanes* instead of W
runs, and rank r reads lanes r*G .. r*G+G-1 in turn (micro-batch t: lane r*G + t%G, its batch
t//G); with G = 1 that is the layout above. An optimizer step thus takes the next batch of every
lane, whatever W and G are as long as W*G (the global batch over B) is the same: a run resumed on
other ranks with the grad_accum that keeps the global batch reads the very same steps.

Remaining ranges. A resume whose lanes cannot continue (another global batch, batch size, or
lanes consumed unevenly) plans the rest of the epoch over ``ranges``: the positions of the
epoch's order not yet read (:func:`remaining_ranges`), concatenated and cut into lanes again.
Over the epoch no sample is then skipped, and none repeated except padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlanShard:
    """A shard as the plan sees it: its name, sample count and the global index of sample 0."""

    name: str
    samples: int
    first_index: int


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


Ranges = list[tuple[int, int]]  # half-open [start, end) position ranges of an epoch's order


def merge_ranges(ranges: Ranges) -> Ranges:
    """Empty ranges dropped and touching neighbours joined (order kept)."""
    out: Ranges = []
    for start, end in ranges:
        if end <= start:
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((int(start), int(end)))
    return out


@dataclass
class EpochPlan:
    """The plan of one rank for one epoch (see the module docstring).

    ``num_batches``: micro-batches this rank reads (``grad_accum`` lanes of ``lane_batches``).
    ``ranges``: the positions of the order this plan covers (None: the whole epoch).
    """

    shards: list[PlanShard]
    seed: int
    epoch: int
    world_size: int
    rank: int
    batch_size: int
    uneven: str = "pad"
    grad_accum: int = 1
    ranges: Ranges | None = None

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("epoch plan: no shards to read")
        self.order = _rng(self.seed, self.epoch).permutation(len(self.shards))
        sizes = np.array([self.shards[i].samples for i in self.order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # offsets of shards in the order
        self.total = int(self.starts[-1])
        if self.ranges is not None:
            self.ranges = merge_ranges(self.ranges)
            if any(s < 0 or e > self.total for s, e in self.ranges):
                raise ValueError(f"epoch plan: ranges {self.ranges} outside the epoch's {self.total} samples")
        # Offsets of the ranges in their concatenation (the plan's own sequence of positions).
        lengths = [e - s for s, e in self.ranges] if self.ranges is not None else [self.total]
        self._range_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.size = int(self._range_starts[-1])  # samples this plan covers
        self.lanes = self.world_size * self.grad_accum
        per_round = self.lanes * self.batch_size
        if self.uneven == "pad":
            self.lane_batches = -(-self.size // per_round)
        else:
            self.lane_batches = self.size // per_round
            if self.lane_batches == 0 and self.ranges is None:
                raise ValueError(
                    f"epoch plan: {self.total} samples are fewer than one batch of {self.batch_size} "
                    f"on each of {self.lanes} lanes ({self.world_size} ranks x grad_accum {self.grad_accum}; "
                    "use uneven=pad or a smaller batch)"
                )
        self.num_batches = self.lane_batches * self.grad_accum
        self._perms: dict[int, np.ndarray] = {}

    def position_of(self, index: int) -> int:
        """Index in the plan's sequence (past its end: padding, wrapping to its start) -> position
        in the epoch's order."""
        if self.ranges is None:
            return index  # locate() wraps past the end, as it always has
        i = index % self.size
        k = int(np.searchsorted(self._range_starts, i, side="right")) - 1
        return self.ranges[k][0] + i - int(self._range_starts[k])

    def lane_of(self, j: int) -> tuple[int, int]:
        """This rank's micro-batch ``j`` -> (lane, batch index within the lane)."""
        return self.rank * self.grad_accum + j % self.grad_accum, j // self.grad_accum

    def _within(self, shard_pos: int) -> np.ndarray:
        if shard_pos not in self._perms:
            shard_id = int(self.order[shard_pos])
            self._perms[shard_pos] = _rng(self.seed, self.epoch, shard_id).permutation(self.shards[shard_id].samples)
        return self._perms[shard_pos]

    def locate(self, position: int) -> tuple[PlanShard, int]:
        """Global position in this epoch's order -> (shard, global sample index)."""
        p = position % self.total  # padding wraps to the start of the order
        shard_pos = int(np.searchsorted(self.starts, p, side="right")) - 1
        shard = self.shards[int(self.order[shard_pos])]
        local = int(self._within(shard_pos)[p - int(self.starts[shard_pos])])
        return shard, shard.first_index + local

    def batch(self, j: int) -> list[tuple[PlanShard, int]]:
        """The samples of this rank's micro-batch ``j`` as (shard, global sample index)."""
        if not 0 <= j < self.num_batches:
            raise IndexError(f"batch {j} outside 0..{self.num_batches - 1}")
        lane, k = self.lane_of(j)
        base = (lane * self.lane_batches + k) * self.batch_size
        return [self.locate(self.position_of(base + i)) for i in range(self.batch_size)]

    def key(self, j: int) -> tuple[int, int, int]:
        """``(epoch, lane, batch in lane)`` of micro-batch ``j``: names the batch whatever the
        number of ranks (with grad_accum 1, ``(epoch, rank, j)``)."""
        return (self.epoch, *self.lane_of(j))


def lanes_consumed(position: int, grad_accum: int) -> list[int]:
    """Batches each of a rank's ``grad_accum`` lanes has handed out after ``position`` micro-batches."""
    return [(position - m + grad_accum - 1) // grad_accum if position > m else 0 for m in range(grad_accum)]


def remaining_ranges(plan: EpochPlan, position: int) -> Ranges:
    """Positions of ``plan``'s epoch order that no rank has read after every rank handed out
    ``position`` micro-batches (ranks advance together), in lane order.

    Padding (plan indices past its size) repeats samples and is not counted; with
    ``uneven="drop"`` the tail the plan left out is counted, so a re-plan still reads it.
    """
    per_rank = lanes_consumed(position, plan.grad_accum)
    index_ranges = []
    for lane in range(plan.lanes):
        start = (lane * plan.lane_batches + per_rank[lane % plan.grad_accum]) * plan.batch_size
        end = min((lane + 1) * plan.lane_batches * plan.batch_size, plan.size)
        index_ranges.append((start, end))
    index_ranges.append((plan.lanes * plan.lane_batches * plan.batch_size, plan.size))  # dropped tail
    out: Ranges = []
    for start, end in merge_ranges([(s, e) for s, e in index_ranges if e > s]):
        # plan indices -> positions, range by range of the plan's own ranges
        bounds = plan._range_starts
        spans = plan.ranges if plan.ranges is not None else [(0, plan.total)]
        for k, (rs, re_) in enumerate(spans):
            lo, hi = max(start, int(bounds[k])), min(end, int(bounds[k + 1]))
            if lo < hi:
                out.append((rs + lo - int(bounds[k]), rs + hi - int(bounds[k])))
    return merge_ranges(out)
