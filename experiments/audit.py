"""The membership-inference audit of DP-SGD (issue 7): the same as ``dpfa audit``.

    python experiments/audit.py [--config experiments/configs/audit.toml] [--quick] [--num-shadow-models N]
                                [--epsilons inf,8,3,1] [--jobs N] [--out-dir experiments/results] [--json]

The work is in dpfa.attacks.runner (see its docstring); this script only forwards the
command line. It must keep the ``__main__`` guard: the training processes are spawned,
and each re-imports the main module.
"""

import sys

from dpfa.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
