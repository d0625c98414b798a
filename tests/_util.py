"""Helpers for tests that run the launcher as real processes."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def launch(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
           script: str = "launch.py", launcher: str = "direct", port: int | None = None, fresh: bool = False,
           base_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the launcher for real: ``python launch.py`` for one process; for more, ``deepspeed`` or ``torchrun``
    when a test is about that launcher, else ``direct``: the ranks started here with the variables torchrun
    sets. The ranks are the same real processes (DeepSpeed engine, gloo); ``direct`` only skips the launcher's
    own two interpreter start-ups (torch and deepspeed imported twice, about 10 s per run on 2 cores). ``port``:
    the rendezvous port (a free one by default), for tests that find a run's resources by it. Direct ranks are
    forked from a warm interpreter (``_ForkServer``) unless ``fresh``: a test about what a new interpreter does
    (import-time output, start-up) asks for one. ``base_env``: the environment ``env`` adds to, instead of this
    process's (a test that keeps the caller's settings of some library out)."""
    e = {**(os.environ if base_env is None else base_env), **(env or {})}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    if nproc == 1 and launcher in ("deepspeed", "direct"):
        cmd = [sys.executable, script, *args]
        if not fresh and _use_forkserver(cmd):
            return _direct(cmd, 1, e, timeout, 0, rank_env=False)
    elif launcher == "direct":
        return _direct([sys.executable, script, *args], nproc, e, timeout, port or free_port(), fork=not fresh)
    elif launcher == "torchrun":
        cmd = [bin_path("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port or free_port()}", script,
               *args]
    else:
        cmd = [bin_path("deepspeed"), f"--num_accelerators={nproc}", f"--master_port={port or free_port()}", script,
               *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


# What deepspeed's launcher gives the other ranks after one fails: SIGTERM, then SIGKILL this much later.
_GRACE_S = 30.0


class _ForkServer:
    """Client of ``tests/_forkserver.py``: one warm interpreter per test session that forks the ranks of direct
    runs (see there for why). ``IA3_TEST_FORKSERVER=0`` starts every rank as a fresh interpreter instead."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.next_id = 0
        self.buf = b""
        self.pids: dict[int, int] = {}
        self.rcs: dict[int, int] = {}

    def _ensure(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_forkserver.py")], cwd=ROOT,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, env={**os.environ})
            self.buf = b""
        return self.proc

    def _pump(self, wait: float) -> None:
        import select

        proc = self._ensure()
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        if not ready:
            return
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError("the test fork server died")
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if "pid" in msg:
                self.pids[msg["id"]] = msg["pid"]
            else:
                self.rcs[msg["id"]] = msg["rc"]

    def start(self, argv: list[str], env: dict, out: str, err: str) -> int:
        proc = self._ensure()
        self.next_id += 1
        rid = self.next_id
        req = {"id": rid, "argv": argv, "env": env, "cwd": str(ROOT), "out": out, "err": err}
        proc.stdin.write((json.dumps(req) + "\n").encode())
        proc.stdin.flush()
        while rid not in self.pids:
            self._pump(1.0)
        return rid

    def pid(self, rid: int) -> int:
        return self.pids[rid]

    def poll(self, rid: int) -> int | None:
        self._pump(0)
        return self.rcs.get(rid)


    def close(self) -> None:
        """End of the session: the server exits once its running children have."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_FORKSERVER = _ForkServer()
atexit.register(_FORKSERVER.close)


def _use_forkserver(cmd: list[str]) -> bool:
    return os.environ.get("IA3_TEST_FORKSERVER", "1") != "0" and cmd[0] == sys.executable


class _ForkedRank:
    """A rank forked by the fork server, with the part of ``subprocess.Popen``'s interface ``_direct`` uses."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.pid = _FORKSERVER.pid(rid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _FORKSERVER.poll(self.rid)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        import time

        while self.poll() is None:
            time.sleep(0.02)
        return self.returncode


class RanksTimedOut(subprocess.TimeoutExpired):
    """``subprocess.TimeoutExpired`` whose message ends with the ranks' output."""

    def __str__(self) -> str:
        out, err = (self.output or "")[-3000:], (self.stderr or "")[-3000:]
        return f"{super().__str__()}\n--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"


class Ranks:
    """``nproc`` ranks of ``cmd`` started on this host, their output interleaved into one stdout and one stderr file
    as under a launcher, with the part of ``subprocess.Popen``'s interface the fault tests use (``poll``,
    ``communicate``, ``returncode``; ``pids``: the rank processes). As deepspeed's launcher does, the first rank to
    fail ends the others (SIGTERM, SIGKILL ``_GRACE_S`` later) and its exit code is the result. The ranks are forked
    by the warm fork server (``_ForkServer``) unless ``fork`` is false or ``IA3_TEST_FORKSERVER=0``."""

    def __init__(self, cmd: list[str], nproc: int, env: dict, port: int, rank_env: bool = True,
                 fork: bool = True) -> None:
        import tempfile

        self.cmd = cmd
        self._tmp = tempfile.TemporaryDirectory()
        self.out_path, self.err_path = Path(self._tmp.name) / "out", Path(self._tmp.name) / "err"
        self.out_path.touch()
        self.err_path.touch()
        self.procs: list[Any] = []
        self.returncode: int | None = None
        self._failed, self._kill_at = 0, None
        forked = fork and _use_forkserver(cmd)
        for r in range(nproc):
            # rank_env=False: one plain `python script` process, which a launcher's variables would not describe.
            e = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)
                 } if rank_env else env
            if forked:
                self.procs.append(_ForkedRank(_FORKSERVER.start(cmd[1:], e, str(self.out_path),
                                                                str(self.err_path))))
            else:
                with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
                    self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=err,
                                                       stdin=subprocess.DEVNULL))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _output(self) -> tuple[str, str]:
        return (self.out_path.read_bytes().decode(errors="replace"),
                self.err_path.read_bytes().decode(errors="replace"))

    def poll(self) -> int | None:
        """None while a rank runs; a failed rank starts ending the others here, so call it often."""
        import signal
        import time

        if self.returncode is not None:
            return self.returncode
        if any(p.poll() is None for p in self.procs):
            bad = next((p.returncode for p in self.procs if p.returncode not in (None, 0)), 0)
            now = time.monotonic()
            if bad and not self._failed:
                self._failed, self._kill_at = bad, now + _GRACE_S
                for p in self.procs:
                    p.send_signal(signal.SIGTERM)
            if self._kill_at is None or now <= self._kill_at:
                return None
        self._end()
        return self.returncode

    def _end(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.returncode = self._failed or next((p.returncode for p in self.procs if p.returncode), 0)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Until every rank has ended; past ``timeout`` every rank is killed and ``RanksTimedOut`` raised (with
        what the ranks wrote, so a hang can be told from the report)."""
        import signal
        import time

        deadline = time.monotonic() + timeout
        try:
            while self.poll() is None:
                if time.monotonic() > deadline:
                    for p in self.procs:
                        p.send_signal(signal.SIGKILL)
                    raise RanksTimedOut(self.cmd, timeout, *self._output())
                time.sleep(0.05)
            return subprocess.CompletedProcess(self.cmd, self.returncode, *self._output())
        finally:
            if self.returncode is None:
                self._end()
            self._tmp.cleanup()

    def communicate(self, timeout: float = 600) -> tuple[str, None]:
        """Like ``Popen.communicate`` with stderr merged into stdout."""
        done = self.wait(timeout)
        return done.stdout + done.stderr, None


def _direct(cmd: list[str], nproc: int, env: dict, timeout: float, port: int, rank_env: bool = True,
            fork: bool = True) -> subprocess.CompletedProcess:
    """``Ranks`` run to their end, as ``subprocess.run`` would a launcher."""
    return Ranks(cmd, nproc, env, port, rank_env=rank_env, fork=fork).wait(timeout)


class _ForkedProcess(_ForkedRank):
    """A forked rank with its own output file (stdout and stderr together), as ``subprocess.Popen`` with
    ``stdout=PIPE, stderr=STDOUT, text=True`` gives one: ``wait(timeout)``, ``communicate(timeout)``."""

    def __init__(self, argv: list[str], env: dict) -> None:
        import tempfile

        fd, self.out_path = tempfile.mkstemp(prefix="ia3-rank-", suffix=".log")
        os.close(fd)
        atexit.register(Path(self.out_path).unlink, missing_ok=True)  # output a test never read
        super().__init__(_FORKSERVER.start(argv, env, self.out_path, self.out_path))
        self.args = argv

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        try:
            return Path(self.out_path).read_bytes().decode(errors="replace"), None
        finally:
            Path(self.out_path).unlink(missing_ok=True)


def spawn_slurm_style(args: list[str], world: int = 2, per_rank: list[list[str]] | None = None,
                      fresh: bool = False) -> list[Any]:
    """Start ``world`` ranks the way a plain ``srun`` task-per-rank does: only SLURM_* variables, no launcher.
    ``per_rank``: further arguments of each rank (as if its node resolved the config otherwise). The ranks are
    forked by the warm fork server (each its own process, environment and output) unless ``fresh`` (or
    ``IA3_TEST_FORKSERVER=0``): new interpreters, ``subprocess.Popen`` with stdout and stderr piped together."""
    port = str(free_port())
    procs: list[Any] = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(world),
                   SLURM_NTASKS_PER_NODE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "launch.py", *args, *(per_rank or [[]] * world)[rank]]
        if not fresh and _use_forkserver(cmd):
            procs.append(_ForkedProcess(cmd[1:], env))
        else:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    return procs


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def random_pairs(n: int, seed: int, max_answer: int, vocab_hi: int) -> Any:
    """``n`` preference pairs of random token ids in [5, vocab_hi) as a TokenizedData of two rows per pair: a 3-token
    prompt, answers of 2 to ``max_answer`` tokens (labelled)."""
    import numpy as np

    from ia3_dist.data.tokens import TokenizedData

    rng = np.random.default_rng(seed)
    ids: list[int] = []
    mask: list[int] = []
    offs = [0]
    for _ in range(2 * n):
        answer = int(rng.integers(2, max_answer + 1))
        ids += rng.integers(5, vocab_hi, 3 + answer).tolist()
        mask += [0] * 3 + [1] * answer
        offs.append(offs[-1] + 3 + answer)
    return TokenizedData(ids=np.array(ids), offsets=np.array(offs), label_mask=np.array(mask, np.uint8),
                         n_records=n, dropped=np.zeros(0, np.int64), truncated=0, group=2)


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def tagged_ranks(tag: str) -> dict[int, int]:
    """``{rank: pid}`` of the rank processes started with ``IA3_TEST_TAG=tag`` in their environment, whatever
    launched them (deepspeed, torchrun, srun): python processes running launch.py or ``-m ia3_dist``, not the
    launchers."""
    import psutil

    found: dict[int, int] = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            cmd = p.cmdline()
        except psutil.Error:
            continue
        # launch.py, or `python -m ia3_dist` (what the sbatch templates run)
        runs_us = any(a.endswith("launch.py") for a in cmd) or any(a == "-m" and b == "ia3_dist"
                                                                   for a, b in zip(cmd, cmd[1:]))
        if env.get("IA3_TEST_TAG") != tag or not runs_us:
            continue
        if any("deepspeed.launcher" in a or "torch.distributed.run" in a or a.endswith("torchrun")
               or a.endswith("deepspeed") for a in cmd):
            continue
        rank = env.get("RANK") or env.get("SLURM_PROCID")
        if rank is not None and cmd[0].split("/")[-1].startswith("python"):
            found[int(rank)] = p.pid
    return found


def alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies count as gone)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def job_segments(port: int) -> list[str]:
    """DeepSpeed shared-memory segments of the job on ``port`` still in /dev/shm."""
    return sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


class Measured(NamedTuple):
    rc: int
    out: str
    err: str
    seconds: float
    peak_rss_mib: float


_TRAMPOLINE = r"""
import os, resource, signal, sys
limit, rss_file, *cmd = sys.argv[1:]
if int(limit):
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
pid = os.fork()
if pid == 0:
    os.execv(cmd[0], cmd)
_, status, usage = os.wait4(pid, 0)
with open(rss_file, "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
if code < 0:  # ended by a signal: end so too, as the measured process did
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def measured_cli(args: list[str], timeout: float, stdin: str = "", env: dict | None = None,
                 address_space: int | None = 4 << 30) -> Measured:
    """``python -m ia3_dist ARGS`` as its own process, fed ``stdin``, for what hangs or blows up a real CLI: exit
    code, output, seconds and the peak RSS of that process alone. Started from a small trampoline process, which
    reaps it with ``wait4`` and reports its rusage: a process forked from this one (a test worker that may have
    grown past a GiB on models) starts with this process's resident pages, and Linux carries that high-water mark
    into its ``ru_maxrss`` across the exec; forked from the trampoline, it starts at a few MB. ``address_space``
    (RLIMIT_AS) keeps a regression from swapping the box; past ``timeout`` the process group is killed and the
    test fails (a hang)."""
    import signal
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        fin, fout, ferr, frss = (Path(tmp) / n for n in ("in", "out", "err", "rss"))
        fin.write_text(stdin, encoding="utf-8")
        t0 = time.monotonic()
        with fin.open("rb") as i, fout.open("wb") as o, ferr.open("wb") as e:
            p = subprocess.Popen([sys.executable, "-S", "-c", _TRAMPOLINE, str(address_space or 0), str(frss),
                                  sys.executable, "-m", "ia3_dist", *args], cwd=ROOT, stdin=i, stdout=o, stderr=e,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise AssertionError(f"ia3-dist {' '.join(args)[:200]} still running after {timeout} s (a hang)") \
                    from None
        rss_kib = int(frss.read_text() or 0) if frss.exists() else 0
        return Measured(p.returncode, fout.read_text(errors="replace"), ferr.read_text(errors="replace"),
                        time.monotonic() - t0, rss_kib / 1024)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """An in-process hang (a blocking read, a runaway loop) becomes a test failure instead of a stuck session."""
    import signal

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_REGISTRY: dict[str, Any] = {}


@contextlib.contextmanager
def lm_eval_registry_indexed_once() -> Iterator[None]:
    """lm-eval's built-in task registry (some 15,000 YAML files, ~8 s of a core) indexed once per test process, not
    at every TaskManager: the refusal tests build several. ``TaskIndex.build`` indexes each path on its own and
    merges them in order (later paths override), so the built-in tasks' index, copied, and the other paths' built
    on top of it are the dict a fresh build returns; nothing changes the entries afterwards (lm-eval deep-copies a
    task's cfg to build it). An lm-eval without that method is left as it is (every index built afresh)."""
    try:
        from lm_eval.tasks import _index
    except ImportError:
        yield
        return
    build = getattr(_index.TaskIndex, "build", None)
    if build is None:
        yield
        return
    defaults = Path(_index.__file__).parent

    def cached(paths: Any, **kw: Any) -> dict:
        paths = [Path(p) for p in paths]
        if not paths or paths[0] != defaults or kw:
            return build(paths, **kw)
        if "defaults" not in _REGISTRY:
            _REGISTRY["defaults"] = build([defaults])
        index = dict(_REGISTRY["defaults"])
        index.update(build(paths[1:]))
        return index

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_index.TaskIndex, "build", staticmethod(cached))
        yield
