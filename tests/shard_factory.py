"""Shard directories with fake teacher vectors, for stream and training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmkd_ds.shards.format import SCHEMA_VERSION, ShardSample, sample_key
from mmkd_ds.shards.manifest import Manifest, write_manifest
from mmkd_ds.shards.writer import shard_name, write_shard
from mmkd_ds.words import PRETOKENIZER_NAME

TEACHER_NAME = "tiny-teacher"


def make_shards(out: Path, sizes: list[int], hidden: int = 4, poison: set[int] = frozenset()) -> Manifest:
    """Shards of the given (uneven) sizes and their manifest; samples in ``poison`` get NaN vectors."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records, first = [], 0
    for i, size in enumerate(sizes):
        samples = []
        for j in range(first, first + size):
            words = ["word", "number", str(j)][: 1 + j % 3]
            cls = rng.standard_normal(hidden).astype(np.float16)
            vectors = rng.standard_normal((len(words), hidden)).astype(np.float16)
            if j in poison:
                cls[:] = np.nan
                vectors[:] = np.nan
            samples.append(
                ShardSample(
                    key=sample_key(j), en=" ".join(words), xx=f"neno {j}", lang="sw" if j % 2 else "ur",
                    words=words, counts=[1] * len(words), origin=f"fake.tsv:{j + 1}", cls=cls, word_vectors=vectors,
                )
            )
        records.append(write_shard(out / shard_name(i), samples, first_index=first))
        first += size
    teacher = {"name": TEACHER_NAME, "revision": "local", "weights_sha256": "0" * 64, "hidden_size": hidden,
               "layer": -1, "pooling": "first", "dtype": "float16", "max_tokens": 128}
    manifest = Manifest(SCHEMA_VERSION, teacher, PRETOKENIZER_NAME, {"fingerprint": "f" * 64, "pairs": first},
                        max(sizes), records)
    write_manifest(out, manifest)
    return manifest
