#!/usr/bin/env python
"""Entry point for ``deepspeed launch.py``, ``torchrun launch.py``, ``srun python launch.py`` and plain
``python launch.py`` (the embedded CPU demo when no --config is given)."""

import sys

from ia3_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="launch.py"))
