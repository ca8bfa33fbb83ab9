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


@dataclass
class EpochPlan:
    shards: list[PlanShard]
    seed: int
    epoch: int
    world_size: int
    rank: int
    batch_size: int
    uneven: str = "pad"

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("epoch plan: no shards to read")
        self.order = _rng(self.seed, self.epoch).permutation(len(self.shards))
        sizes = np.array([self.shards[i].samples for i in self.order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # offsets of shards in the order
        self.total = int(self.starts[-1])
        per_round = self.world_size * self.batch_size
        if self.uneven == "pad":
            self.num_batches = -(-self.total // per_round)
        else:
            self.num_batches = self.total // per_round
            if self.num_batches == 0:
                raise ValueError(
                    f"epoch plan: {self.total} samples are fewer than one batch of {self.batch_size} "
                    f"on each of {self.world_size} ranks (use uneven=pad or a smaller batch)"
                )
        self._perms: dict[int, np.ndarray] = {}

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
        """The samples of this rank's batch ``j`` as (shard, global sample index)."""
        if not 0 <= j < self.num_batches:
            raise IndexError(f"batch {j} outside 0..{self.num_batches - 1}")
        base = (self.rank * self.num_batches + j) * self.batch_size
        return [self.locate(base + i) for i in range(self.batch_size)]
