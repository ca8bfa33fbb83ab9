"""Where this process sits in a multi-process job, read from the launcher's environment.

torchrun, `deepspeed` and SLURM (through the launch scripts) all export RANK, WORLD_SIZE and
LOCAL_RANK; a plain `python` run is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessPlace:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_place() -> ProcessPlace:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return ProcessPlace(rank, world, local)
