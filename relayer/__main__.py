"""``python -m relayer``: the same as the ``relayer`` command."""

import sys

from relayer.cli import main

if __name__ == "__main__":
    sys.exit(main())
