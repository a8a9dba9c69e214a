"""``python -m benchmarks``: see :mod:`benchmarks.runner`, or run it with ``--help``."""

import sys

from benchmarks.runner import main

sys.exit(main())
