"""``python -m ia3_dist``: the same command line as the ``ia3-dist`` console script."""

import sys

from .cli import main

sys.exit(main(prog="python -m ia3_dist"))
