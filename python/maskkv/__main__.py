"""``python -m maskkv ...``: the same command line as the ``maskkv`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
