"""The experiments runner (issue 9): the same as ``dpfa run``.

    python experiments/run.py experiments/configs/NAME.toml [--quick] [--device cuda|cpu] [--seeds N]
                              [--out-dir experiments/results]

The work is in dpfa.experiments (see its docstring); this script only forwards the command line.
"""

import sys

from dpfa.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
