"""`mmkd-distill` / `launchers/distill.py`: argument parsing around training.loop.train.

The parser imports nothing heavy: ``--help`` and ``--print-config`` answer at once, and torch,
DeepSpeed and transformers are imported only once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from mmkd_ds.cli.arguments import HelpFormatter, add_config_arguments, config_epilog, print_config

DESCRIPTION = """\
Distil a multilingual student from precomputed teacher shards (MMKD), on DeepSpeed.

Examples: run it under DeepSpeed's launcher, `deepspeed`, one process per GPU (or CPU rank):
  deepspeed --num_gpus 8 launchers/distill.py --config run.yaml \\
      --deepspeed_config ds_configs/zero2.json [--resume] [--train.steps=1000 ...]
  deepspeed --num_gpus 2 launchers/distill.py --config configs/demo.yaml \\
      --deepspeed_config ds_configs/zero2.json                 # the CPU demo, 2 ranks
A plain `python launchers/distill.py --config run.yaml` (or `mmkd-distill`) is a world of one.
The YAML run config sets the data, student, losses and schedule; the DeepSpeed JSON sets the
ZeRO stage and its options (the YAML's batch, optimizer and precision win over the JSON's).

Outputs, in train.out_dir (default runs/demo/distill):
  checkpoints/     DeepSpeed checkpoints every train.save_every steps (--resume continues)
  metrics.jsonl    losses, learning rate, throughput and held-out retrieval, one line per record
  tensorboard/     the same scalars for TensorBoard
  student/         the distilled student as a Hugging Face directory (AutoModel.from_pretrained)
"""

EXIT_CODES = """\
Exit codes:
  0  done, or stopped early with a checkpoint saved (SIGTERM, Ctrl-C, the launcher gone, train.stop_at)
  2  bad config or input (run config, DeepSpeed JSON, shards and manifest, student, resume check,
     arguments)
  3  too many non-finite losses in a row (train.max_bad_steps)
  1  any other failure (the failing rank prints its traceback)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        epilog=EXIT_CODES + "\n" + config_epilog("python launchers/distill.py"),
        formatter_class=HelpFormatter,
    )
    add_config_arguments(parser, "YAML run config (without it, the defaults of every key)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in train.out_dir/checkpoints")
    # Declared here rather than by deepspeed.add_config_arguments, which imports DeepSpeed
    # (seconds) and adds its deprecated --deepscale* flags.
    ds = parser.add_argument_group("DeepSpeed")
    ds.add_argument("--deepspeed_config", metavar="JSON",
                    help="DeepSpeed JSON (ZeRO stage and options), e.g. ds_configs/zero2.json; without it, "
                         "ZeRO stage 0 with the run config's settings")
    ds.add_argument("--deepspeed", action="store_true",
                    help="accepted for scripts written for DeepSpeed's examples; changes nothing")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


def deepspeed_json_problem(path: str | None) -> str | None:
    """What is wrong with the ``--deepspeed_config`` file, in one line; None if it is usable.

    Checked before the slow imports, so that a typo fails at once on every rank alike."""
    import json

    if path is None:
        return None
    if not os.path.isfile(path):
        return f"DeepSpeed config not found: {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError as exc:
        return f"{path}: not valid JSON: {exc}"
    if not isinstance(data, dict):
        return f"{path}: a DeepSpeed config must be a JSON object"
    return None


def quiet_known_noise() -> None:
    """Warnings that say nothing to a user of this command, filtered before they are raised.

    torch.distributed's deprecation FutureWarnings come from inside DeepSpeed's ZeRO code (e.g.
    ``all_gather_into_tensor``): not ours to change, and printed once per rank.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.")


def main(argv: list[str] | None = None) -> int:
    from mmkd_ds.launcher_watch import launchers_at_start

    launchers_at_start()  # before the slow imports: a launcher that dies meanwhile is still noticed
    args, overrides = build_parser().parse_known_args(argv)
    if args.print_config:
        return print_config("distill", args.config, overrides)
    from mmkd_ds.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"distill: {exc}", file=sys.stderr)
        return 2
    problem = deepspeed_json_problem(args.deepspeed_config)
    if problem:
        print(f"distill: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_noise()
    if os.environ.get("RANK", "0") == "0":
        # The imports and the loading below take from seconds to minutes with nothing else printed
        # until the "schedule:" line.
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"distill: {ranks} rank{'s' if ranks > 1 else ''}; loading torch, DeepSpeed, the student "
              f"({cfg.student.name}) and the data", flush=True)
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
