"""The training data stream: teacher shards, or the raw corpus for the online-teacher mode.

Both go through the same epoch plan (equal batches per rank, deterministic order, resumable
state); the corpus is cut into virtual shards of ``precompute.shard_size`` pairs.
"""

from __future__ import annotations

from pathlib import Path

from mmkd_ds.config.schema import RunConfig
from mmkd_ds.data.corpus import build_corpus
from mmkd_ds.data.pairs import Pair
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.precompute import corpus_fingerprint, shard_plan
from mmkd_ds.shards.format import ShardSample, sample_key
from mmkd_ds.shards.manifest import read_manifest
from mmkd_ds.shards.stream import ShardLoader, ShardStream, Transform, build_loader
from mmkd_ds.shards.writer import ShardRecord, shard_name


def shard_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.stream.shard_dir or cfg.precompute.out_dir)


def teacher_hidden_size(cfg: RunConfig) -> int:
    """The teacher's hidden size, from the manifest (precomputed) or the model config (online)."""
    if cfg.train.teacher_mode == "precomputed":
        return int(read_manifest(shard_dir_of(cfg)).teacher["hidden_size"])
    from transformers import AutoConfig

    from mmkd_ds.model_source import check_model_source, explained_load

    path = check_model_source("teacher.name", cfg.teacher.name)
    with explained_load("teacher.name", cfg.teacher.name):
        return int(AutoConfig.from_pretrained(path).hidden_size)


class CorpusReader:
    """Reads pairs of an in-memory corpus like samples of a shard (no teacher vectors)."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def get(self, name: str) -> "CorpusReader":
        return self

    def read(self, index: int) -> ShardSample:
        p = self.pairs[index]
        return ShardSample(sample_key(index), p.en, p.xx, p.lang, [], [], p.origin, None, None)

    def close(self) -> None:
        pass


def build_corpus_loader(cfg: RunConfig, place: ProcessPlace, transform: Transform) -> ShardLoader:
    pairs = build_corpus(cfg.data).pairs
    records = [
        ShardRecord(shard_name(i), end - start, 0, "", {}, start)
        for i, start, end in shard_plan(len(pairs), cfg.precompute.shard_size)
    ]
    stream = ShardStream(
        Path("."), records, place, cfg.stream.batch_size, cfg.stream.seed, cfg.stream.uneven, transform,
        open_reader=lambda: CorpusReader(pairs), grad_accum=cfg.train.grad_accum,
    )
    return ShardLoader(stream, cfg.stream.num_workers, fingerprint=corpus_fingerprint(pairs))


def build_train_loader(cfg: RunConfig, place: ProcessPlace, transform: Transform) -> ShardLoader:
    if cfg.train.teacher_mode == "precomputed":
        return build_loader(cfg.stream, cfg.teacher, place, shard_dir_of(cfg), transform, cfg.train.grad_accum)
    return build_corpus_loader(cfg, place, transform)
