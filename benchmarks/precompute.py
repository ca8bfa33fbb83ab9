#!/usr/bin/env python
"""Benchmark the teacher precompute: pairs/s, and shard bytes per pair against fp32 per-token states.

Speed. The real ``mmkd_ds.precompute.run_precompute(cfg)`` runs into an empty directory
(``WORKDIR/precompute/run-K``, removed first), ``--warmup`` runs excluded, then ``--reps`` timed.
To separate model loading from the work, the functions that ``run_precompute`` calls are wrapped
with timers for the duration of the call (module attributes of mmkd_ds.precompute; the package
code is not changed):

    corpus        build_corpus             reading, filtering, mixing the corpus
    load          load_teacher             from_pretrained, weight hashing, moving to the device
    forward       build_samples            pre-tokenising, teacher tokenisation, the teacher forward,
                                           word pooling, conversion to the storage dtype, per shard
    write         write_shard              tar encoding, fsync, rename, sha256, per shard
    bookkeeping   write_record, finalize_manifest, and the rest of the call (claiming the
                  directory, checking for complete shards)

    pairs/s (headline)   pairs / (total - corpus - load): teacher forward + shard writing + bookkeeping
    pairs/s end to end   pairs / total (what `mmkd-precompute` prints, model loading included)
    forward, write       pairs / that phase's time

Each figure is the median over the timed runs; every run's phases are in the JSON. The runs
are checked to give byte-identical shards.

Size. Shard bytes = the sizes of the shard files (tar headers and padding included) of one run.
The baseline stores per-token teacher states in fp32 instead of the [CLS] and word vectors:
for each pair, T x H x 4 bytes, where T is the number of teacher tokens of its English side as
the teacher sees them (the real teacher tokenizer on the shared pre-tokenizer's word list,
special tokens included, cut at teacher.max_tokens exactly as the precompute cuts it; checked
against the subword counts stored in the shards), H the teacher's hidden size; plus the same
text overhead: the bytes that the json members (texts, word list, counts) take in the real
shards, tar headers and padding included. The headline ratio is shard bytes / that baseline
(target <= 35%). Also reported: the baseline written as the same tar layout (a tokens.npy member
[T, H] fp32 in place of vec.npy, npy and tar headers and end-of-archive included, computed
exactly from the tar format), an fp16 per-token variant, and the vectors alone.

Storage dtypes. Besides the timed runs (the config's teacher.dtype), one untimed precompute per
other dtype of --storage (float32, float16, int8) gives that storage's shard bytes against the
same baseline, and the error of each against float32 storage of the same teacher outputs, per
stored vector (relative error and 1 - cosine).

    python benchmarks/precompute.py                      # workdir runs/bench-data, results in benchmarks/results
    python benchmarks/precompute.py --reps 5 --threads 2
    python benchmarks/precompute.py --data.mix_size=300  # any --section.key=value overrides the config

Output: a table on stdout, precompute-<slug>.json and .md under --out (default
benchmarks/results; '' writes nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import describe_machine, log, seed_everything, summarise, versions, with_gpu, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET_SIZE_RATIO = 0.35
TARGETS_TEXT = {"size": f"shards <= {100 * TARGET_SIZE_RATIO:g}% of the fp32 per-token teacher states"}
WRAPPED = {  # mmkd_ds.precompute attribute -> phase
    "build_corpus": "corpus",
    "load_teacher": "load",
    "build_samples": "forward",
    "write_shard": "write",
    "write_record": "record",
    "finalize_manifest": "manifest",
}
TAR_BLOCK = 512
TEXT_MEMBERS = ("json",)  # texts, word lists, counts (and int8 scales): what is not a vector
VECTOR_MEMBERS = ("vec.npy",)  # [1 + n_words, H]: [CLS] and the word vectors


# --------------------------------------------------------------------------------------------
# Speed: the real run_precompute, its phases timed
# --------------------------------------------------------------------------------------------


def run_config(args, overrides: list[str], out_dir: Path):
    from mmkd_ds.config import load_config

    forced = [f"--precompute.out_dir={out_dir}", "--precompute.progress=false", f"--precompute.device={args.device}"]
    return load_config(args.config, overrides + forced)


def timed_precompute(cfg) -> dict[str, Any]:
    """One run_precompute(cfg) with the time spent in each wrapped function."""
    import mmkd_ds.precompute as P

    spent = {phase: 0.0 for phase in WRAPPED.values()}
    originals = {name: getattr(P, name) for name in WRAPPED}

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[WRAPPED[name]] += time.perf_counter() - t0

        return timed

    for name, fn in originals.items():
        setattr(P, name, wrap(name, fn))
    try:
        t0 = time.perf_counter()
        summary = P.run_precompute(cfg)
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(P, name, fn)
    if summary.manifest_path is None:
        raise SystemExit(f"precompute into {cfg.precompute.out_dir} did not finish (no manifest)")
    pairs = summary.pairs_written
    work = total - spent["corpus"] - spent["load"]
    bookkeeping = work - spent["forward"] - spent["write"]  # records, manifest, directory checks
    return {
        "pairs": pairs,
        "shards": summary.shards_written,
        "bytes": summary.bytes_written,
        "total_s": total,
        "corpus_s": spent["corpus"],
        "load_s": spent["load"],
        "forward_s": spent["forward"],
        "write_s": spent["write"],
        "bookkeeping_s": bookkeeping,
        "work_s": work,
        "pairs_per_s": pairs / work,
        "pairs_per_s_end_to_end": pairs / total,
        "pairs_per_s_forward": pairs / spent["forward"] if spent["forward"] else None,
        "pairs_per_s_write": pairs / spent["write"] if spent["write"] else None,
        "summary_line": summary.line(),
    }


def shard_digests(shard_dir: Path) -> dict[str, str]:
    from mmkd_ds.shards.manifest import read_manifest

    return {s.name: s.sha256 for s in read_manifest(shard_dir).shards}


# --------------------------------------------------------------------------------------------
# Size: shard bytes against fp32 per-token teacher states
# --------------------------------------------------------------------------------------------


def footprint(size: int) -> int:
    """Bytes a ustar member of ``size`` data bytes takes: one header block + data padded to 512."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_size(member_sizes: list[int]) -> int:
    """Size of a tar written by tarfile: members, two zero blocks, padded to RECORDSIZE."""
    body = sum(footprint(s) for s in member_sizes) + 2 * TAR_BLOCK
    return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@functools.cache
def npy_header_bytes(shape: tuple[int, ...], dtype: str) -> int:
    buf = io.BytesIO()
    arr = np.zeros(shape, dtype=dtype)
    np.save(buf, arr, allow_pickle=False)
    return len(buf.getvalue()) - arr.nbytes


def measure_size(cfg, shard_dir: Path) -> dict[str, Any]:
    """Per-member bytes of the real shards and the fp32 per-token baseline from the real tokenisation."""
    from transformers import AutoTokenizer

    from mmkd_ds.data.corpus import build_corpus
    from mmkd_ds.precompute import corpus_fingerprint
    from mmkd_ds.shards.format import split_member_name
    from mmkd_ds.shards.manifest import read_manifest
    from mmkd_ds.model_source import resolve_model_path
    from mmkd_ds.words import encode_words, split_words

    manifest = read_manifest(shard_dir)
    H = int(manifest.teacher["hidden_size"])
    max_tokens = int(manifest.teacher["max_tokens"])
    pairs = build_corpus(cfg.data).pairs
    if corpus_fingerprint(pairs) != manifest.corpus["fingerprint"]:
        raise SystemExit(f"{shard_dir}: the shards hold another corpus than the config's")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(manifest.teacher["name"]))

    # The real shards, member by member.
    by_suffix: dict[str, dict[str, int]] = {}
    per_key: dict[str, dict[str, Any]] = {}
    shard_bytes = end_bytes = 0
    recomputed_ok = True
    for record in manifest.shards:
        path = shard_dir / record.name
        size = path.stat().st_size
        shard_bytes += size
        sizes = []
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, suffix = split_member_name(member.name)
                agg = by_suffix.setdefault(suffix, {"members": 0, "payload": 0, "footprint": 0})
                agg["members"] += 1
                agg["payload"] += member.size
                agg["footprint"] += footprint(member.size)
                sizes.append(member.size)
                entry = per_key.setdefault(key, {"shard": record.name, "text_footprint": 0})
                if suffix in TEXT_MEMBERS:
                    entry["text_footprint"] += footprint(member.size)
                if suffix == "json":
                    meta = json.loads(tar.extractfile(member).read().decode("utf-8"))
                    entry["counts"], entry["n_words"] = meta["counts"], len(meta["words"])
        end_bytes += size - sum(footprint(s) for s in sizes)
        recomputed_ok &= tar_size(sizes) == size

    # The teacher's tokens of every pair, as encode_batch computes them.
    tokens: list[int] = []
    mismatches = truncated = 0
    shard_members_baseline: dict[str, list[int]] = {}
    text_footprint_total = 0
    for index, pair in enumerate(pairs):
        words = split_words(pair.en)
        enc = encode_words(tokenizer, words, max_tokens)
        T = len(enc.input_ids)
        tokens.append(T)
        truncated += enc.n_words < len(words)
        entry = per_key[f"{index:09d}"]
        if enc.counts != entry["counts"] or enc.n_words != entry["n_words"]:
            mismatches += 1
        text_footprint_total += entry["text_footprint"]
        # The same shard with one tokens.npy [T, H] fp32 member instead of vec.npy.
        # (its text/json members are added below, with their real sizes)
        shard_members_baseline.setdefault(entry["shard"], []).append(T * H * 4 + npy_header_bytes((T, H), "float32"))
    # Text/json member sizes per shard, from the real shards.
    for record in manifest.shards:
        with tarfile.open(shard_dir / record.name, mode="r:") as tar:
            for member in tar:
                if split_member_name(member.name)[1] in TEXT_MEMBERS:
                    shard_members_baseline[record.name].append(member.size)

    n = len(pairs)
    sum_T = sum(tokens)
    fp32_states = sum_T * H * 4
    fp16_states = sum_T * H * 2
    baseline = fp32_states + text_footprint_total  # the headline baseline
    baseline_tar = sum(tar_size(v) for v in shard_members_baseline.values())
    vec_payload = sum(by_suffix[s]["payload"] for s in VECTOR_MEMBERS)
    vec_footprint = sum(by_suffix[s]["footprint"] for s in VECTOR_MEMBERS)
    words_total = sum(e["n_words"] for e in per_key.values())
    vec_data = (words_total + n) * H * np.dtype(manifest.teacher["dtype"]).itemsize  # [CLS] + word vectors, no npy header
    return {
        "pairs": n,
        "hidden_size": H,
        "teacher_max_tokens": max_tokens,
        "teacher_tokens": {"total": sum_T, "mean": sum_T / n, "median": statistics.median(tokens),
                           "max": max(tokens), "min": min(tokens), "pairs_truncated": truncated},
        "words": {"total": words_total, "mean": words_total / n},
        "tokenisation_check": {"pairs_whose_counts_differ_from_the_shards": mismatches,
                               "tar_sizes_recomputed_exactly": recomputed_ok},
        "members": by_suffix,
        "end_of_archive_bytes": end_bytes,
        "text_json_footprint_bytes": text_footprint_total,
        "shard_bytes": shard_bytes,
        "shard_bytes_per_pair": shard_bytes / n,
        "baseline": {
            "what": "sum over pairs of T*H*4 (T = teacher tokens incl. specials, cut at max_tokens) + the bytes the "
                    "json members (texts, word lists, counts) take in the real shards (tar headers and padding included)",
            "bytes": baseline,
            "bytes_per_pair": baseline / n,
            "fp32_states_bytes": fp32_states,
        },
        "baseline_tar": {
            "what": "the same tar layout with one tokens.npy [T, H] fp32 member per pair in place of vec.npy "
                    "(npy header, tar headers, padding, end-of-archive included)",
            "bytes": baseline_tar,
            "bytes_per_pair": baseline_tar / n,
        },
        "baseline_fp16_tokens": {
            "what": "as baseline, with per-token states in fp16 (T*H*2)",
            "bytes": fp16_states + text_footprint_total,
            "bytes_per_pair": (fp16_states + text_footprint_total) / n,
        },
        "ratio": shard_bytes / baseline,
        "ratio_vs_baseline_tar": shard_bytes / baseline_tar,
        "ratio_vs_fp16_tokens": shard_bytes / (fp16_states + text_footprint_total),
        "ratio_vectors_only": vec_data / fp32_states,
        "vector_members": {"data_bytes": vec_data, "payload_bytes": vec_payload, "footprint_bytes": vec_footprint},
    }


def storage_variants(args, overrides: list[str], base: Path, main_dtype: str, main_dir: Path) -> dict[str, Path]:
    """One untimed precompute per other storage dtype (teacher.dtype), same corpus and teacher."""
    from mmkd_ds.precompute import run_precompute

    dirs = {main_dtype: main_dir}
    for dtype in args.storage:
        if dtype in dirs:
            continue
        out_dir = base / f"dtype-{dtype}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        log(f"storage variant teacher.dtype={dtype}: one untimed precompute into {out_dir}")
        seed_everything(args.seed)
        run_precompute(run_config(args, overrides + [f"--teacher.dtype={dtype}"], out_dir))
        dirs[dtype] = out_dir
    return dirs


def read_vectors(shard_dir: Path) -> np.ndarray:
    """Every stored vector of a shard directory, decoded, as float32 [N, H] ([CLS] and words)."""
    from mmkd_ds.shards.manifest import read_manifest
    from mmkd_ds.shards.reader import ShardFile

    rows = []
    for record in read_manifest(shard_dir).shards:
        shard = ShardFile(shard_dir / record.name, record)
        for i in range(record.first_index, record.first_index + record.samples):
            s = shard.read(i)
            rows.append(np.vstack([s.cls[None].astype(np.float32), s.word_vectors.astype(np.float32)]))
        shard.close()
    return np.vstack(rows)


def fidelity(dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per stored vector, the error of each storage dtype against float32 storage."""
    if "float32" not in dirs:
        return {}
    ref = read_vectors(dirs["float32"])
    ref_norm = np.linalg.norm(ref, axis=1)
    out = {}
    for dtype, d in dirs.items():
        got = read_vectors(d)
        rel = np.linalg.norm(got - ref, axis=1) / np.maximum(ref_norm, 1e-12)
        one_minus_cos = 1 - (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * ref_norm, 1e-12)
        out[dtype] = {
            "vectors": int(ref.shape[0]),
            "relative_error_median": float(np.median(rel)),
            "relative_error_p99": float(np.quantile(rel, 0.99)),
            "relative_error_max": float(rel.max()),
            "one_minus_cosine_median": float(np.median(one_minus_cos)),
            "one_minus_cosine_max": float(one_minus_cos.max()),
            "absmax_over_rms_median": float(np.median(np.abs(ref).max(1) / np.maximum(ref_norm / np.sqrt(ref.shape[1]), 1e-12))),
        }
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def evaluate_targets(size: dict, variants: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """The size target for the configured storage dtype and for every other one measured."""
    out = {}
    for dtype, v in {size["dtype"]: {"ratio": size["ratio"]}, **variants}.items():
        r = v["ratio"]
        out[f"size-{dtype}"] = {"target": f"{TARGETS_TEXT['size']}, {dtype} storage", "value": r,
                                "met": r <= TARGET_SIZE_RATIO,
                                "status": f"{'met' if r <= TARGET_SIZE_RATIO else 'NOT met'} ({100 * r:.1f}%)"}
    return out


def tables(result: dict[str, Any]) -> str:
    m, c, sp, sz = result["machine"], result["config"], result["speed"], result["size"]
    out = [f"# mmkd-ds precompute benchmark: {m['name']}", ""]
    out.append(f"- date: {result['date']}; torch {result['versions']['torch']} ({m['torch_threads']} threads), "
               f"transformers {result['versions']['transformers']}, tokenizers {result['versions']['tokenizers']}, "
               f"Python {result['versions']['python']}")
    out.append(f"- machine: {m['cpu_model']}, {m['usable_logical_cores']} usable logical cores "
               f"({m['physical_cores']} physical), load average at start {m['load_average_start'][0]:.2f}, "
               f"at end {m['load_average_end'][0]:.2f}")
    out.append(f"- command: `{result['command']}`")
    out.append(f"- config: {c['config_path']}: {sz['pairs']} pairs, teacher {c['teacher']} (H={sz['hidden_size']}, "
               f"max {sz['teacher_max_tokens']} tokens, {c['teacher_dtype']} storage, {c['pooling']} pooling), "
               f"shard size {c['shard_size']}, forward batch {c['forward_batch']}, device {c['device']}")
    if result.get("overrides"):
        out.append(f"- config overrides: `{' '.join(result['overrides'])}`")
    st = result["settings"]
    out.append(f"- timing: time.perf_counter around run_precompute, phases by wrapping the functions it calls; "
               f"{st['warmup']} warm-up run(s) excluded, median of {st['reps']} timed runs; shards byte-identical "
               f"across runs: {sp['identical_shards']}")
    out.append("")
    out.append("## Speed")
    out.append("")
    out.append("| figure | pairs/s | time (s) |")
    out.append("|---|---:|---:|")
    med = sp["median"]
    out.append(f"| teacher forward + shard writing (model loading and corpus excluded) | {med['pairs_per_s']:.1f} | {med['work_s']:.2f} |")
    out.append(f"| end to end (run_precompute, model loading included) | {med['pairs_per_s_end_to_end']:.1f} | {med['total_s']:.2f} |")
    out.append(f"| teacher forward alone (build_samples) | {med['pairs_per_s_forward']:.1f} | {med['forward_s']:.2f} |")
    out.append(f"| shard writing alone (write_shard) | {med['pairs_per_s_write']:.0f} | {med['write_s']:.2f} |")
    out.append(f"| model loading (load_teacher) | | {med['load_s']:.2f} |")
    out.append(f"| corpus (build_corpus) | | {med['corpus_s']:.2f} |")
    out.append(f"| bookkeeping (records, manifest, the rest) | | {med['bookkeeping_s']:.2f} |")
    out.append("")
    out.append("Each row is the median over the timed runs, taken per figure.")
    out.append("")
    out.append("## Size")
    out.append("")
    out.append("| storage | bytes | bytes per pair | shards / baseline |")
    out.append("|---|---:|---:|---:|")
    out.append(f"| shards, {sz['dtype']} [CLS] + word vectors (the timed runs) | {sz['shard_bytes']:,} | "
               f"{sz['shard_bytes_per_pair']:,.0f} | **{100 * sz['ratio']:.1f}%** |")
    for dtype, v in result["storage_variants"].items():
        out.append(f"| shards, {dtype} [CLS] + word vectors (teacher.dtype={dtype}) | {v['shard_bytes']:,} | "
                   f"{v['shard_bytes_per_pair']:,.0f} | **{100 * v['ratio']:.1f}%** |")
    b = sz["baseline"]
    out.append(f"| **fp32 per-token states + same text/json members** (baseline) | {b['bytes']:,} | {b['bytes_per_pair']:,.0f} | 100% |")
    out.append("")
    out.append("| storage | bytes | bytes per pair | timed shards / this |")
    out.append("|---|---:|---:|---:|")
    bt = sz["baseline_tar"]
    out.append(f"| the baseline as a tar (tokens.npy [T, H] fp32 per pair) | {bt['bytes']:,} | {bt['bytes_per_pair']:,.0f} | {100 * sz['ratio_vs_baseline_tar']:.1f}% |")
    bf = sz["baseline_fp16_tokens"]
    out.append(f"| fp16 per-token states + same text/json members | {bf['bytes']:,} | {bf['bytes_per_pair']:,.0f} | {100 * sz['ratio_vs_fp16_tokens']:.1f}% |")
    out.append("")
    tt = sz["teacher_tokens"]
    out.append(f"T (teacher tokens per pair, specials included, real tokenisation cut at {sz['teacher_max_tokens']}): "
               f"mean {tt['mean']:.1f}, median {tt['median']:g}, max {tt['max']} ({tt['pairs_truncated']} pairs truncated); "
               f"words per pair: mean {sz['words']['mean']:.1f}. Vectors alone: (words + 1) x H x 2 bytes = "
               f"{100 * sz['ratio_vectors_only']:.1f}% of T x H x 4. Shard bytes by member (data / with tar header and padding): "
               + ", ".join(f"{k} {v['payload'] / sz['pairs']:,.0f} / {v['footprint'] / sz['pairs']:,.0f}"
                           for k, v in sz["members"].items())
               + f" per pair; end of archive {sz['end_of_archive_bytes']:,} bytes in all. Tokenisation check: "
               f"{sz['tokenisation_check']['pairs_whose_counts_differ_from_the_shards']} pairs whose teacher subword "
               f"counts differ from the shards'.")
    out.append("")
    if result["storage_error"]:
        out.append("Storage error per stored vector ([CLS] and word vectors), against float32 storage of the same "
                   "teacher outputs: relative error |v - v32| / |v32| and 1 - cos(v, v32).")
        out.append("")
        out.append("| storage | vectors | rel. error, median | p99 | max | 1 - cos, median | max |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for dtype, e in result["storage_error"].items():
            out.append(f"| {dtype} | {e['vectors']:,} | {e['relative_error_median']:.1e} | {e['relative_error_p99']:.1e} | "
                       f"{e['relative_error_max']:.1e} | {e['one_minus_cosine_median']:.1e} | {e['one_minus_cosine_max']:.1e} |")
        e0 = next(iter(result["storage_error"].values()))
        out.append("")
        out.append(f"The teacher's vectors have max|v| / rms(v) = {e0['absmax_over_rms_median']:.1f} (median): int8's "
                   "step per row is max|v| / 127, so teachers with larger outlier dimensions lose more.")
        out.append("")
    out.append("## Targets (from the issue)")
    out.append("")
    out.append("| target | status on this run |")
    out.append("|---|---|")
    for tgt in result["targets"].values():
        out.append(f"| {tgt['target']} | {tgt['status']} |")
    out.append("")
    # The load at the end includes this benchmark's own threads: only the start tells of other jobs.
    if m["load_average_start"][0] > 0.5 * m["usable_logical_cores"]:
        out.append(f"Note: the machine was busy (load average {m['load_average_start'][0]:.2f} at start, "
                   f"{m['load_average_end'][0]:.2f} at end, on {m['usable_logical_cores']} cores); the speed figures "
                   "are noisy (the sizes are not).")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --section.key=value argument overrides the run config.")
    p.add_argument("--config", default=str(REPO / "configs" / "demo-scratch.yaml"), help="run config (default configs/demo-scratch.yaml)")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench-data"),
                   help="the runs write shards into WORKDIR/precompute/run-K, each emptied first "
                        "(default runs/bench-data)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="where precompute-<slug>.json/.md go (default benchmarks/results); '' writes nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="precompute.device (default cpu)")
    p.add_argument("--warmup", type=int, default=1, help="runs excluded (default 1)")
    p.add_argument("--reps", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--storage", nargs="*", default=["float32", "float16", "int8"], choices=("float32", "float16", "int8"),
                   help="storage dtypes (teacher.dtype) whose shard sizes are also measured, one untimed precompute "
                        "each; float32 is the reference of the storage-error table (default: all three)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and "." not in a.split("=", 1)[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    t_begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    machine = describe_machine(args.threads)
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        machine = with_gpu(machine, torch.cuda.get_device_name())
    log(f"machine: {machine['name']}; torch threads {torch.get_num_threads()}")

    base = Path(args.workdir).resolve() / "precompute"
    runs: list[dict[str, Any]] = []
    digests: list[dict[str, str]] = []
    cfg = None
    for k in range(args.warmup + args.reps):
        out_dir = base / f"run-{k}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        cfg = run_config(args, overrides, out_dir)
        seed_everything(args.seed)
        r = timed_precompute(cfg)
        r["warmup"] = k < args.warmup
        r["run"] = k
        runs.append(r)
        digests.append(shard_digests(out_dir))
        log(f"run {k}{' (warm-up)' if r['warmup'] else ''}: {r['pairs']} pairs, total {r['total_s']:.2f} s "
            f"(load {r['load_s']:.2f}, corpus {r['corpus_s']:.2f}, forward {r['forward_s']:.2f}, write {r['write_s']:.2f}) "
            f"= {r['pairs_per_s']:.1f} pairs/s without loading")
        if k < args.warmup + args.reps - 1:
            shutil.rmtree(out_dir)
    last_dir = base / f"run-{args.warmup + args.reps - 1}"
    timed = [r for r in runs if not r["warmup"]]
    keys = ("total_s", "corpus_s", "load_s", "forward_s", "write_s", "bookkeeping_s", "work_s", "pairs_per_s",
            "pairs_per_s_end_to_end", "pairs_per_s_forward", "pairs_per_s_write")
    speed = {
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in timed) for k in keys},
        "spread": {k: summarise([r[k] for r in timed]) for k in keys},
        "identical_shards": all(d == digests[0] for d in digests),
    }
    log("measuring sizes")
    from mmkd_ds.shards.manifest import read_manifest

    size = measure_size(cfg, last_dir)
    size["dtype"] = cfg.teacher.dtype
    dirs = storage_variants(args, overrides, base, cfg.teacher.dtype, last_dir)
    variants = {}
    for dtype, d in dirs.items():
        if dtype == cfg.teacher.dtype:
            continue
        nbytes = sum(s.bytes for s in read_manifest(d).shards)
        # Against the main run's baseline: the fp32 per-token states plus the texts' JSON without
        # int8 scales (the scales count in the int8 shards' bytes, not in the baseline).
        variants[dtype] = {"shard_bytes": nbytes, "shard_bytes_per_pair": nbytes / size["pairs"],
                           "ratio": nbytes / size["baseline"]["bytes"], "shard_dir": str(d)}
    log("measuring the storage error against float32")
    errors = fidelity(dirs)
    machine["load_average_end"] = list(os.getloadavg())

    result = {
        "benchmark": "precompute",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine,
        "versions": versions(),
        "overrides": overrides,
        "config": {
            "config_path": os.path.relpath(args.config, REPO) if Path(args.config).is_absolute() else args.config,
            "teacher": cfg.teacher.name,
            "teacher_dtype": cfg.teacher.dtype,
            "pooling": cfg.teacher.pooling,
            "layer": cfg.teacher.layer,
            "shard_size": cfg.precompute.shard_size,
            "forward_batch": cfg.precompute.batch_size,
            "device": args.device,
            "shard_dir": str(last_dir),
        },
        "settings": {"threads": args.threads, "seed": args.seed, "warmup": args.warmup, "reps": args.reps,
                     "clock": "time.perf_counter", "statistic": "median"},
        "speed": speed,
        "size": size,
        "storage_variants": variants,
        "storage_error": errors,
    }
    result["targets"] = evaluate_targets(size, variants)
    md = tables(result)
    print(md)
    written = write_results(args.out, f"precompute-{machine['slug']}", result, md)
    if written:
        log(f"wrote {', '.join(written)}")
    log(f"done in {time.perf_counter() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
