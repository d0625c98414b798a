"""``ia3-dist slurm``: write a filled sbatch file from the templates in ``slurm/`` and say how to submit it."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import load_config
from ..config.schema import brief, has_heldout, show, why_no_heldout
from ..errors import UsageError
from ..runtime.safe_io import write_file

TEMPLATES = {"deepspeed": "single_node.sbatch", "multi": "multi_node.sbatch", "srun": "srun_per_rank.sbatch"}
EVAL_TEMPLATE = "eval.sbatch"
LAUNCHERS = ("deepspeed", "torchrun", "srun")
DEFAULT_NAME = "ia3-dist"
# The two lines of each template that only work from a checkout; a written file gets the helpers inlined instead.
PRELUDE = 'cd "${IA3_DIST_HOME:-$SLURM_SUBMIT_DIR}" || exit 2\nsource slurm/lib.sh\n'

# Slurm's own --time grammar (minutes, min:sec, h:min:sec, days-h, days-h:min, days-h:min:sec). [0-9], not \d:
# \d also matches non-ASCII digits that Slurm would not parse.
_TIME_RE = re.compile(r"[0-9]{1,9}(?::[0-9]{1,9}){0,2}|[0-9]{1,9}-[0-9]{1,9}(?::[0-9]{1,9}){0,2}")
# Stricter than Slurm on purpose: these values land in `#SBATCH` lines and in %x of log file names, so nothing a
# shell, sbatch's own option parser or a path could read as syntax (no quotes, $, /, spaces, control characters).
_NAME_CHARS = "A-Za-z0-9._+-"
_NAME_RE = re.compile(rf"[A-Za-z0-9_][{_NAME_CHARS}]*")
NAME_MAX = 64
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Cost bounds on what lands in #SBATCH lines: beyond any real cluster, so a typo or a hostile script cannot request
# a trillion nodes. Slurm itself has no such limits by default.
MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 256
MAX_CPUS_PER_NODE = 4096
# lm-eval task and group names (e.g. ceval-valid_computer_network, tiny_mc): they go into the eval job's command
# line shell-quoted anyway; the class keeps a typo (a space, a stray quote) from reaching the queue.
_TASK_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+:-]{0,199}")
# What `ia3-dist eval --checkpoints` takes: a selection, or a comma list of checkpoint names.
_CHECKPOINT_WORDS = ("all", "latest", "best")
_CHECKPOINT_LIST_RE = re.compile(r"(?:step[0-9]{1,18}|final)(?:,(?:step[0-9]{1,18}|final))*")


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
        raise UsageError(f"{opt} {show(value)}: contains a control character ({bad[0]!r}); remove it")


def int_option(opt: str, lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer option in [lo, hi]. It raises UsageError itself (argparse passes that
    through): one line, exit 2, the value quoted shortened, where argparse's own error would print usage and quote
    all of a 10,000-character value."""
    def parse(text: str) -> int:
        t = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", t) or not lo <= int(t) <= hi:
            raise UsageError(f"{opt} {show(text)}: expected an integer from {lo} to {hi}")
        return int(t)

    parse.__name__ = "int"
    return parse


def nodes_option(text: str) -> tuple[int, int]:
    """``--nodes N`` or ``--nodes MIN-MAX`` (Slurm's node range: the job starts on as many as it can get, at least
    MIN): ``(min, max)``, each from 1 to :data:`MAX_NODES`, as a UsageError otherwise."""
    t = text.strip()
    m = re.fullmatch(r"([0-9]{1,18})(?:-([0-9]{1,18}))?", t)
    if not m:
        raise UsageError(f"--nodes {show(text)}: expected a node count N or a range MIN-MAX (e.g. 2 or 1-4)")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= MAX_NODES:
        raise UsageError(f"--nodes {show(text)}: expected counts from 1 to {MAX_NODES}, the first at most the second")
    return lo, hi


nodes_option.__name__ = "nodes"


def check_time(value: str, opt: str = "--time") -> str:
    """``value`` if it is a Slurm time limit, else a UsageError naming ``opt``."""
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise UsageError(f"{opt} {show(value)}: expected a Slurm time limit such as 90, 90:00, 12:00:00, 2-0, 2-12:00 "
                         f"or 2-12:00:00 (digits only: minutes, minutes:seconds, hours:minutes:seconds, "
                         f"days-hours[:minutes[:seconds]])")
    return value


SIGNAL_LEAD_S = 300
"""How long before the time limit Slurm warns the batch shell (``--signal=B:USR1@...``): the run checkpoints and
requeues. Shorter limits get a quarter of theirs."""
MIN_TIME_S = 120


def signal_lead(time: str) -> int:
    """Seconds before ``time`` the warning comes. A fixed 300 s on a limit of 5 minutes or less arrived as the job
    started, before rank 0 ran: the job requeued for ever without training a step."""
    limit = time_seconds(time)
    return SIGNAL_LEAD_S if limit >= 4 * SIGNAL_LEAD_S else max(30, int(limit // 4))


def time_seconds(value: str, opt: str = "--time") -> float:
    """A Slurm time limit in seconds (checked, naming ``opt``); ``inf`` for zero, which Slurm reads as no limit."""
    check_time(value, opt)
    if "-" in value:  # days-hours[:minutes[:seconds]]
        days, rest = value.split("-", 1)
        h, m, s = ([int(x) for x in rest.split(":")] + [0, 0])[:3]
        secs = int(days) * 86400 + h * 3600 + m * 60 + s
    else:  # minutes, minutes:seconds or hours:minutes:seconds
        parts = [int(x) for x in value.split(":")]
        h, m, s = parts if len(parts) == 3 else [0, *(parts + [0])[:2]]
        secs = h * 3600 + m * 60 + s
    return math.inf if secs == 0 else float(secs)


def check_name(opt: str, value: str, allow_list: bool = False) -> str:
    """``value`` if it is a safe Slurm name (``allow_list``: a comma-separated list of them), else a UsageError."""
    if not isinstance(value, str):
        raise UsageError(f"{opt}: expected a name, got {show(value)}")
    _no_control(opt, value)
    parts = value.split(",") if allow_list else [value]
    for part in parts:
        if not (_NAME_RE.fullmatch(part) and len(part) <= NAME_MAX):
            what = "a comma-separated list of names" if allow_list else "a name"
            raise UsageError(f"{opt} {show(value)}: expected {what} of 1-{NAME_MAX} characters from "
                             f"[{_NAME_CHARS}], not starting with '.', '+' or '-'")
    return value


def _check_int(opt: str, value: int, minimum: int, maximum: int) -> int:
    # bool is an int subclass: `True` nodes is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise UsageError(f"{opt} {show(value)}: must be an integer from {minimum} to {maximum}")
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
        raise ValueError(f"#SBATCH --{opt} value must be one line: {show(value)}")
    pat = re.compile(rf"^#SBATCH --{re.escape(opt)}=.*$", re.M)
    line = f"#SBATCH --{opt}={value}" if value is not None else ""
    if pat.search(text):
        # A function, not a template string: re.sub would read backslashes and \1 / \g<0> in the value.
        return pat.sub(lambda _m: line, text).replace("\n\n#SBATCH", "\n#SBATCH")
    if value is None:
        return text
    last = list(re.finditer(r"^#SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + "\n" + line + text[last.end():]


def _set_flag(text: str, opt: str) -> str:
    """Add ``#SBATCH --opt`` (a directive without a value) after the last directive, once."""
    if re.search(rf"^#SBATCH --{re.escape(opt)}$", text, re.M):
        return text
    last = list(re.finditer(r"^#SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + f"\n#SBATCH --{opt}" + text[last.end():]


@dataclass(frozen=True)
class Job:
    """The checked Slurm shape of one job (or of each task of a job array)."""

    nodes: int
    """The most nodes the job runs on (the only count without a range)."""
    gpus_per_node: int
    cpus_per_node: int
    time: str
    partition: str | None
    account: str | None
    launcher: str
    job_name: str | None
    python: str
    min_nodes: int = 0
    """With a node range (``--nodes MIN-MAX``) the fewest nodes the job accepts; 0: exactly ``nodes``."""
    mem: str | None = None
    """Host memory per node (Slurm's ``--mem``, checked by :func:`check_mem`); None: the cluster's default."""

    @property
    def node_counts(self) -> range:
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def nodes_directive(self) -> str:
        return f"{self.min_nodes}-{self.nodes}" if self.min_nodes and self.min_nodes < self.nodes else str(self.nodes)

    @property
    def per_node(self) -> int:
        return self.gpus_per_node or self.cpus_per_node

    def describe(self) -> str:
        ranks = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else f"{self.cpus_per_node} CPU rank(s)"
        return (f"{self.nodes_directive} node(s) x {ranks}, {self.launcher} launcher, time limit {self.time}"
                + ("" if self.mem is None else ", all of each node's memory" if self.mem == "0"
                   else f", {self.mem} memory per node"))


_MEM_RE = re.compile(r"(0|[1-9][0-9]{0,9})([KMGT]?)")


def check_mem(value: str) -> str:
    """``--mem``: a whole size with an optional unit (Slurm's default unit is MB), or 0 for all of a node's memory;
    returned as Slurm reads it."""
    m = _MEM_RE.fullmatch(value.upper()) if isinstance(value, str) else None
    if m is None:
        raise UsageError(f"--mem {show(value)}: expected a whole size per node with an optional unit K, M, G or T "
                         f"(Slurm's --mem: 64G, 500000M; a bare number is MB), or 0 for all of a node's memory")
    if m.group(1) == "0":
        return "0"  # any unit: Slurm reads a zero as all of a node's memory
    if m.group(2) in ("", "K") and int(m.group(1)) < (1 if m.group(2) == "" else 1024):
        raise UsageError(f"--mem {show(value)}: less than 1 MB per node; give the size with its unit, e.g. 64G")
    return m.group(0)


def check_job(nodes: int | tuple[int, int], gpus_per_node: int, time: str, partition: str | None = None,
              account: str | None = None, launcher: str = "deepspeed", cpus_per_node: int = 0,
              job_name: str | None = None, python: str | None = None, mem: str | None = None) -> Job:
    """Every Slurm value checked (UsageError naming the option) before any is used. ``nodes``: a count, or a
    ``(min, max)`` range."""
    lo, nodes = nodes if isinstance(nodes, tuple) else (0, nodes)
    _check_int("--nodes", nodes, 1, MAX_NODES)
    if lo:
        _check_int("--nodes (the range's first count)", lo, 1, nodes)
    _check_int("--gpus-per-node", gpus_per_node, 0, MAX_GPUS_PER_NODE)
    _check_int("--cpus-per-node", cpus_per_node, 0, MAX_CPUS_PER_NODE)
    if gpus_per_node == 0 and cpus_per_node < 1:
        raise UsageError("give --gpus-per-node G (G >= 1), or --gpus-per-node 0 with --cpus-per-node N for CPU "
                         "nodes")
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {show(launcher)}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "srun" and lo and lo < nodes:
        raise UsageError(f"--nodes {lo}-{nodes}: a node range needs --launcher deepspeed or torchrun (one launcher "
                         f"per node starts that node's ranks); srun starts a fixed number of rank tasks, which Slurm "
                         f"would pack onto fewer nodes")
    if time_seconds(time) < MIN_TIME_S:
        raise UsageError(f"--time {show(time)}: shorter than {MIN_TIME_S // 60} minutes, too short to load the model, "
                         f"train a step and checkpoint before the limit (a job requeued at its limit starts over "
                         f"with the same one)")
    if partition is not None:
        check_name("--partition", partition, allow_list=True)
    if account is not None:
        check_name("--account", account)
    if job_name is not None:
        check_name("--job-name", job_name)
    if python is None:
        python = default_python()
    if not python.strip():
        raise UsageError("--python: empty; give the path of the environment's python, e.g. /venv/bin/python")
    _no_control("--python", python)
    return Job(nodes, gpus_per_node, cpus_per_node, time, partition, account, launcher, job_name, python,
               lo if lo < nodes else 0, None if mem is None else check_mem(mem))


def default_python() -> str:
    """This interpreter's path as invoked, not resolved: a venv's bin/python is a symlink to the base interpreter,
    and only the link's own path makes Python find the venv's packages."""
    exe = sys.executable or shutil.which("python3") or "python3"
    return os.path.abspath(exe) if os.sep in exe else exe


def check_run_args(config: str, overrides: list[str]) -> None:
    _no_control("--config", str(config))
    # Overrides stay shell-quoted below, so newlines and tabs are inert there, and a prompt template may need
    # them; other control characters (escape sequences, CR) could only disguise the file when someone reads it.
    for ov in overrides:
        _no_control("override", ov, allow="\n\t")


def template_name(job: Job) -> str:
    if job.launcher == "srun":
        return TEMPLATES["srun"]
    # torchrun has its own template only in the multi-node form, which is as good on one node; single_node.sbatch
    # starts the deepspeed launcher whatever LAUNCHER says.
    return TEMPLATES["multi"] if job.nodes > 1 or job.launcher == "torchrun" else TEMPLATES["deepspeed"]


def _inline_helpers(job: Job) -> str:
    """What replaces the checkout-only lines (cd to the repo, source slurm/lib.sh) in a written file: the recorded
    Python, a check that it can import ia3_dist, and lib.sh itself."""
    lib = (template_dir() / "lib.sh").read_text().splitlines()
    while lib and lib[0].startswith("#"):  # lib.sh's own header speaks of being sourced from a checkout
        lib.pop(0)
    body = "\n".join(lib).strip("\n")
    return f"""# The Python of the environment that wrote this file; IA3_DIST_PYTHON=/path/to/bin/python at submit time
# picks another. Jobs start in the submit directory (or sbatch --chdir): relative paths in the config and in the
# overrides (output.dir, data.path) are read from there.
PYTHON={shlex.quote(job.python)}
[ -z "${{IA3_DIST_PYTHON:-}}" ] || PYTHON=$IA3_DIST_PYTHON
case $PYTHON in */*) export PATH="${{PYTHON%/*}}:$PATH" ;; esac
if ! IA3_DIST_FROM=$("$PYTHON" -c 'import ia3_dist; print(ia3_dist.__file__)' 2>&1); then
  echo "ia3-dist: $PYTHON cannot import ia3_dist (${{IA3_DIST_FROM##*$'\\n'}}); set IA3_DIST_PYTHON to the python of" \\
       "the environment where ia3-dist is installed" >&2
  exit 2
fi
# ---- slurm/lib.sh of ia3-dist {__version__}, inlined so that this file needs no checkout ----
{body}
# ---- end of lib.sh ----
ia3_log "python $PYTHON, ia3_dist from ${{IA3_DIST_FROM%/__init__.py}}"
"""


def _job_log(text: str) -> str:
    """The batch log's name as the job's ``--output`` directive makes it (``%x-%j.out``: job name, job id)."""
    name = re.search(r"^#SBATCH --job-name=(.+)$", text, re.M)
    pattern = re.search(r"^#SBATCH --output=(.+)$", text, re.M)
    out = pattern.group(1).strip() if pattern else "slurm-%j.out"
    return out.replace("%x", name.group(1).strip() if name else "<job name>").replace("%j", "<jobid>")


def assemble(job: Job, name: str, header: list[str], defaults: str, directives: dict[str, str | None] | None = None,
             template: str | None = None) -> str:
    """The self-contained sbatch text: the template for ``job`` (or ``template``) with its directives set (a None
    value drops one), ``header`` (comment lines without '# ') in place of the template's, the helpers inlined and
    ``defaults`` (shell lines that set the arguments) after ``set -uo pipefail``."""
    tname = template or template_name(job)
    text = (template_dir() / tname).read_text()
    text = _set_directive(text, "job-name", name)
    text = _set_directive(text, "nodes", job.nodes_directive)
    text = _set_directive(text, "time", job.time)
    if re.search(r"^#SBATCH --signal=", text, re.M):
        text = _set_directive(text, "signal", f"B:USR1@{signal_lead(job.time)}")
    text = _set_directive(text, "gpus-per-node", str(job.gpus_per_node) if job.gpus_per_node else None)
    text = _set_directive(text, "partition", job.partition)
    text = _set_directive(text, "account", job.account)
    # Per node whatever the launcher: the launcher's ranks share it.
    text = _set_directive(text, "mem", job.mem)
    ranged = bool(job.min_nodes)
    # GPU nodes with --cpus-per-node: the node's CPUs for its ranks (dropped before: Slurm's default of one CPU per
    # task then ran a launcher and all its GPU ranks on one core unless the cluster sets DefCpuPerGPU).
    if job.launcher == "srun":
        text = _set_directive(text, "ntasks-per-node", str(job.per_node))
        per_rank = job.cpus_per_node // job.gpus_per_node if job.gpus_per_node else 0
        text = _set_directive(text, "cpus-per-task", str(per_rank) if per_rank else None)
    else:
        text = _set_directive(text, "ntasks-per-node", "1" if not ranged else None)
        text = _set_directive(text, "ntasks", str(job.nodes) if ranged else None)
        text = _set_directive(text, "cpus-per-task", str(job.cpus_per_node) if job.cpus_per_node else None)
    if ranged:
        # Slurm gives a range the fewest nodes its tasks fit on: as many tasks as the range's most nodes, spread,
        # take every free node up to it, and fit on fewer when fewer are left (the template starts one launcher
        # per node it got).
        text = _set_flag(text, "spread-job")
    for opt, value in (directives or {}).items():
        text = _set_directive(text, opt, value)
    lines = text.splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH "))
    for h in header:
        if "\n" in h or "\r" in h:
            raise ValueError(f"header line must be one line: {show(h)}")
    text = lines[0] + "".join(f"# {h}\n" if h else "#\n" for h in header) + "".join(lines[first:])
    if PRELUDE not in text:
        raise RuntimeError(f"{template_dir() / tname}: no checkout prelude ({PRELUDE.strip()!r}) to inline")
    text = text.replace(PRELUDE, _inline_helpers(job), 1)
    env = [f"export NPROC_PER_NODE={job.per_node}"]
    if "${LAUNCHER:-" in text:
        # Pinned either way: sbatch hands the job the submitting shell's environment, and a LAUNCHER left exported
        # there (the checkout templates read it) would switch the launcher the file's header names.
        env.append(f"export LAUNCHER={job.launcher}")
    anchor = "set -uo pipefail\n"
    if anchor not in text:
        raise RuntimeError(f"{template_dir() / tname}: no '{anchor.strip()}' line to put the defaults after")
    return text.replace(anchor, anchor + "\n".join([*env, defaults]) + "\n", 1)


def cpus_note(job: Job) -> None:
    """A note on stderr for a GPU job without --cpus-per-node: it gets the cluster's default CPUs, one per task
    unless the cluster sets DefCpuPerGPU, so the launcher and all of a node's GPU ranks may share one core, and
    every step's host side (the Python of the step, the data, the collectives' launches) waits on it."""
    if job.gpus_per_node and not job.cpus_per_node:
        who = ("one per GPU rank, each rank's Python, data and launches on one core" if job.launcher == "srun" else
               f"which the launcher and the node's {job.gpus_per_node} GPU rank(s) would share")
        print(f"note: no --cpus-per-node: the job gets the cluster's default CPUs (one per task unless it sets "
              f"DefCpuPerGPU), {who}; give --cpus-per-node (a few per GPU, e.g. {4 * job.gpus_per_node})",
              file=sys.stderr)


def range_note(job: Job) -> None:
    """A note on stderr where a node range meets --cpus-per-node: Slurm counts the CPUs per launcher task, and on
    fewer nodes than the range's most a node holds several of its tasks (``--ntasks=MAX --spread-job``)."""
    if not (job.min_nodes and job.cpus_per_node and job.launcher != "srun"):
        return
    k = -(-job.nodes // job.min_nodes)
    print(f"note: --nodes {job.nodes_directive} --cpus-per-node {job.cpus_per_node}: Slurm asks "
          f"{job.cpus_per_node} CPUs per launcher task, and on {job.min_nodes} node(s) one node holds up to {k} of "
          f"the {job.nodes} tasks ({k * job.cpus_per_node} CPUs); nodes with fewer CPUs than that cannot start (or "
          f"restart) the job on fewer nodes: give --cpus-per-node at most a node's CPUs / {k}", file=sys.stderr)


def check_job_config(job: Job, cfg: Any) -> None:
    """What would otherwise fail in the job after its wait in the queue: the DeepSpeed config (a misspelt shipped
    name, a file that is not one), and the global batch over the job's ranks (:func:`check_node_range`)."""
    from ..runtime import ds_config as dsc

    if cfg.deepspeed.config != "auto":
        dsc.read(dsc.locate(cfg.deepspeed.config))
    check_node_range(job, cfg)


def check_node_range(job: Job, cfg: Any) -> None:
    """``train.global_batch_size`` must divide on the job's ranks (else the job exits 2 after its wait in the
    queue). A job with a node range may start (and, requeued, restart) on any count in it: the run must keep its
    global batch on each, so there it is required and must divide on every allocation."""
    from ..config.schema import MAX_GRAD_ACCUM

    t = cfg.train
    g = t.global_batch_size
    if not job.min_nodes and not g:
        return
    if not g:
        at_most = t.micro_batch_size * t.grad_accum * job.nodes * job.per_node if isinstance(t.micro_batch_size, int) \
            else t.grad_accum * job.nodes * job.per_node
        raise UsageError(f"--nodes {job.nodes_directive}: the job may start or resume on any of these node counts, and "
                         f"a resume on another number of ranks must keep the global batch; set "
                         f"train.global_batch_size (e.g. train.global_batch_size={at_most}, this config's global batch "
                         f"on {job.nodes} nodes), so that train.grad_accum follows the ranks")
    per = t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1
    bad = [n for n in job.node_counts if g % (per * n * job.per_node)]
    fix = "choose a global batch that every count in the range divides, or a narrower range" if job.min_nodes \
        else f"choose a multiple of {per * job.nodes * job.per_node}"
    if bad:
        raise UsageError(f"--nodes {job.nodes_directive}: train.global_batch_size={g} does not divide over "
                         f"{', '.join(f'{n} node(s) x {job.per_node} rank(s)' for n in bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''} at micro-batch {per}; {fix}")
    fewest = job.node_counts[0]
    if g // (per * fewest * job.per_node) > MAX_GRAD_ACCUM:
        raise UsageError(f"--nodes {job.nodes_directive}: train.global_batch_size={g} over {fewest} node(s) x "
                         f"{job.per_node} rank(s) at micro-batch {per} makes an accumulation of "
                         f"{g // (per * fewest * job.per_node)} per step, more than {MAX_GRAD_ACCUM}; use a larger "
                         f"micro-batch, more ranks or a smaller global batch")


def render(config: str, overrides: list[str], nodes: int | tuple[int, int], gpus_per_node: int, time: str,
           partition: str | None = None, account: str | None = None, launcher: str = "deepspeed",
           cpus_per_node: int = 0, job_name: str | None = None, python: str | None = None,
           mem: str | None = None) -> str:
    """The filled, self-contained sbatch text; every value is checked (UsageError naming the option) before any is
    used."""
    job = check_job(nodes, gpus_per_node, time, partition, account, launcher, cpus_per_node, job_name, python, mem)
    check_run_args(config, overrides)
    cfg = load_config(config, overrides)  # fail now, not in the queue
    check_job_config(job, cfg)
    # Absolute, so the file can be submitted from any folder; output.dir keeps its meaning (the submit folder's).
    cfg_path = os.path.abspath(config)
    args = " ".join(shlex.quote(a) for a in [cfg_path, *overrides])
    # Baked-in defaults; arguments given to sbatch after the file name still win.
    header = [f"Written by `ia3-dist slurm` (ia3-dist {__version__}): {job.describe()}.",
              f"Trains {shlex.quote(cfg_path)}" + (f" with {len(overrides)} override(s)" if overrides else "")
              + "; output.dir as the job sees it from its start folder.",
              "Submit (from the folder that relative paths in the config refer to):  sbatch THIS_FILE",
              "Arguments after the file name replace the baked-in ones: sbatch THIS_FILE CONFIG.yaml [k.sub=value ...]",
              "Self-contained: the helpers are inlined and training runs as `$PYTHON -m ia3_dist`, no checkout needed.",
              f"Preemption-safe: USR1 {signal_lead(job.time)} s before the time limit -> checkpoint at the next step "
              "-> requeue -> resume",
              "(train.resume=auto); resubmitting this file resumes too."]
    return assemble(job, job.job_name or safe_name(Path(cfg.output.dir).name), header,
                    f'[ $# -gt 0 ] || set -- {args}')


# --- the evaluation job (`ia3-dist slurm --eval`) ---------------------------------------------------------------


@dataclass(frozen=True)
class EvalJob:
    """The checked evaluation job: its Slurm shape and the ``ia3-dist eval`` options it runs."""

    job: Job
    args: tuple[str, ...]
    """``ia3-dist eval`` options after the run dir: --checkpoints, and --tasks / --include when given."""

    def describe(self) -> str:
        what = f"{self.job.gpus_per_node} GPU(s)" if self.job.gpus_per_node else (
            f"{self.job.cpus_per_node} CPU(s)" if self.job.cpus_per_node else "no GPU")
        return f"1 node x {what}, time limit {self.job.time}"


def eval_name(train_name: str) -> str:
    """The evaluation job's name: the training job's with ``-eval``, within :data:`NAME_MAX`."""
    return safe_name(train_name[: NAME_MAX - len("-eval")]) + "-eval"


def _known_tasks(tasks: list[str], include: str | None) -> None:
    """Every task one that ``ia3-dist eval`` would run (lm-eval's registry or the local task files), checked with
    the same function where lm-eval is installed here: a wrong name would fail only once the training is done.
    (Names that are all local cost milliseconds; the registry is indexed only for the others, in seconds.)"""
    from ..train.benchmarks import check_tasks

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("ia3-dist slurm: note: lm-eval is not installed here, so the --eval-tasks names are not checked; the "
              "evaluation job needs it (pip install 'ia3-dist[eval]')", file=sys.stderr, flush=True)
        return
    check_tasks(tasks, Path(include).expanduser() if include else None, ("--eval-tasks", "--eval-include"))


def check_eval(train: Job, cfg: Any, tasks: str | None, include: str | None, checkpoints: str | None,
               gpus: int | None, time: str | None) -> EvalJob:
    """Every ``--eval-*`` value checked (a UsageError naming the option) against the training job ``train`` and
    its config ``cfg``: one node, never more GPUs per node or a longer time limit than training, and something to
    evaluate (lm-eval tasks, or the run's held-out loss)."""
    task_list: list[str] = []
    if tasks is not None:
        _no_control("--eval-tasks", tasks)
        task_list = tasks.split(",")
        if not all(_TASK_RE.fullmatch(x) for x in task_list):
            raise UsageError(f"--eval-tasks {show(tasks)}: expected a comma-separated list of lm-eval task names "
                             f"(letters, digits and ._+:-, no spaces), e.g. tiny_mc,ceval-valid_computer_network")
    if not task_list and not has_heldout(cfg):
        fix = "name tasks" if cfg.train.objective != "sft" else "name tasks or give the run held-out data"
        raise UsageError(f"--eval-tasks: this run has no held-out loss to evaluate ({why_no_heldout(cfg)}), so "
                         f"without lm-eval tasks the evaluation job would have nothing to evaluate; {fix}")
    args = ["--checkpoints", checkpoints or "all"]
    if checkpoints is not None:
        _no_control("--eval-checkpoints", checkpoints)
        if checkpoints not in _CHECKPOINT_WORDS and not _CHECKPOINT_LIST_RE.fullmatch(checkpoints):
            raise UsageError(f"--eval-checkpoints {show(checkpoints)}: expected all, latest, best or a comma list "
                             f"of checkpoint names such as step500,final")
        if checkpoints == "best" and not (cfg.data.eval_ratio or cfg.data.eval_path or cfg.checkpoint.keep_best):
            raise UsageError("--eval-checkpoints best: picks the checkpoint with the lowest held-out loss, and this "
                             "run has none (set data.eval_ratio or data.eval_path)")
    if task_list:
        args += ["--tasks", ",".join(task_list)]
    if include is not None:
        _no_control("--eval-include", include)
        if not task_list:
            raise UsageError(f"--eval-include {show(include)}: a dir of local task files needs --eval-tasks naming "
                             f"the tasks to run")
        if not include.strip() or not os.path.isdir(Path(include).expanduser()):
            raise UsageError(f"--eval-include {show(include)}: not a directory of lm-eval task YAML files")
        from ..train.benchmarks import _local_task_files

        try:  # the job runs offline: a task's data file missing here would fail only once the training is done
            _local_task_files(Path(include).expanduser())
        except UsageError as e:
            raise UsageError(f"--eval-include {show(include)}: {e}") from None
        # Absolute, like the config: the file may be submitted from any folder.
        args += ["--include", os.path.abspath(Path(include).expanduser())]
    if task_list:
        _known_tasks(task_list, include)
    gpus = train.gpus_per_node if gpus is None else gpus
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= train.gpus_per_node:
        raise UsageError(f"--eval-gpus {show(gpus)}: expected 0 to {train.gpus_per_node}, the training job's GPUs "
                         f"per node; the evaluation job never asks for more than the training job")
    time = train.time if time is None else time
    if time_seconds(time, "--eval-time") > time_seconds(train.time):
        raise UsageError(f"--eval-time {show(time)}: longer than the training job's time limit ({train.time}); the "
                         f"evaluation job never asks for more than the training job")
    # With GPUs, the training job's CPUs per GPU for each of its GPUs (its ranks and the torch.distributed.run
    # launcher, which Slurm's default of one CPU per task would put on one core); without GPUs, the training job's
    # CPUs per node (CPU nodes) or Slurm's default (GPU nodes: its CPUs would come with GPUs the job leaves).
    cpus = train.cpus_per_node * gpus // train.gpus_per_node if gpus else (
        0 if train.gpus_per_node else train.cpus_per_node)
    # The training job's memory: the evaluation loads the same base model on one of its nodes.
    job = Job(1, gpus, cpus, time, train.partition, train.account, "deepspeed",
              eval_name(train.job_name or safe_name(Path(cfg.output.dir).name)), train.python, mem=train.mem)
    return EvalJob(job, tuple(args))


def render_eval(config: str, overrides: list[str], ev: EvalJob, train_file: str) -> str:
    """The evaluation job's self-contained sbatch text (``eval.sbatch`` filled): ``ia3-dist eval`` on the run that
    ``config`` and ``overrides`` describe, with the training job's python."""
    cfg_path = os.path.abspath(config)
    run = " ".join(shlex.quote(a) for a in [cfg_path, *overrides])
    opts = " ".join(shlex.quote(a) for a in ev.args)
    header = [f"Written by `ia3-dist slurm --eval` (ia3-dist {__version__}): the evaluation job of {train_file}: "
              f"{ev.describe()}.",
              f"Runs `ia3-dist eval <output.dir> {opts}` on {max(1, ev.job.per_node)} rank(s) (one per GPU; "
              f"torch.distributed.run",
              "for more than one) with the training job's python, config and overrides (output.dir as the job sees "
              "it from its",
              "start folder); results in <output.dir>/eval/results.json.",
              "Submit after the training job, from the same folder (the .submit.sh script beside this file submits "
              "both):",
              "  sbatch --dependency=afterok:<training job id> THIS_FILE",
              "afterok holds through the training job's requeues (same job id) until it completes with exit 0; if "
              "it fails,",
              "times out or is cancelled, Slurm cancels this job (--kill-on-invalid-dep=yes).",
              "Arguments after the file name replace the baked-in ones: CONFIG.yaml [k.sub=value ...] -- [eval "
              "options]"]
    # A GPU job's evaluation without GPUs: no --cpus-per-task=0, Slurm's default CPUs.
    directives = {"cpus-per-task": None} if not ev.job.per_node else None
    return assemble(ev.job, ev.job.job_name or DEFAULT_NAME, header, f"[ $# -gt 0 ] || set -- {run} -- {opts}",
                    directives, template=EVAL_TEMPLATE)


def render_submit(train_file: Path, eval_file: Path) -> str:
    """A script that submits the training job, then the evaluation job depending on it (``afterok``)."""
    tq, eq = shlex.quote(train_file.name), shlex.quote(eval_file.name)
    return f"""#!/bin/bash
# Written by `ia3-dist slurm --eval` (ia3-dist {__version__}): submits the training job ({train_file.name}), then
# its evaluation job ({eval_file.name}) with --dependency=afterok:<training job id>. Slurm starts the evaluation
# only once the training job has completed with exit 0: a requeue (preemption, the USR1 checkpoint, the hang
# watchdog) keeps the job id and the dependency waits through it. If training fails, times out or is cancelled,
# the evaluation job is cancelled (--kill-on-invalid-dep=yes) instead of pending for ever; a resubmitted training
# job has a new id, so run this script again (training resumes from its last checkpoint).
# Run it from the folder that relative paths in the config refer to: the jobs start there.
set -euo pipefail
if [ $# -gt 0 ]; then echo "usage: bash $0 (no arguments)" >&2; exit 2; fi
DIR=$(cd "$(dirname "$0")" && pwd)
train=$(sbatch --parsable "$DIR"/{tq})
train=${{train%%;*}}   # --parsable prints JOBID[;CLUSTER]
if ! evaljob=$(sbatch --parsable --dependency="afterok:$train" --kill-on-invalid-dep=yes "$DIR"/{eq}); then
  # The file name as an argument, never inside a double-quoted string (where ` and $ in it would run).
  printf '%s\\n' "training job $train submitted, but not its evaluation; submit that with:" >&2
  printf 'sbatch --dependency=afterok:%s --kill-on-invalid-dep=yes %q\\n' "$train" "$DIR"/{eq} >&2
  exit 1
fi
echo "training job $train"
echo "evaluation job ${{evaljob%%;*}} (starts after job $train completes with exit 0)"
"""


def eval_paths(out: Path) -> tuple[Path, Path]:
    """The evaluation job file and the submit script beside the training job file ``out``."""
    stem = out.name[: -len(".sbatch")] if out.name.endswith(".sbatch") and out.name != ".sbatch" else out.name
    return out.with_name(f"{stem}.eval.sbatch"), out.with_name(f"{stem}.submit.sh")


def check_writable(files: list[tuple[Path, str]], force: bool) -> None:
    """Each ``(path, how an error names it)`` can be written (what :func:`write_out` would refuse, refused first),
    so that no file of a set is written when another would be refused."""
    for path, what in files:
        name = f"{what}{brief(str(path))}"
        if os.path.islink(path):
            raise UsageError(f"{name}: a symlink, which ia3-dist does not write through; remove it or give another "
                             f"--out")
        # os.path's tests, not Path's: they answer False to any OSError (a name too long, too many links).
        if os.path.isdir(path):
            raise UsageError(f"{name}: is a directory; give another --out")
        if os.path.lexists(path) and not force:
            raise UsageError(f"{name}: file exists; give another --out or add --force to overwrite it")
        if not os.path.isdir(path.parent):
            raise UsageError(f"{name}: no such directory ({brief(str(path.parent))}); give another --out")
        try:
            name_max = os.pathconf(path.parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        if len(os.fsencode(path.name)) > name_max:  # the suffixed names are longer than --out's own
            raise UsageError(f"{name}: file name longer than {name_max} bytes; give a shorter --out")


def add_job_args(ap: argparse.ArgumentParser, node_range: bool = True) -> None:
    """The Slurm options shared by ``ia3-dist slurm`` and ``ia3-dist sweep`` (``node_range``: whether ``--nodes``
    may be a range; a sweep's tasks run on a fixed count)."""
    ap.add_argument("--nodes", type=nodes_option,
                    help=("nodes, or a range MIN-MAX: the job starts (and, requeued, resumes) on as many as it gets; "
                          "needs train.global_batch_size" if node_range else "nodes per task (one count)")
                    + " (default: the config's hardware.nodes)")
    ap.add_argument("--gpus-per-node", type=int_option("--gpus-per-node", 0, MAX_GPUS_PER_NODE),
                    help="0 for CPU-only nodes (default: the config's hardware.gpus_per_node)")
    ap.add_argument("--cpus-per-node", type=int_option("--cpus-per-node", 0, MAX_CPUS_PER_NODE), default=0,
                    help="ranks per node on CPU-only nodes (with --gpus-per-node 0); with GPUs, the CPUs a node's "
                         "ranks get (Slurm's --cpus-per-task; default: the cluster's)")
    ap.add_argument("--mem", help="host memory per node (Slurm's --mem: 64G, 500000M; 0: all of a node's memory). "
                    "Default: the cluster's (DefMemPerNode/DefMemPerCPU), often a few GB per CPU, which a rank "
                    "loading a large base model or offloading to the host can outgrow")
    ap.add_argument("--time", default="04:00:00", help="Slurm time limit: minutes, minutes:seconds, "
                    "hours:minutes:seconds, days-hours, days-hours:minutes or days-hours:minutes:seconds")
    ap.add_argument("--partition", help="partition name, or a comma-separated list of them")
    ap.add_argument("--account")
    ap.add_argument("--job-name", help="default: the last part of output.dir")
    # Checked by check_job, not by argparse's choices: its error would quote all of a 10,000-character value.
    ap.add_argument("--launcher", default="deepspeed", metavar="{" + ",".join(LAUNCHERS) + "}",
                    help="deepspeed (default), torchrun (multi-node, static rendezvous) or srun (one task per rank)")
    ap.add_argument("--python", help="the python the job runs (default: this one, "
                    f"{default_python()}); IA3_DIST_PYTHON at submit time still overrides it")


def layout_from_config(a: argparse.Namespace) -> str | None:
    """``--nodes`` and ``--gpus-per-node`` not given: the config's ``hardware`` section's, which ``plan`` uses too
    (a config written for 8 x 8 GPUs rendered a 1 x 1 job). Returns a line saying so where that is not 1 x 1."""
    if a.nodes is not None and a.gpus_per_node is not None:
        return None
    hw = load_config(a.config, a.overrides).hardware
    taken = []  # said only where the section asks for more than one (a config without one says nothing)
    if a.nodes is None:
        a.nodes = (hw.nodes, hw.nodes)
        if hw.nodes != 1:
            taken.append(f"--nodes {hw.nodes}")
    if a.gpus_per_node is None:
        a.gpus_per_node = hw.gpus_per_node
        if hw.gpus_per_node != 1:
            taken.append(f"--gpus-per-node {hw.gpus_per_node}")
    if not taken:
        return None
    return f"from the config's hardware section: {', '.join(taken)} (give them to change)"


def job_from_args(a: argparse.Namespace) -> Job:
    return check_job(a.nodes, a.gpus_per_node, a.time, a.partition, a.account, a.launcher, a.cpus_per_node,
                     a.job_name, a.python, a.mem)


def default_out(output_dir: str) -> Path:
    """``<last part of output.dir>.sbatch`` in the current directory, made safe by :func:`safe_name`."""
    return Path(f"{safe_name(Path(output_dir).name)}.sbatch")


def write_out(out: Path, text: str, force: bool, what: str = "--out ", fix: str | None = None) -> None:
    """Write the job file, mode 755. Any existing entry (an empty file too: it may be someone's placeholder) is
    kept unless ``force``; a symlink, dir or other non-regular file always (see :func:`..runtime.safe_io.write_file`).
    ``what`` and ``fix``: how an error names the file and what it suggests."""
    fix = fix or "give another --out"
    if os.path.lexists(out) and not os.path.islink(out) and not out.is_dir() and not force:
        raise UsageError(f"{what}{brief(str(out))}: file exists; {fix} or add --force to overwrite it")
    write_file(out, lambda fh: fh.write(text.encode("utf-8")), what, overwrite=force, mode=0o755, chmod=0o755,
               fix=fix)


EVAL_OPTS = ("eval_tasks", "eval_include", "eval_checkpoints", "eval_gpus", "eval_time")


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Write a filled sbatch file for a run config.")
    ap.add_argument("--config", required=True)
    add_job_args(ap)
    ap.add_argument("--out", help="file to write (default: <last part of output.dir>.sbatch in the current "
                    "directory)")
    ap.add_argument("--force", action="store_true", help="overwrite the --out file (and with --eval the files "
                    "beside it) if it exists")
    ev = ap.add_argument_group("evaluation job (--eval): `ia3-dist eval` on one node once training completed")
    ev.add_argument("--eval", action="store_true", help="also write <name>.eval.sbatch beside the --out file "
                    "<name>.sbatch, an evaluation job that Slurm starts after the training job completes with exit 0 "
                    "(afterok), and <name>.submit.sh, which submits both")
    ev.add_argument("--eval-tasks", help="comma-separated lm-eval tasks, as `ia3-dist eval --tasks` (default: "
                    "none, the held-out loss per checkpoint only)")
    ev.add_argument("--eval-include", help="a dir of local lm-eval task YAML files, as `ia3-dist eval --include`")
    ev.add_argument("--eval-checkpoints", help="all (default) | latest | best | a comma list such as step500,final, "
                    "as `ia3-dist eval --checkpoints`")
    ev.add_argument("--eval-gpus", type=int_option("--eval-gpus", 0, MAX_GPUS_PER_NODE),
                    help="GPUs of the evaluation job's one node (default and most: the training job's per node)")
    ev.add_argument("--eval-time", help="the evaluation job's time limit (default and most: the training job's)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_intermixed_args(argv)
    given = [o for o in EVAL_OPTS if getattr(a, o) is not None]
    if given and not a.eval:
        raise UsageError(f"--{given[0].replace('_', '-')}: an option of the evaluation job; add --eval")
    taken = layout_from_config(a)
    text = render(a.config, a.overrides, a.nodes, a.gpus_per_node, a.time, a.partition, a.account, a.launcher,
                  a.cpus_per_node, a.job_name, a.python, a.mem)
    if taken:
        print(taken)
    range_note(job_from_args(a))
    if a.out is not None:
        _no_control("--out", a.out)
        if not a.out.strip():
            raise UsageError("--out: empty file name; give a path such as job.sbatch")
    cfg = load_config(a.config, a.overrides)
    out = Path(a.out) if a.out is not None else default_out(cfg.output.dir)
    if not a.eval:
        write_out(out, text, a.force)
        cpus_note(job_from_args(a))
        print(f"wrote {out}\nsubmit from the folder that relative paths in the config refer to (the job starts "
              f"there):  sbatch {shlex.quote(str(out))}\nwatch:  squeue -u $USER; tail -f {_job_log(text)} (in that "
              f"folder; each rank's or node's log in logs/)\nit "
              f"checkpoints and requeues itself on preemption; resubmitting the same file resumes "
              f"(train.resume=auto)")
        return 0
    ev_job = check_eval(job_from_args(a), cfg, a.eval_tasks, a.eval_include, a.eval_checkpoints, a.eval_gpus,
                        a.eval_time)
    eval_out, submit = eval_paths(out)
    eval_text = render_eval(a.config, a.overrides, ev_job, out.name)
    # All three checked before any is written: a refusal leaves no half-written set behind.
    check_writable([(out, "--out "), (eval_out, "--eval: "), (submit, "--eval: ")], a.force)
    write_out(out, text, a.force)
    write_out(eval_out, eval_text, a.force, what="--eval: ", fix="give another --out")
    write_out(submit, render_submit(out, eval_out), a.force, what="--eval: ", fix="give another --out")
    cpus_note(job_from_args(a))
    q = shlex.quote
    print(f"wrote {out} (training), {eval_out} (evaluation: {ev_job.describe()}) and {submit}\n"
          f"submit both from the folder that relative paths in the config refer to (the jobs start there):  "
          f"bash {q(str(submit))}\n"
          f"or by hand:  train=$(sbatch --parsable {q(str(out))}) && sbatch --dependency=afterok:${{train%%;*}} "
          f"--kill-on-invalid-dep=yes {q(str(eval_out))}\n"
          f"the evaluation starts once the training job has completed with exit 0 (its requeues keep the job id, "
          f"the dependency waits through them); a failed training job cancels it\n"
          f"results: <output.dir>/eval/results.json; watch:  squeue -u $USER")
    return 0
