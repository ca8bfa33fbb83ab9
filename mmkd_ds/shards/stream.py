"""Streaming teacher shards into training: ranks, workers, deterministic order, exact resume.

    loader = build_loader(stream_cfg, teacher_cfg, place, transform=collate)
    for batch in loader:            # runs epoch after epoch
        ...
        state = loader.state_dict()  # into the checkpoint; load_state_dict() continues exactly

The batches of an epoch come from ``EpochPlan`` (see plan.py). Data-loader worker w of a rank
produces that rank's batches w, w+K, w+2K, ... (K workers); torch's DataLoader takes one batch
from each worker in turn, so batches arrive in plan order whatever K is.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmkd_ds.config.schema import StreamConfig, TeacherConfig
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.shards.manifest import Manifest, check_manifest, read_manifest
from mmkd_ds.shards.plan import EpochPlan, PlanShard, Ranges, lanes_consumed, remaining_ranges
from mmkd_ds.shards.reader import ShardCache, ShardError, check_shard
from mmkd_ds.shards.writer import ShardRecord

log = logging.getLogger(__name__)

# transform(samples, key): key = (epoch, lane, batch index in the lane) identifies the batch
# (with grad_accum 1: (epoch, rank, batch index)), so that any randomness in the transform
# (masking) can be seeded by it rather than by worker state or the number of ranks.
Transform = Callable[[list, tuple], Any]


def _gather_problems(local: dict[str, str]) -> dict[str, str]:
    """Union of the ranks' findings, so that every rank makes the same plan (or fails)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
        merged: dict[str, str] = {}
        for part in parts:
            merged.update(part)
        return merged
    return local


def verify_shards(
    shard_dir: Path, manifest: Manifest, mode: str, on_bad: str, place: ProcessPlace
) -> tuple[list[ShardRecord], dict[str, str]]:
    """Check every shard against the manifest; return the usable records and the problems.

    With torch.distributed initialised, each rank checks a 1/W share and the findings are
    gathered; otherwise this process checks them all. ``on_bad="error"`` raises ShardError
    naming every bad shard; ``"skip"`` leaves them out.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    local: dict[str, str] = {}
    for i, record in enumerate(manifest.shards):
        if distributed and i % place.world_size != place.rank:
            continue
        problem = check_shard(shard_dir / record.name, record, mode)
        if problem:
            local[record.name] = problem
    problems = _gather_problems(local)
    if problems and on_bad == "error":
        listed = "; ".join(f"{shard_dir / n}: {p}" for n, p in sorted(problems.items()))
        raise ShardError(f"{len(problems)} bad shard(s): {listed} (stream.on_bad_shard=skip leaves them out)")
    usable = [r for r in manifest.shards if r.name not in problems]
    if not usable:
        raise ShardError(f"{shard_dir}: no usable shard")
    return usable, problems


class ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch, from ``start_batch`` on, split over workers.

    Each batch is the list of its ``ShardSample``s, passed through ``transform(samples, key)``
    when one is given (in the worker, so tokenisation runs in parallel with training).
    """

    def __init__(
        self,
        shard_dir: Path,
        records: list[ShardRecord],
        place: ProcessPlace,
        batch_size: int,
        seed: int,
        uneven: str = "pad",
        transform: Transform | None = None,
        open_reader: Callable[[], Any] | None = None,
        grad_accum: int = 1,
    ):
        self.shard_dir = Path(shard_dir)
        # Makes the per-worker reader: ``reader.get(shard_name).read(global_index)``. Default:
        # the shard files; the online-teacher mode reads an in-memory corpus the same way.
        self.open_reader = open_reader
        self.records = {r.name: r for r in records}
        self.plan_shards = [PlanShard(r.name, r.samples, r.first_index) for r in records]
        self.place = place
        self.batch_size = batch_size
        self.seed = seed
        self.uneven = uneven
        self.transform = transform
        self.grad_accum = grad_accum  # lanes per rank (see plan.py)
        self.epoch = 0
        self.start_batch = 0
        self.ranges: Ranges | None = None  # the current epoch's remaining positions after a re-plan

    def plan(self, epoch: int | None = None, ranges: Ranges | None = None) -> EpochPlan:
        return EpochPlan(
            self.plan_shards,
            self.seed,
            self.epoch if epoch is None else epoch,
            self.place.world_size,
            self.place.rank,
            self.batch_size,
            self.uneven,
            self.grad_accum,
            ranges,
        )

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan(ranges=self.ranges)
        cache = self.open_reader() if self.open_reader else ShardCache(self.shard_dir, self.records)
        try:
            # The first batch >= start_batch that belongs to this worker.
            first = self.start_batch + (worker - self.start_batch) % workers
            for j in range(first, plan.num_batches, workers):
                samples = [cache.get(shard.name).read(index) for shard, index in plan.batch(j)]
                yield self.transform(samples, plan.key(j)) if self.transform else samples
        finally:
            cache.close()


def _ignore_termination(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to their rank process, which saves and exits cleanly.

    Schedulers and the deepspeed launcher signal the whole process tree; a worker that died of
    it would make the DataLoader raise in the middle of the preemption checkpoint.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class ShardLoader:
    """Epoch-after-epoch iteration over a ShardStream, with a resumable position.

    ``position`` counts the batches of the current epoch already handed out; it is advanced
    before a batch is yielded, so a checkpoint taken after training on it resumes at the next.
    ``ranges``: set when a resume on another layout re-planned the rest of the current epoch
    (:func:`~mmkd_ds.shards.plan.remaining_ranges`); the next epoch is whole again.
    """

    stream: ShardStream
    num_workers: int = 2
    fingerprint: str = ""
    epoch: int = 0
    position: int = 0
    ranges: Ranges | None = None
    _loader_kwargs: dict = field(default_factory=dict)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank reads in a whole epoch (a re-planned remainder aside)."""
        return self.stream.plan(self.epoch).num_batches

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[Any]:
        """The rest of the current epoch; afterwards the loader stands at the next epoch."""
        self.stream.epoch = self.epoch
        self.stream.start_batch = self.position
        self.stream.ranges = self.ranges
        loader = DataLoader(
            self.stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=self.num_workers,
            persistent_workers=False,  # fresh workers pick up the new epoch and start batch
            worker_init_fn=_ignore_termination if self.num_workers else None,
            # Its own generator: a DataLoader iterator otherwise draws its workers' base seed
            # from the global torch RNG, which is also the student's dropout RNG, so a run
            # resumed mid-epoch (one more iterator) would see other dropout masks than an
            # uninterrupted one. The batches do not depend on it (seeded from the stream state).
            generator=torch.Generator().manual_seed(self.epoch),
            **self._loader_kwargs,
        )
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0
        self.ranges = None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "ranges": [list(r) for r in self.ranges] if self.ranges is not None else None,
            "seed": self.stream.seed,
            "world_size": self.stream.place.world_size,
            "grad_accum": self.stream.grad_accum,
            "batch_size": self.stream.batch_size,
            "uneven": self.stream.uneven,
            "shards": sorted(self.stream.records),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict, allow_changes: bool = False) -> str:
        """Continue at exactly the next sample of a saved run; returns "" or a line saying how
        the epoch was re-planned.

        Another layout (world size, grad_accum, batch size) continues the epoch where it was:
        with the same number of lanes of the same batch size, and lanes read evenly, the saved
        plan goes on unchanged (each step reads the batches it would have read); otherwise the
        positions not yet read are planned anew over the new ranks (:func:`remaining_ranges`),
        so that no sample of the epoch is skipped or repeated. A different seed, shard set or
        corpus would silently change which samples come next, so they are refused unless
        ``allow_changes`` (then the saved epoch continues from the same batch number of the new
        plan).
        """
        current = self.state_dict()
        data_changed = any(state.get(k) != current[k] for k in ("seed", "uneven", "shards", "fingerprint"))
        if not allow_changes:
            for key in ("seed", "uneven", "shards", "fingerprint"):
                if state.get(key) != current[key]:
                    shown = "a different shard list" if key == "shards" else f"{state.get(key)!r}"
                    raise ValueError(
                        f"stream state: {key} was {shown} when saved and is {current[key] if key != 'shards' else 'different'} now; "
                        "resuming would change which samples come next (allow it explicitly to go on)"
                    )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        saved_ranges = [tuple(r) for r in state["ranges"]] if state.get("ranges") is not None else None
        self.ranges = saved_ranges
        # Checkpoints written before lanes existed name no grad_accum: their layout is the current one.
        saved_world, saved_accum = int(state.get("world_size", 1)), int(state.get("grad_accum", current["grad_accum"]))
        saved_batch = int(state.get("batch_size", current["batch_size"]))
        world, accum, batch = current["world_size"], current["grad_accum"], current["batch_size"]
        if data_changed:
            self.ranges = None  # positions of another order
            return ""
        if (saved_world, saved_accum, saved_batch) == (world, accum, batch):
            return ""
        consumed = lanes_consumed(self.position, saved_accum)
        if saved_world * saved_accum == world * accum and saved_batch == batch and len(set(consumed)) == 1:
            # Same lanes, read evenly: the saved plan goes on, each rank now reading its lanes.
            self.position = consumed[0] * accum
            return ""
        old = EpochPlan(self.stream.plan_shards, self.stream.seed, self.epoch, saved_world, 0, saved_batch,
                        self.stream.uneven, saved_accum, saved_ranges)
        self.ranges = remaining_ranges(old, self.position)
        self.position = 0
        left = sum(e - s for s, e in self.ranges)
        return (f"stream: epoch {self.epoch} re-planned: its {left} unread samples split anew over "
                f"{world * accum} lanes of {batch} ({world} ranks x grad_accum {accum})")


def build_loader(
    cfg: StreamConfig,
    teacher: TeacherConfig | None,
    place: ProcessPlace,
    shard_dir: str | Path,
    transform: Transform | None = None,
    grad_accum: int = 1,
) -> ShardLoader:
    """Read and check the manifest, verify the shards, and return a ready ShardLoader.

    ``teacher``: the run's teacher config, checked against the manifest (None skips the check,
    for tools that only inspect shards).
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if teacher is not None:
        check_manifest(manifest, teacher, where=str(shard_dir / "manifest.json"))
    records, problems = verify_shards(shard_dir, manifest, cfg.verify, cfg.on_bad_shard, place)
    if problems and place.is_main:
        log.warning("skipping %d bad shard(s): %s", len(problems), ", ".join(sorted(problems)))
    stream = ShardStream(shard_dir, records, place, cfg.batch_size, cfg.seed, cfg.uneven, transform, grad_accum=grad_accum)
    loader = ShardLoader(stream, cfg.num_workers, fingerprint=manifest.corpus.get("fingerprint", ""))
    loader.skipped_shards = problems  # type: ignore[attr-defined]
    return loader
