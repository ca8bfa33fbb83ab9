"""Distillation entry point, run by the deepspeed launcher:

    deepspeed --num_gpus 8 launchers/distill.py --config run.yaml \
        --deepspeed_config ds_configs/zero2.json [--resume] [--train.steps=1000 ...]

Parses the arguments, loads the run config, trains, prints a one-line summary. Options,
outputs and exit codes: python launchers/distill.py --help; every config key with its
documentation: python launchers/distill.py --print-config [--config run.yaml].
"""

import sys

from mmkd_ds.cli.distill import main

if __name__ == "__main__":
    sys.exit(main())
