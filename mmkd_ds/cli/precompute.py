"""`mmkd-precompute`: run the frozen teacher once and write webdataset shards.

    mmkd-precompute --config configs/demo.yaml [--precompute.out_dir=DIR] [--teacher.name=NAME]
    torchrun --nproc_per_node 8 -m mmkd_ds.cli.precompute --config run.yaml   # many GPUs/nodes
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mmkd_ds.cli.arguments import HelpFormatter, add_config_arguments, config_epilog, print_config
from mmkd_ds.config import ConfigError, load_config
from mmkd_ds.distributed import process_place

DESCRIPTION = """\
Teacher pass: write the frozen teacher's [CLS] and word vectors of a parallel corpus into shards.

Examples:
  mmkd-precompute --config configs/demo.yaml
  mmkd-precompute --config run.yaml --precompute.out_dir=/data/shards --teacher.name=DIR
  torchrun --nproc_per_node 8 -m mmkd_ds.cli.precompute --config run.yaml    # one rank per GPU
  deepspeed --num_gpus 8 launchers/precompute.py --config run.yaml            # the same
Ranks write disjoint shards; a re-run (after a crash, a kill or a preemption) skips the complete
shards and continues.

Outputs, in precompute.out_dir (default runs/demo/shards):
  shard-NNNNNN.tar  webdataset shards: per pair, the texts, the English words and the teacher's
                    [CLS] and word vectors
  manifest.json     the shards with sizes and sha256, the teacher settings and the corpus counts
  skips.json        the corpus lines the filters skipped, counted by reason, with examples
  _index/           run.json and one record per complete shard (how a re-run knows what is done)
"""

EXIT_CODES = """\
Exit codes:
  0    done (also when every shard was already complete)
  2    bad config or input (config file, corpus, teacher, existing shards of other settings, disk full)
  130  Ctrl-C, 143 SIGTERM or the launcher gone: the shard being written is removed, the finished
       ones are kept, and the same command continues
  1    any other failure (a traceback)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkd-precompute",
        description=DESCRIPTION,
        epilog=EXIT_CODES + "\n" + config_epilog("mmkd-precompute"),
        formatter_class=HelpFormatter,
    )
    add_config_arguments(parser, "YAML run config; its data, teacher and precompute sections apply "
                                 "(without it, the defaults of every key: the bundled sample corpus)")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


class Stopped(BaseException):
    """SIGTERM, SIGINT, or the job's launcher gone: the shard being written is removed, the
    finished ones are kept, and the same command continues later."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def _launcher_gone(launcher: str) -> None:
    print(f"mmkd-precompute: {launcher} exited; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, like a scheduler's SIGTERM


def main(argv: list[str] | None = None) -> int:
    from mmkd_ds.launcher_watch import LauncherWatch, launchers_at_start

    launchers_at_start()  # before anything slow: see mmkd_ds.launcher_watch
    args, overrides = build_parser().parse_known_args(argv)
    if args.print_config:
        return print_config("mmkd-precompute", args.config, overrides)
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
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    watch = LauncherWatch(_launcher_gone).start()
    try:
        summary = run_precompute(cfg, place)
    except (CorpusError, ManifestError, DiskFullError, FileNotFoundError, ValueError) as exc:
        print(f"mmkd-precompute: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"mmkd-precompute: stopped by {stop}; finished shards are kept, the same command continues",
              file=sys.stderr)
        return 128 + stop.signum
    finally:
        watch.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    prefix = f"[rank {place.rank}/{place.world_size}] " if place.world_size > 1 else ""
    if place.rank == 0 and summary.report():  # the same corpus on every rank: report it once
        print("precompute: input " + summary.report(), flush=True)
    print(prefix + summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
