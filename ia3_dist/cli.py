"""Command line: ``launch.py`` / ``ia3-dist`` [train] [--config X] [key.sub=value ...]."""

from __future__ import annotations

import argparse
import sys

from .errors import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USAGE, NonFiniteLoss, Preempted, UsageError


def _train_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with IA3 on DeepSpeed. With no "
                                 "--config, runs the embedded CPU demo (tiny Bloom, synthetic Chinese records).")
    ap.add_argument("--config", help="run config YAML (see configs/)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=1e-3")
    # The deepspeed launcher appends --local_rank; the rank layout is read from the environment instead.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def cmd_train(argv: list[str], prog: str) -> int:
    from .config import load_config
    from .demo import DEMO_RUN

    args = _train_parser(prog).parse_args(argv)
    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO_RUN)
    from .trainer import run

    run(cfg)
    return 0


def cmd_check(argv: list[str], prog: str) -> int:
    """Preflight alone: config, data, model and tokenizer dirs, DeepSpeed config, output dir; prints the data
    statistics and the run shape. Exit 0 if a run would start, 2 (naming the problem) if not. Writes nothing into
    the output dir."""
    from . import dist, preflight
    from .config import load_config
    from .demo import DEMO_RUN
    from .trainer import prepare

    ap = argparse.ArgumentParser(prog=f"{prog} check", description=cmd_check.__doc__)
    ap.add_argument("--config")
    ap.add_argument("--world-size", type=int, default=None, help="ranks the run will have (default: this "
                    "launcher's, else 1)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO_RUN)
    env = dist.detect()
    if args.world_size is not None:
        if args.world_size < 1:
            raise UsageError("--world-size must be >= 1")
        env = dist.DistEnv(0, 0, args.world_size, args.world_size)
    print(preflight.report(prepare(cfg, env)))
    print("preflight: OK")
    return 0


def cmd_resolve(argv: list[str], prog: str) -> int:
    """Print one resolved config value (config + overrides), e.g. for job scripts: --key output.dir."""
    from .config import load_config

    ap = argparse.ArgumentParser(prog=f"{prog} resolve", description=cmd_resolve.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--key", required=True, help="dotted key, e.g. output.dir")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    node: object = load_config(args.config, args.overrides).to_dict()
    for part in args.key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"--key {args.key}: no such config key")
        node = node[part]
    print(node)
    return 0


def cmd_slurm(argv: list[str], prog: str) -> int:
    from .slurm import main as slurm_main

    return slurm_main(argv, f"{prog} slurm")


COMMANDS = {"train": cmd_train, "check": cmd_check, "resolve": cmd_resolve, "slurm": cmd_slurm}


def main(argv: list[str] | None = None, prog: str = "ia3-dist") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = "train"
    if argv and argv[0] in COMMANDS:
        cmd = argv.pop(0)
    try:
        return COMMANDS[cmd](argv, prog)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except NonFiniteLoss as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main(prog="python -m ia3_dist.cli"))
