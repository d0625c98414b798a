"""A warm interpreter that forks the ranks of the tests' direct multi-rank runs.

Every rank of every run would otherwise import torch, DeepSpeed, transformers and PEFT anew: about 5 s of CPU per
rank, most of a tiny run's start-up on 2 cores. This process imports them once and forks a child per rank. A child
is a real, separate rank process: its own pid, environment, working dir, stdout/stderr files and gloo process
group; it runs the script (``launch.py``, a probe) as ``__main__`` exactly as ``python script`` would, after the
imports. Nothing computes here before a fork (no thread pool of torch's is started), so the children start clean.

Protocol on stdin/stdout, one JSON object a line:
    request  {"id": N, "argv": [script, *args], "env": {...}, "cwd": dir, "out": file, "err": file}
    replies  {"id": N, "pid": P} at once, then {"id": N, "rc": code} when the child has exited
(``rc`` as ``subprocess`` reports it: negative for a signal). End of stdin: the server exits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

# Replies go to the original stdout; anything the imports below print (DeepSpeed's accelerator line) goes to stderr.
REPLY = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

# What a rank imports before its first step and at its end (model families, the engine, ZeRO, tensorboard, the
# metrics plot): importing it here once is the whole point of the server. DeepSpeed as a rank imports it
# (ia3_dist.runtime.lazy: without MLflow, with the stand-ins for its Muon modules).
WARM = ("torch", "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
        "deepspeed.runtime.zero.stage3", "transformers",
        "transformers.models.bloom.modeling_bloom",
        "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
        "transformers.models.mistral.modeling_mistral", "transformers.models.gpt_neox.modeling_gpt_neox",
        "peft", "safetensors.torch", "datasets", "torch.utils.tensorboard", "torch.utils.cpp_extension",
        "matplotlib.pyplot",
        "ia3_dist.cli", "ia3_dist.train.run", "ia3_dist.train.loop", "ia3_dist.train.prepare",
        "ia3_dist.models.zero3_load", "ia3_dist.train.demo")


def _warm_up() -> None:
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    from ia3_dist.runtime.lazy import import_deepspeed

    import_deepspeed()
    for name in WARM:
        importlib.import_module(name)
    # One figure drawn (fonts found and loaded, text layout cached): rank 0 draws metrics.png at the end of every
    # run, and a process's first figure costs 0.2 s more than the next.
    import io

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, layout="constrained")
    for ax in axes.flat:
        ax.plot([1, 2], [1, 2], label="x")
        ax.set_title("x")
        ax.legend()
        ax.grid(True)
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def _child(req: dict) -> None:
    """Become the rank: the request's environment, cwd and output files, then the script as ``__main__``."""
    import runpy

    code = 1
    try:
        REPLY.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = list(req["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(req["argv"][0]))
        try:
            runpy.run_path(req["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not change the exit code
                pass
        os._exit(code)


def main() -> None:
    _warm_up()
    running: dict[int, int] = {}  # pid -> request id
    buf = b""
    eof = False
    while not eof or running:
        if not eof:
            ready, _, _ = select.select([sys.stdin.buffer], [], [], 0.05)
            if ready:
                chunk = os.read(sys.stdin.fileno(), 65536)
                eof = not chunk
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    pid = os.fork()
                    if pid == 0:
                        _child(req)
                    running[pid] = req["id"]
                    print(json.dumps({"id": req["id"], "pid": pid}), file=REPLY, flush=True)
        else:
            select.select([], [], [], 0.05)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(json.dumps({"id": running.pop(pid), "rc": rc}), file=REPLY, flush=True)


if __name__ == "__main__":
    main()
