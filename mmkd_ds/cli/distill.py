"""`mmkd-distill` / `launchers/distill.py`: argument parsing around training.loop.train."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = argparse.ArgumentParser(
        prog="distill",
        description="Train a multilingual student by MMKD from precomputed teacher shards.",
        epilog="Any other --section.key=value overrides the YAML config, e.g. --train.steps=500.",
    )
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmkd_ds.launcher_watch import launchers_at_start

    launchers_at_start()  # before the slow imports: a launcher that dies meanwhile is still noticed
    from mmkd_ds.config import ConfigError, load_config

    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"distill: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mmkd_ds.distributed import abort, shutdown
    from mmkd_ds.model_source import ModelSourceError
    from mmkd_ds.shards.manifest import ManifestError
    from mmkd_ds.shards.reader import ShardError
    from mmkd_ds.training.checkpoint import ResumeError
    from mmkd_ds.training.loop import NonFiniteLossError, train

    try:
        result = train(cfg, args.deepspeed_config, resume=args.resume)
    except (ManifestError, ShardError, ResumeError, ModelSourceError, FileNotFoundError) as exc:
        abort(f"distill: {exc}", 2)
    except NonFiniteLossError as exc:
        abort(f"distill: {exc}", 3)
    except BaseException:  # noqa: BLE001 - any other failure of one rank must end the job
        abort(f"distill: rank {os.environ.get('RANK', '0')} failed:\n{traceback.format_exc()}", 1)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(result.line(), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
