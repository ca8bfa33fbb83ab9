"""`mmkd-precompute`: run the frozen teacher once and write webdataset shards.

    mmkd-precompute --config configs/demo.yaml [--precompute.out_dir=DIR] [--teacher.name=NAME]
    torchrun --nproc_per_node 8 -m mmkd_ds.cli.precompute --config run.yaml   # many GPUs/nodes
"""

from __future__ import annotations

import argparse
import sys

from mmkd_ds.config import ConfigError, load_config
from mmkd_ds.distributed import process_place


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkd-precompute",
        description="Teacher pass: write teacher [CLS] and word vectors of a parallel corpus into shards.",
        epilog="Any other --section.key=value argument overrides the YAML config, e.g. --precompute.shard_size=500.",
    )
    parser.add_argument("--config", help="YAML run config (defaults apply when omitted)")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mmkd-precompute: {exc}", file=sys.stderr)
        return 2
    # Imported late so that --help and config errors answer without loading torch.
    from mmkd_ds.data.corpus import CorpusError
    from mmkd_ds.precompute import run_precompute
    from mmkd_ds.shards.manifest import ManifestError
    from mmkd_ds.shards.writer import DiskFullError

    place = process_place()
    try:
        summary = run_precompute(cfg, place)
    except (CorpusError, ManifestError, DiskFullError, FileNotFoundError, ValueError) as exc:
        print(f"mmkd-precompute: {exc}", file=sys.stderr)
        return 2
    prefix = f"[rank {place.rank}/{place.world_size}] " if place.world_size > 1 else ""
    if place.rank == 0 and summary.report():  # the same corpus on every rank: report it once
        print("precompute: input " + summary.report(), flush=True)
    print(prefix + summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
