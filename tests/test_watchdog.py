"""The hang watchdog in a real process: it fires only when armed and idle past its limit, dumps every thread's
stack, removes the job's shared-memory segments, leaves hung.json and exits 76; beats, an unarmed start and a
checkpoint save keep it quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia3_dist.config import load_config
from ia3_dist.errors import EXIT_HUNG, UsageError
from ia3_dist.runtime.watchdog import HUNG_FILE, Watchdog

PRELUDE = """
import sys, time
from pathlib import Path
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.runtime.watchdog import Watchdog
out = Path(sys.argv[1])
wd = Watchdog(0.5, DistEnv(0, 0, 2, 2), out, poll_s=0.02).start()
"""

FIRES = PRELUDE + """
wd.beat(1, arm=False)
time.sleep(0.8)          # unarmed: the first step may take as long as it likes
wd.beat(2)               # armed from here
def stuck_in_python():
    t = time.monotonic()
    while True:
        t += 1
stuck_in_python()
"""

QUIET = PRELUDE + """
wd.beat(1, arm=False)
time.sleep(0.8)
for step in range(2, 10):  # beats every 0.1 s: progress
    wd.beat(step)
    time.sleep(0.1)
with wd.saving(10):       # a save gets the long allowance
    time.sleep(0.8)
for step in range(11, 14):
    wd.beat(step)
    time.sleep(0.1)
wd.stop()
print("done", wd.slowest_s < 0.5, wd.headroom())
"""


def _segment(uid: int, port: str, rank: str) -> Path:
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{rank}")


def test_fires_with_stacks_and_cleans_up_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    port, other = "48123", "48124"
    mine = [_segment(os.getuid(), port, r) for r in ("0", "1")]
    theirs = _segment(os.getuid(), other, "0")
    for f in [*mine, theirs]:
        f.write_bytes(b"x")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        t0 = time.monotonic()
        fires = subprocess.Popen([sys.executable, "-c", FIRES, str(tmp_path / "a")], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        quiet = subprocess.Popen([sys.executable, "-c", QUIET, str(tmp_path / "b")], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = fires.communicate(timeout=60)
        took = time.monotonic() - t0
        assert fires.returncode == EXIT_HUNG, err
        # 0.8 s unarmed + 0.5 s limit + the import; never the unarmed sleep alone.
        assert 1.3 < took < 30, took
        assert "hang watchdog on rank 0: no progress" in err and "in optimizer step 2 (train)" in err
        assert "stuck_in_python" in err and err.count("(most recent call first)") >= 2, err
        assert json.loads((tmp_path / "a" / HUNG_FILE).read_text())["step"] == 2
        assert not any(f.exists() for f in mine) and theirs.exists()
        qout, qerr = quiet.communicate(timeout=60)
        assert quiet.returncode == 0, qerr
        assert qout.split() == ["done", "True", "None"]
        assert not (tmp_path / "b" / HUNG_FILE).exists()
    finally:
        for f in [*mine, theirs]:
            f.unlink(missing_ok=True)


def test_headroom_warns_when_a_step_nears_the_limit() -> None:
    from ia3_dist.runtime.dist import DistEnv

    wd = Watchdog(30.0, DistEnv(0, 0, 1, 1))
    wd.beat(1, arm=False)
    wd.beat(2)
    wd._last -= 12.0  # a 12 s step under a 30 s limit
    wd.beat(3)
    assert wd.headroom() is not None and "train.hang_timeout_s=30" in wd.headroom()
    assert Watchdog(0.0, DistEnv(0, 0, 1, 1)).start()._thread is None  # 0 is off: no thread


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (600, True), (0.5, False), (-1, False),
                                       (float("nan"), False)])
def test_hang_timeout_bounds(tmp_path: Path, value: float, ok: bool) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {path: d}\n")
    if ok:
        assert load_config(f, [f"train.hang_timeout_s={value}"]).train.hang_timeout_s == value
    else:
        with pytest.raises(UsageError, match="train.hang_timeout_s"):
            load_config(f, [f"train.hang_timeout_s={value}"])
