"""Offline teacher pass: corpus -> teacher [CLS] and word vectors -> webdataset shards.

The mixed corpus is cut into consecutive shards of ``shard_size`` pairs; shard i belongs to
rank ``i % world_size``, so any number of processes on any number of nodes write disjoint
shards with no communication. A shard is complete when its file sits under its final name and
its record is in ``_index/``; a re-run skips complete shards, so a killed job resumes where it
stopped and, since a shard's bytes depend only on its pairs and the teacher, ends with the same
bytes as an uninterrupted run. Whichever process finds every record present writes
``manifest.json`` (also on a re-run of a finished job).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmkd_ds import __version__
from mmkd_ds.config.schema import RunConfig
from mmkd_ds.data.corpus import Corpus, build_corpus
from mmkd_ds.data.pairs import Pair
from mmkd_ds.distributed import ProcessPlace, process_place
from mmkd_ds.shards.format import SCHEMA_VERSION, ShardSample, sample_key
from mmkd_ds.shards.manifest import Manifest, ManifestError, write_manifest
from mmkd_ds.shards.writer import (
    INDEX_DIR,
    DiskFullError,
    atomic_write_bytes,
    read_record,
    remove_stale_temporaries,
    shard_name,
    write_record,
    write_shard,
)
from mmkd_ds.teacher import Teacher, encode_batch, load_teacher
from mmkd_ds.words import PRETOKENIZER_NAME, split_words

RUN_HEADER = "run.json"
#: Beside the manifest: per reason, how many input lines were skipped or repaired, and where.
SKIPS_FILE = "skips.json"


@dataclass
class PrecomputeSummary:
    pairs_written: int
    shards_written: int
    shards_skipped: int
    bytes_written: int
    seconds: float
    manifest_path: Path | None
    corpus: Corpus
    shards_rebuilt: int = 0  # complete by size, but not by the sha256 of their _index record
    world_size: int = 1  # processes sharing the shards (each summary is one process's)

    def report(self) -> str:
        """The skipped and repaired input lines per reason with their first ``path:line``s ("" if
        there were none)."""
        log = self.corpus.log
        return log.summary() if (log.counts or log.repairs) else ""

    def line(self) -> str:
        rate = self.pairs_written / self.seconds if self.seconds > 0 else 0.0
        per_pair = self.bytes_written / self.pairs_written if self.pairs_written else 0.0
        skipped = self.corpus.log.total_skipped
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.corpus.log.counts.items())) or "none"
        done = f"manifest {self.manifest_path}" if self.manifest_path else "manifest pending (other ranks still writing)"
        if not self.shards_written:  # a re-run of a finished job: no rate to speak of
            whose = " of this rank" if self.world_size > 1 else ""
            state = (f"all {self.shards_skipped} shards{whose} complete" if self.shards_skipped
                     else "no shard falls to this rank")
            return (f"precompute: nothing to do: {state} (checked in {self.seconds:.1f} s); "
                    f"input lines skipped {skipped} ({reasons}); {done}")
        return (
            f"precompute: {self.pairs_written} pairs in {self.shards_written} shards "
            f"({self.shards_skipped} already complete"
            + (f", {self.shards_rebuilt} rewritten after a sha256 mismatch" if self.shards_rebuilt else "")
            + f") in {self.seconds:.1f} s, {rate:.1f} pairs/s, "
            f"{per_pair / 1024:.2f} KiB/pair; input lines skipped {skipped} ({reasons}); {done}"
        )


def corpus_fingerprint(pairs: list[Pair]) -> str:
    """sha256 of the pair sequence (texts and languages, not file locations)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.en, p.xx, p.lang], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def shard_plan(n_pairs: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, first pair, end pair) for every shard of the corpus."""
    return [(i, start, min(start + shard_size, n_pairs)) for i, start in enumerate(range(0, n_pairs, shard_size))]


def run_header(cfg: RunConfig, teacher: Teacher, corpus: Corpus) -> dict:
    """Everything that decides the bytes of the shards; shared by all ranks of one job."""
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher.identity(),
        "pretokenizer": PRETOKENIZER_NAME,
        "corpus": {
            "fingerprint": corpus_fingerprint(corpus.pairs),
            "pairs": len(corpus.pairs),
            "languages": dict(sorted(corpus.mixed_counts.items())),
            "usable_before_mixing": dict(sorted(corpus.lang_counts.items())),
            "alpha": cfg.data.alpha,
            "identity_pairs": cfg.data.identity_pairs,
            "seed": cfg.data.seed,
        },
        "shard_size": cfg.precompute.shard_size,
    }


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}"
    return None


def claim_output_dir(out_dir: Path, header: dict) -> None:
    """Record this job's header, or refuse a directory that holds another job's shards."""
    path = out_dir / INDEX_DIR / RUN_HEADER
    if path.is_file():
        existing = json.loads(path.read_text())
        diff = _first_difference(existing, header)
        if diff:
            raise ManifestError(
                f"{out_dir}: holds shards of another precompute (field {diff} differs: "
                f"{_lookup(existing, diff)!r} there, {_lookup(header, diff)!r} now); "
                "use a new out_dir or delete the old shards"
            )
        return
    (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(header, indent=2, sort_keys=True).encode())


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def build_samples(teacher: Teacher, pairs: list[Pair], first_index: int, batch_size: int) -> list[ShardSample]:
    """Teacher features for one shard's pairs, in corpus order.

    Forwards run over length-sorted batches (less padding); the shard keeps corpus order.
    """
    word_lists = [split_words(p.en) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda j: len(word_lists[j]))
    samples: list[ShardSample | None] = [None] * len(pairs)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        feats = encode_batch(teacher, [word_lists[j] for j in idx])
        for j, f in zip(idx, feats):
            p = pairs[j]
            samples[j] = ShardSample(
                key=sample_key(first_index + j),
                en=p.en,
                xx=p.xx,
                lang=p.lang,
                words=word_lists[j][: f.n_words],
                counts=f.counts,
                origin=p.origin,
                cls=f.cls.numpy(),
                word_vectors=f.words.numpy(),
            )
    return samples  # type: ignore[return-value]


def finalize_manifest(out_dir: Path, header: dict, plan: list[tuple[int, int, int]]) -> Path | None:
    """Write manifest.json when every shard of the plan is complete; else return None."""
    records = []
    for index, _, _ in plan:
        record = read_record(out_dir, shard_name(index))
        if record is None:
            return None
        records.append(record)
    manifest = Manifest(
        schema_version=header["schema_version"],
        teacher=header["teacher"],
        pretokenizer=header["pretokenizer"],
        corpus=header["corpus"],
        shard_size=header["shard_size"],
        shards=records,
        created_by=f"mmkd-ds {__version__}",
    )
    return write_manifest(out_dir, manifest)


def _space_needed(out_dir: Path, exc: DiskFullError, remaining: list[tuple[int, int, int]], failed_pairs: int) -> str:
    """What the remaining shards of this rank need, estimated from the shard that did not fit."""
    pairs = sum(end - start for _, start, end in remaining)
    free = shutil.disk_usage(out_dir).free
    if exc.path.suffix != ".tar" or failed_pairs == 0:
        return f"{len(remaining)} shard(s) of {pairs} pairs still to write; {free / 2**20:.1f} MiB free"
    per_pair = exc.needed / failed_pairs
    return (f"the {len(remaining)} remaining shard(s) of this rank ({pairs} pairs) need about "
            f"{pairs * per_pair / 2**20:.1f} MiB ({per_pair / 1024:.2f} KiB/pair), {free / 2**20:.1f} MiB free; "
            "free some space or point precompute.out_dir elsewhere, then run again (complete shards are kept)")


def pick_device(name: str, place: ProcessPlace) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", place.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def run_precompute(cfg: RunConfig, place: ProcessPlace | None = None) -> PrecomputeSummary:
    """Write this rank's shards (skipping complete ones) and, if all are done, the manifest."""
    place = place or process_place()
    started = time.perf_counter()
    out_dir = Path(cfg.precompute.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Every rank builds the same corpus (deterministic from the config) and so the same plan.
    corpus = build_corpus(cfg.data)
    plan = shard_plan(len(corpus.pairs), cfg.precompute.shard_size)
    mine = [s for s in plan if s[0] % place.world_size == place.rank]

    teacher = load_teacher(cfg.teacher, pick_device(cfg.precompute.device, place))
    header = run_header(cfg, teacher, corpus)
    claim_output_dir(out_dir, header)
    stale = remove_stale_temporaries(out_dir)
    if stale:
        tqdm.write(f"precompute: removed {len(stale)} temporary file(s) of processes that are gone: {', '.join(stale[:3])}"
                   + (" ..." if len(stale) > 3 else ""))

    # A shard counts as complete only if its bytes still hash to its record: a byte changed
    # inside a finished shard keeps its size. Hashing is cheap next to a teacher forward.
    todo, rebuilt = [], []
    for shard in mine:
        name = shard_name(shard[0])
        if read_record(out_dir, name) is None:
            todo.append(shard)
        elif read_record(out_dir, name, verify=True) is None:
            tqdm.write(f"precompute: {out_dir / name} does not match the sha256 of its {INDEX_DIR}/ record: writing it again")
            rebuilt.append(name)
            todo.append(shard)
    n_todo = sum(end - start for _, start, end in todo)
    bar = tqdm(
        total=n_todo,
        unit="pair",
        desc=f"precompute rank {place.rank}",
        disable=not (cfg.precompute.progress and place.is_main),
    )
    pairs_written = bytes_written = 0
    for i, (index, start, end) in enumerate(todo):
        samples = build_samples(teacher, corpus.pairs[start:end], start, cfg.precompute.batch_size)
        try:
            record = write_shard(out_dir / shard_name(index), samples, first_index=start, dtype=cfg.teacher.dtype)
            write_record(out_dir, record)
        except DiskFullError as exc:
            bar.close()
            exc.detail = _space_needed(out_dir, exc, todo[i:], end - start)
            raise
        pairs_written += record.samples
        bytes_written += record.bytes
        bar.update(record.samples)
    bar.close()

    if place.rank == 0:  # every rank read the same corpus: one writes what it skipped
        atomic_write_bytes(out_dir / SKIPS_FILE, (json.dumps(corpus.log.to_dict(), indent=2) + "\n").encode())
    manifest_path = finalize_manifest(out_dir, header, plan)
    return PrecomputeSummary(
        shards_rebuilt=len(rebuilt),
        world_size=place.world_size,
        pairs_written=pairs_written,
        shards_written=len(todo),
        shards_skipped=len(mine) - len(todo),
        bytes_written=bytes_written,
        seconds=time.perf_counter() - started,
        manifest_path=manifest_path,
        corpus=corpus,
    )
