"""``python -m dpfa`` is the ``dpfa`` command."""

import sys

from dpfa.cli import main

sys.exit(main())
