"""Evaluation; same as `mmkd-eval` (see --help): python launchers/evaluate.py --task retrieval --model DIR"""

import sys

from mmkd_ds.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
