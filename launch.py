#!/usr/bin/env python
"""Entry point for ``deepspeed launch.py``, ``torchrun launch.py``, ``srun python launch.py`` and plain
``python launch.py`` (the embedded CPU demo when no --config is given)."""

from ia3_dist.cli import entry

if __name__ == "__main__":
    entry(prog="launch.py")
