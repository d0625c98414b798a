"""Run the launcher's real training path, recording every ``os.fsync``, ``os.rename`` and ``os.replace`` of the
process in order (one JSON line each: the op and the absolute paths), to check that what a save publishes by a
rename was flushed to stable storage first.

Run as ``python tests/probe_durable.py --config X [overrides]`` (or a launcher); rank R appends its events to
``$IA3_TEST_EVENTS.R``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.cli import _train_parser  # noqa: E402
from ia3_dist.config import load_config  # noqa: E402
from ia3_dist.runtime import dist  # noqa: E402
from ia3_dist.train.run import run  # noqa: E402


def record(log: str) -> None:
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def emit(*event: str) -> None:
        with open(log, "a") as fh:
            fh.write(json.dumps(event) + "\n")

    def rec_fsync(fd: int) -> None:
        fsync(fd)  # first: a flush that fails is not recorded as done
        emit("fsync", os.readlink(f"/proc/self/fd/{fd}"))

    def rec_rename(src: str | os.PathLike, dst: str | os.PathLike, **kw: object) -> None:
        rename(src, dst, **kw)
        emit("rename", os.path.abspath(src), os.path.abspath(dst))

    def rec_replace(src: str | os.PathLike, dst: str | os.PathLike, **kw: object) -> None:
        replace(src, dst, **kw)
        emit("rename", os.path.abspath(src), os.path.abspath(dst))

    os.fsync, os.rename, os.replace = rec_fsync, rec_rename, rec_replace


if __name__ == "__main__":
    args = _train_parser("probe_durable.py").parse_args()
    record(f"{os.environ['IA3_TEST_EVENTS']}.{dist.detect().rank}")
    run(load_config(args.config, args.overrides))
