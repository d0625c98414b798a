"""``ia3-dist slurm``: write a filled sbatch file from the templates in ``slurm/`` and say how to submit it."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from ..config import load_config
from ..errors import UsageError

TEMPLATES = {"deepspeed": "single_node.sbatch", "multi": "multi_node.sbatch", "srun": "srun_per_rank.sbatch"}


def template_dir() -> Path:
    """``slurm/`` beside the package in a checkout, or the installed ``ia3_dist.slurm_templates`` data."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "slurm", pkg / "slurm_templates"):
        if (cand / "lib.sh").is_file():
            return cand
    raise FileNotFoundError("slurm templates not found next to ia3_dist")


def _set_directive(text: str, opt: str, value: str | None) -> str:
    """Replace ``#SBATCH --opt=...`` (or drop it for None); add it after the last directive if absent."""
    pat = re.compile(rf"^#SBATCH --{re.escape(opt)}=.*$", re.M)
    line = f"#SBATCH --{opt}={value}" if value is not None else ""
    if pat.search(text):
        return pat.sub(line, text).replace("\n\n#SBATCH", "\n#SBATCH")
    if value is None:
        return text
    last = list(re.finditer(r"^#SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + "\n" + line + text[last.end():]


def render(config: str, overrides: list[str], nodes: int, gpus_per_node: int, time: str,
           partition: str | None = None, account: str | None = None, launcher: str = "deepspeed",
           cpus_per_node: int = 0, job_name: str | None = None) -> str:
    if nodes < 1:
        raise UsageError("--nodes must be >= 1")
    if gpus_per_node < 0 or (gpus_per_node == 0 and cpus_per_node < 1):
        raise UsageError("give --gpus-per-node G (G >= 1), or --gpus-per-node 0 with --cpus-per-node N for CPU "
                         "nodes")
    cfg = load_config(config, overrides)  # fail now, not in the queue
    if launcher == "srun":
        name = TEMPLATES["srun"]
    elif nodes > 1:
        name = TEMPLATES["multi"]
    else:
        name = TEMPLATES["deepspeed"]
    text = (template_dir() / name).read_text()
    per_node = gpus_per_node or cpus_per_node
    text = _set_directive(text, "job-name", job_name or Path(cfg.output.dir).name or "ia3-dist")
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
    args = " ".join(shlex.quote(a) for a in [config, *overrides])
    # Baked-in defaults; arguments given to sbatch after the file name still win.
    defaults = "\n".join([*env, f'[ $# -gt 0 ] || set -- {args}'])
    return text.replace("set -uo pipefail\n", f"set -uo pipefail\n{defaults}\n", 1)


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Write a filled sbatch file for a run config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--cpus-per-node", type=int, default=0, help="ranks per node on CPU-only nodes (with "
                    "--gpus-per-node 0)")
    ap.add_argument("--time", default="04:00:00")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--job-name")
    ap.add_argument("--launcher", choices=["deepspeed", "torchrun", "srun"], default="deepspeed",
                    help="deepspeed (default), torchrun (multi-node, c10d rendezvous) or srun (one task per rank)")
    ap.add_argument("--out", help="file to write (default: <output.dir>.sbatch beside the config)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_intermixed_args(argv)
    text = render(a.config, a.overrides, a.nodes, a.gpus_per_node, a.time, a.partition, a.account, a.launcher,
                  a.cpus_per_node, a.job_name)
    out = Path(a.out or f"{Path(load_config(a.config, a.overrides).output.dir).name or 'ia3-dist'}.sbatch")
    out.write_text(text)
    out.chmod(0o755)
    print(f"wrote {out}\nsubmit from the repository root:  sbatch {out}\nwatch:  squeue -u $USER; "
          f"tail -f logs/*.out\nit checkpoints and requeues itself on preemption; resubmitting the same file "
          f"resumes (train.resume=auto)")
    return 0
