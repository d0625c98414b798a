"""``python -m ia3_dist``: the same command line as the ``ia3-dist`` console script."""

from .cli import entry

entry(prog="python -m ia3_dist")
