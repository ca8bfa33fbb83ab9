"""Teacher precompute; same as `mmkd-precompute`. Runs under python, torchrun or deepspeed:

    python launchers/precompute.py --config configs/demo.yaml
    deepspeed --num_gpus 8 launchers/precompute.py --config run.yaml

Options, outputs and exit codes: python launchers/precompute.py --help.
"""

import sys

from mmkd_ds.cli.precompute import main

if __name__ == "__main__":
    sys.exit(main())
