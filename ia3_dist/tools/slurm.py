"""``ia3-dist slurm``: write a filled sbatch file from the templates in ``slurm/`` and say how to submit it."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from ..config import load_config
from ..errors import UsageError

TEMPLATES = {"deepspeed": "single_node.sbatch", "multi": "multi_node.sbatch", "srun": "srun_per_rank.sbatch"}
LAUNCHERS = ("deepspeed", "torchrun", "srun")
DEFAULT_NAME = "ia3-dist"

# Slurm's own --time grammar (minutes, min:sec, h:min:sec, days-h, days-h:min, days-h:min:sec). [0-9], not \d:
# \d also matches non-ASCII digits that Slurm would not parse.
_TIME_RE = re.compile(r"[0-9]{1,9}(?::[0-9]{1,9}){0,2}|[0-9]{1,9}-[0-9]{1,9}(?::[0-9]{1,9}){0,2}")
# Stricter than Slurm on purpose: these values land in `#SBATCH` lines and in %x of log file names, so nothing a
# shell, sbatch's own option parser or a path could read as syntax (no quotes, $, /, spaces, control characters).
_NAME_CHARS = "A-Za-z0-9._+-"
_NAME_RE = re.compile(rf"[A-Za-z0-9_][{_NAME_CHARS}]*")
NAME_MAX = 64
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def template_dir() -> Path:
    """``slurm/`` beside the package in a checkout, or the installed ``ia3_dist.slurm_templates`` data."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "slurm", pkg / "slurm_templates"):
        if (cand / "lib.sh").is_file():
            return cand
    raise FileNotFoundError("slurm templates not found next to ia3_dist")


def _no_control(opt: str, value: str, allow: str = "") -> None:
    bad = [c for c in _CONTROL_RE.findall(value) if c not in allow]
    if bad:
        raise UsageError(f"{opt} {value!r}: contains a control character ({bad[0]!r}); remove it")


def check_time(value: str) -> str:
    """``value`` if it is a Slurm time limit, else a UsageError naming ``--time``."""
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise UsageError(f"--time {value!r}: expected a Slurm time limit such as 90, 90:00, 12:00:00, 2-0, 2-12:00 "
                         f"or 2-12:00:00 (digits only: minutes, minutes:seconds, hours:minutes:seconds, "
                         f"days-hours[:minutes[:seconds]])")
    return value


def check_name(opt: str, value: str, allow_list: bool = False) -> str:
    """``value`` if it is a safe Slurm name (``allow_list``: a comma-separated list of them), else a UsageError."""
    if not isinstance(value, str):
        raise UsageError(f"{opt}: expected a name, got {value!r}")
    _no_control(opt, value)
    parts = value.split(",") if allow_list else [value]
    for part in parts:
        if not (_NAME_RE.fullmatch(part) and len(part) <= NAME_MAX):
            what = "a comma-separated list of names" if allow_list else "a name"
            raise UsageError(f"{opt} {value!r}: expected {what} of 1-{NAME_MAX} characters from "
                             f"[{_NAME_CHARS}], not starting with '.', '+' or '-'")
    return value


def _check_int(opt: str, value: int, minimum: int) -> int:
    # bool is an int subclass: `True` nodes is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{opt} {value!r}: must be an integer >= {minimum}")
    return value


def safe_name(raw: str) -> str:
    """A name for the job and the default file made from a free-form one (the last part of output.dir).

    Runs of anything outside the name characters become one '-' and leading '.', '-', '+' go, so the result is
    never hidden, never a path, never empty (falls back to ``ia3-dist``) and always passes :func:`check_name`.
    """
    name = re.sub(rf"[^{_NAME_CHARS}]+", "-", raw).lstrip(".-+")[:NAME_MAX].rstrip(".-+")
    return name if _NAME_RE.fullmatch(name) else DEFAULT_NAME


def _set_directive(text: str, opt: str, value: str | None) -> str:
    """Replace ``#SBATCH --opt=...`` (or drop it for None); add it after the last directive if absent."""
    if value is not None and ("\n" in value or "\r" in value):
        # The public entry points validate first; this keeps one directive one line whatever the caller.
        raise ValueError(f"#SBATCH --{opt} value must be one line: {value!r}")
    pat = re.compile(rf"^#SBATCH --{re.escape(opt)}=.*$", re.M)
    line = f"#SBATCH --{opt}={value}" if value is not None else ""
    if pat.search(text):
        # A function, not a template string: re.sub would read backslashes and \1 / \g<0> in the value.
        return pat.sub(lambda _m: line, text).replace("\n\n#SBATCH", "\n#SBATCH")
    if value is None:
        return text
    last = list(re.finditer(r"^#SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + "\n" + line + text[last.end():]


def render(config: str, overrides: list[str], nodes: int, gpus_per_node: int, time: str,
           partition: str | None = None, account: str | None = None, launcher: str = "deepspeed",
           cpus_per_node: int = 0, job_name: str | None = None) -> str:
    """The filled sbatch text; every value is checked (UsageError naming the option) before any is used."""
    _check_int("--nodes", nodes, 1)
    _check_int("--gpus-per-node", gpus_per_node, 0)
    _check_int("--cpus-per-node", cpus_per_node, 0)
    if gpus_per_node == 0 and cpus_per_node < 1:
        raise UsageError("give --gpus-per-node G (G >= 1), or --gpus-per-node 0 with --cpus-per-node N for CPU "
                         "nodes")
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    check_time(time)
    if partition is not None:
        check_name("--partition", partition, allow_list=True)
    if account is not None:
        check_name("--account", account)
    if job_name is not None:
        check_name("--job-name", job_name)
    _no_control("--config", str(config))
    # Overrides stay shell-quoted below, so newlines and tabs are inert there, and a prompt template may need
    # them; other control characters (escape sequences, CR) could only disguise the file when someone reads it.
    for ov in overrides:
        _no_control("override", ov, allow="\n\t")
    cfg = load_config(config, overrides)  # fail now, not in the queue
    if launcher == "srun":
        name = TEMPLATES["srun"]
    elif nodes > 1:
        name = TEMPLATES["multi"]
    else:
        name = TEMPLATES["deepspeed"]
    text = (template_dir() / name).read_text()
    per_node = gpus_per_node or cpus_per_node
    text = _set_directive(text, "job-name", job_name or safe_name(Path(cfg.output.dir).name))
    text = _set_directive(text, "nodes", str(nodes))
    text = _set_directive(text, "time", time)
    text = _set_directive(text, "gpus-per-node", str(gpus_per_node) if gpus_per_node else None)
    text = _set_directive(text, "partition", partition)
    text = _set_directive(text, "account", account)
    if launcher == "srun":
        text = _set_directive(text, "ntasks-per-node", str(per_node))
    else:
        text = _set_directive(text, "ntasks-per-node", "1")
        text = _set_directive(text, "cpus-per-task", str(cpus_per_node) if not gpus_per_node else None)
    env = [f"export NPROC_PER_NODE={per_node}"]
    if launcher == "torchrun":
        env.append("export LAUNCHER=torchrun")
    args = " ".join(shlex.quote(a) for a in [str(config), *overrides])
    # Baked-in defaults; arguments given to sbatch after the file name still win.
    defaults = "\n".join([*env, f'[ $# -gt 0 ] || set -- {args}'])
    anchor = "set -uo pipefail\n"
    if anchor not in text:
        raise RuntimeError(f"{template_dir() / name}: no '{anchor.strip()}' line to put the defaults after")
    return text.replace(anchor, f"{anchor}{defaults}\n", 1)


def default_out(output_dir: str) -> Path:
    """``<last part of output.dir>.sbatch`` in the current directory, made safe by :func:`safe_name`."""
    return Path(f"{safe_name(Path(output_dir).name)}.sbatch")


def write_out(out: Path, text: str, force: bool) -> None:
    """Write the job file; an existing non-empty file is kept unless ``force``."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name")
    if not force and out.exists() and out.stat().st_size > 0:
        raise UsageError(f"--out {out}: file exists; give another --out or add --force to overwrite it")
    try:
        out.write_text(text)
        out.chmod(0o755)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write ({e.strerror or e}); give a writable path") from None


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Write a filled sbatch file for a run config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--cpus-per-node", type=int, default=0, help="ranks per node on CPU-only nodes (with "
                    "--gpus-per-node 0)")
    ap.add_argument("--time", default="04:00:00", help="Slurm time limit: minutes, minutes:seconds, "
                    "hours:minutes:seconds, days-hours, days-hours:minutes or days-hours:minutes:seconds")
    ap.add_argument("--partition", help="partition name, or a comma-separated list of them")
    ap.add_argument("--account")
    ap.add_argument("--job-name", help="default: the last part of output.dir")
    ap.add_argument("--launcher", choices=list(LAUNCHERS), default="deepspeed",
                    help="deepspeed (default), torchrun (multi-node, c10d rendezvous) or srun (one task per rank)")
    ap.add_argument("--out", help="file to write (default: <last part of output.dir>.sbatch in the current "
                    "directory)")
    ap.add_argument("--force", action="store_true", help="overwrite the --out file if it exists")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_intermixed_args(argv)
    text = render(a.config, a.overrides, a.nodes, a.gpus_per_node, a.time, a.partition, a.account, a.launcher,
                  a.cpus_per_node, a.job_name)
    if a.out is not None:
        _no_control("--out", a.out)
        if not a.out.strip():
            raise UsageError("--out: empty file name; give a path such as job.sbatch")
    out = Path(a.out) if a.out is not None else default_out(load_config(a.config, a.overrides).output.dir)
    write_out(out, text, a.force)
    print(f"wrote {out}\nsubmit from the repository root:  sbatch {shlex.quote(str(out))}\nwatch:  squeue -u "
          f"$USER; tail -f logs/*.out\nit checkpoints and requeues itself on preemption; resubmitting the same file "
          f"resumes (train.resume=auto)")
    return 0
