"""Command line: ``launch.py`` / ``ia3-dist`` / ``python -m ia3_dist`` [COMMAND] [--config X] [key.sub=value ...].

Each command imports what it needs when it runs, so ``--help`` and bad-argument errors answer without loading torch
(but generate, chat, export and eval, whose options name the inference module's defaults and limits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import (
    EXIT_CHECKPOINT_WRITE,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    CheckpointWriteError,
    NonFiniteLoss,
    Preempted,
    RunFinished,
    UsageError,
)
from .runtime import console

# More ranks than any cluster has; a bound keeps the step planner's per-rank lists finite on hostile input.
MAX_WORLD_SIZE = 1 << 20


def _train_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with IA3 on DeepSpeed. With no "
                                 "--config, runs the embedded CPU demo (tiny Bloom, synthetic Chinese records).")
    ap.add_argument("--config", help="run config YAML (see configs/)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=1e-3")
    # The deepspeed launcher appends --local_rank; the rank layout is read from the environment instead.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def cmd_train(argv: list[str], prog: str) -> int:
    # Intermixed, as the other commands: overrides may come before and after --config.
    args = _train_parser(prog).parse_intermixed_args(argv)
    from .config import load_config, located
    from .train.demo import DEMO_RUN

    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO_RUN)
    from .train.run import run

    with located(args.config, args.overrides):
        run(cfg)
    return 0


def cmd_check(argv: list[str], prog: str) -> int:
    """Preflight alone: config, data, model and tokenizer dirs, DeepSpeed config, output dir; prints the data
    statistics and the run shape. Exit 0 if a run would start, 2 (naming the problem) if not. Writes nothing into
    the output dir."""
    ap = argparse.ArgumentParser(prog=prog, description=cmd_check.__doc__)
    ap.add_argument("--config")
    ap.add_argument("--world-size", type=int, default=None, help="ranks the run will have (default: this "
                    "launcher's, else 1)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)  # first: --help and a bad option import nothing heavy

    from .config import load_config, located
    from .runtime import dist, lazy
    from .train.demo import DEMO_RUN
    from .train.prepare import prepare
    from .train.report import report

    lazy.import_deepspeed()
    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO_RUN)
    env = dist.detect()
    if args.world_size is not None:
        if not 1 <= args.world_size <= MAX_WORLD_SIZE:
            raise UsageError(f"--world-size must be between 1 and {MAX_WORLD_SIZE}")
        env = dist.DistEnv(0, 0, args.world_size, args.world_size)
    with located(args.config, args.overrides):
        print(report(prepare(cfg, env)))
    print("preflight: OK")
    return 0


def cmd_prepare(argv: list[str], prog: str) -> int:
    """Tokenize the run's data into the token cache (data.cache_dir: e.g. a shared filesystem) and print the data
    report; run it on a login or CPU node before sbatch, with the run's config and overrides. The run then reads
    the cache memory-mapped and never tokenizes (data.require_prepared=true: a missing cache is an error). Writes
    nothing into the output dir."""
    ap = argparse.ArgumentParser(prog=prog, description=cmd_prepare.__doc__)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    from .config import load_config, located
    from .train.demo import DEMO_RUN
    from .train.prepare import prepare_data

    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO_RUN)
    with located(args.config, args.overrides):
        print(prepare_data(cfg), flush=True)
    return 0


def _gen_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--adapter", required=True, help="adapter dir (runs/x/adapter) or a merged model dir")
    ap.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)


MIN_TEMPERATURE = 1e-4
"""The lowest ``--temperature`` sampling takes: far below it the scaled logits overflow; near it sampling is greedy
decoding already."""


def _gen_options(a: argparse.Namespace) -> Any:
    import math

    from .tools.inference import GenOptions

    # nan passes `x <= 0`; generation would fail on it deep inside transformers.
    finite = math.isfinite(a.temperature) and math.isfinite(a.repetition_penalty)
    if (not finite or a.max_new_tokens < 1 or a.temperature <= 0 or not 0 < a.top_p <= 1 or a.top_k < 0
            or a.repetition_penalty <= 0):
        raise UsageError("need --max-new-tokens >= 1, finite --temperature > 0, 0 < --top-p <= 1, --top-k >= 0 and "
                         "finite --repetition-penalty > 0")
    if a.sample and a.temperature < MIN_TEMPERATURE:
        # The logits divided by it overflow to inf in fp32 (1e-38 did), and sampling fails on them mid-generation.
        raise UsageError(f"--temperature {a.temperature:g}: sampling needs at least {MIN_TEMPERATURE:g}; for the "
                         f"most likely answer leave out --sample (greedy decoding)")
    from .tools.inference import MAX_SANE_CONTEXT

    if a.max_new_tokens > MAX_SANE_CONTEXT:
        # No model has a context this long; a model without a position limit (Bloom's ALiBi) would try.
        raise UsageError(f"--max-new-tokens {a.max_new_tokens}: at most {MAX_SANE_CONTEXT} (more than any model's "
                         f"context)")
    # torch.manual_seed takes 64 bits; past them it fails only once the model has loaded.
    if not 0 <= a.seed < 2**64:
        from .config.schema import show

        raise UsageError(f"--seed must be in [0, 2**64) (0 .. {2**64 - 1}), got {show(a.seed)}")
    return GenOptions(a.max_new_tokens, a.sample, a.temperature, a.top_p, a.top_k, a.seed, a.repetition_penalty)


def _json_list_start(line: str) -> bool:
    """The first line of a JSON list file: a lone ``[`` (pretty-printed) or a whole list on one line (a plain
    prompt may start with a bracket: "[INST] ...")."""
    s = line.strip()
    if s == "[":
        return True
    if not s.startswith("["):
        return False
    try:
        return isinstance(json.loads(s), list)
    except (ValueError, RecursionError):
        return False


def _echo(line: str, req: Any, where: str) -> dict[str, Any]:
    """What the output line of a request repeats: the JSON object as given, or a plain prompt as an instruction. A
    JSON string with a lone surrogate escape (``"\\ud800"``) in a field the template does not read could not be
    written (UTF-8 has no such character)."""
    echo = json.loads(line) if line.strip().startswith("{") else {"instruction": req.turns[-1].instruction,
                                                                  "input": ""}
    try:
        json.dumps(echo, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape without its "
                         f"pair), which cannot be written back as UTF-8; fix the escape") from None
    return echo


def cmd_generate(argv: list[str], prog: str) -> int:
    """Generate responses with the training template. Prompts come from the arguments, else from --file, else
    from stdin, one per line: plain text, or JSON as the training data spells it ({"instruction", "input",
    "system", "history"}, {"messages": [...]} or {"conversations": [...]}, ending with the user's turn). Writes
    JSONL: each request with its "response"."""
    from .data.tools import parse_calls
    from .tools.inference import generate, load_for_inference, parse_request, read_prompt_lines

    ap = argparse.ArgumentParser(prog=prog, description=cmd_generate.__doc__)
    _gen_args(ap)
    ap.add_argument("--file", help="prompts file (.txt or .jsonl, one per line)")
    ap.add_argument("--out", help="JSONL output file (default stdout)")
    ap.add_argument("prompts", nargs="*")
    a = ap.parse_intermixed_args(argv)
    opts = _gen_options(a)
    if a.prompts and a.file:
        raise UsageError(f"prompts given both as arguments and with --file {a.file}; give them one way")
    if a.prompts:
        lines = list(enumerate(a.prompts, start=1))
        src = None
    else:
        if a.file:
            if Path(a.file).suffix.lower() in (".csv", ".tsv", ".parquet", ".arrow"):
                # Read line by line, a table's header and rows would be prompts each.
                raise UsageError(f"--file {a.file}: prompts are read one per line (plain text, or a JSON request "
                                 f"per line: .txt or .jsonl); write the records as JSONL")
            try:
                fh = open(a.file, encoding="utf-8")  # noqa: SIM115 - closed below
            except OSError as e:
                raise UsageError(f"--file {a.file}: cannot open it ({e.strerror or e})") from None
            with fh:
                lines = read_prompt_lines(fh, f"--file {a.file}")
            if lines and _json_list_start(lines[0][1]):
                # A JSON list (a .json dataset): read line by line it would be one prompt, or a broken one per line.
                raise UsageError(f"--file {a.file}:{lines[0][0]}: a JSON list; prompts are read one per line (plain "
                                 f"text, or a JSON request per line): write the records as JSONL (jq -c '.[]' "
                                 f"{Path(a.file).name} > prompts.jsonl)")
            src = a.file
        else:
            lines, src = read_prompt_lines(sys.stdin, "stdin"), "stdin"
    reqs = [parse_request(ln, f"prompt {n}" if src is None else f"{src}:{n}") for n, ln in lines]
    if not reqs:
        raise UsageError("no prompts (give them as arguments, with --file, or on stdin)")
    # Each request is written back with its response: checked now, not once every answer has been generated.
    echoes = [_echo(ln, req, f"prompt {n}" if src is None else f"{src}:{n}") for (n, ln), req in zip(lines, reqs,
                                                                                                     strict=True)]
    if a.out and (Path(a.out).is_dir() or not Path(a.out).parent.is_dir()):
        raise UsageError(f"--out {a.out}: not a file in an existing directory")
    tmp = None
    if a.out:
        # Made before the model loads (a directory it cannot write to is found now, not after hours of
        # generation), renamed over --out at the end (a link there is replaced, never followed).
        from .runtime.safe_io import create_new, temp_beside

        tmp = str(temp_beside(Path(a.out)))
        try:
            # 0666 less the umask, as every file ia3-dist writes (mkstemp's 0600 would keep the answers from a
            # shared project's other members).
            fd = create_new(Path(tmp))
        except OSError as e:
            tmp = None
            raise UsageError(f"--out {a.out}: cannot write there ({e.strerror or e})") from None
        os.close(fd)
    try:
        model, tok, template, _ = load_for_inference(a.adapter, a.base, a.dtype)
        responses = generate(model, tok, template, reqs, opts)
        rows = []
        for echo, req, r in zip(echoes, reqs, responses, strict=True):
            calls = parse_calls(r) if req.tools else []
            rows.append(json.dumps({**echo, "response": r, **({"tool_calls": calls} if calls else {})},
                                   ensure_ascii=False) + "\n")
        if tmp is None:
            sys.stdout.write("".join(rows))
            return 0
        try:
            Path(tmp).write_text("".join(rows), encoding="utf-8")
            os.replace(tmp, a.out)
        except OSError as e:
            raise UsageError(f"--out {a.out}: cannot write it ({e.strerror or e})") from None
        tmp = None
        return 0
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def cmd_chat(argv: list[str], prog: str) -> int:
    """Interactive, multi-turn: type a message, get the model's answer with the conversation so far in the
    training template. /reset starts a new conversation; an empty line, /quit or Ctrl-C at the prompt ends it;
    Ctrl-C while it answers drops that answer."""
    from .data.records import Conversation, Turn
    from .data.tools import parse_calls, text_without_calls
    from .tools.inference import MAX_PROMPT_CHARS, generate, load_for_inference, parse_request, read_tools

    ap = argparse.ArgumentParser(prog=prog, description=cmd_chat.__doc__)
    _gen_args(ap)
    ap.add_argument("--tools", help="a JSON file with the list of tools (function schemas) the model may call; "
                                    "answer its calls with /result TEXT")
    a = ap.parse_intermixed_args(argv)
    opts = _gen_options(a)
    offered = read_tools(a.tools) if a.tools else ()
    tools = offered
    model, tok, template, _ = load_for_inference(a.adapter, a.base, a.dtype)
    print(f"ia3-dist chat with {a.adapter} (/reset for a new conversation; empty line or /quit to end"
          + (f"; {len(tools)} tools offered, /result TEXT answers a tool call" if tools else "") + ")", flush=True)
    history: list[Turn] = []
    system = ""
    interactive = sys.stdin.isatty()
    n = 0
    while True:
        n += 1
        try:
            if interactive:  # the terminal bounds a line; input() gives line editing
                line = input("Human: ")
            else:
                # Piped input has no such bound: a bounded readline, so a stream with no newline cannot fill memory.
                print("Human: ", end="", flush=True)
                line = sys.stdin.readline(MAX_PROMPT_CHARS + 1)
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session, as an empty line does
            print(flush=True)
            break
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin:{n}: not UTF-8 ({e.reason}); use a UTF-8 terminal or input") from None
        if len(line) > MAX_PROMPT_CHARS and not line.endswith("\n"):
            raise UsageError(f"stdin:{n}: line longer than {MAX_PROMPT_CHARS} characters, the limit for one prompt")
        if not line.strip() or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history, system, tools = [], "", offered
            print("(new conversation)", flush=True)
            continue
        if line.strip().startswith("/result"):
            if not history or not history[-1].calls:
                print("error: /result answers the assistant's tool call; there is none to answer", file=sys.stderr,
                      flush=True)
                continue
            turn = Turn("", "", "", results=({"content": line.strip().removeprefix("/result").strip()},))
            conv = Conversation([*history, turn], system, tools)
        else:
            try:
                req = parse_request(line, f"input {n}")
            except UsageError as e:  # a typo should not end the session
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            # The conversation keeps its system prompt and tools from the line that set them (or --tools), once
            # that line is answered.
            conv = Conversation([*history, *req.turns], req.system or (system if history else ""),
                                req.tools or tools)
        try:
            # The k-th line read (from 0) draws from seed + k, as generate's prompt k: asked again, a sampled answer
            # is another draw, the first line answers as generate does, and the session replays from --seed.
            answer = generate(model, tok, template, [conv], replace(opts, seed=(opts.seed + n - 1) % 2**64))[0]
        except KeyboardInterrupt:  # Ctrl-C while it answers drops that line; the conversation goes on without it
            print("(interrupted)", flush=True)
            continue
        except UsageError as e:  # a line the template cannot render (its budget, a role it refuses): dropped too
            print(f"error: {e}; that line is dropped (/reset starts a new conversation)", file=sys.stderr,
                  flush=True)
            continue
        system, tools = conv.system, conv.tools
        calls = parse_calls(answer) if conv.tools else []
        last = conv.turns[-1]
        # The turn keeps the calls apart from the text: the template writes them (once) in the next prompt.
        history = [*conv.turns[:-1], Turn(last.instruction, last.input, text_without_calls(answer) if calls else answer,
                                          results=last.results,
                                          calls=tuple({"type": "function", "function": {
                                              "name": c["name"], "arguments": c.get("arguments", c.get(
                                                  "parameters", {}))}} for c in calls))]
        print("Assistant: " + answer, flush=True)
        for c in calls:
            args = c.get("arguments", c.get("parameters", {}))
            print(f"Tool call: {c['name']} {json.dumps(args, ensure_ascii=False)}", flush=True)
    return 0


def cmd_export(argv: list[str], prog: str) -> int:
    """Merge the IA3 adapter into its base (PEFT merge_and_unload) and save a standard HF model (safetensors),
    its tokenizer and the prompt template into --out, which must be new or empty (see --force)."""
    from .tools.export import export_merged
    from .tools.inference import EXPORT_MARKER as MARKER

    ap = argparse.ArgumentParser(prog=prog, description=cmd_export.__doc__)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True, help="directory for the merged model: new or empty, unless --force")
    ap.add_argument("--base")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="the merged weights' dtype (default auto: the base's own, as its config.json records it; "
                         "a bf16 or fp16 base exported in fp32 takes twice the disk and memory)")
    ap.add_argument("--force", action="store_true",
                    help=f"replace an earlier `ia3-dist export` in --out (the files its {MARKER} lists: stale weight "
                         f"shards go, other files there are kept). A non-empty dir that export did not write is "
                         f"refused even with --force")
    a = ap.parse_args(argv)
    print(f"merged model written to {export_merged(a.adapter, a.out, a.base, a.dtype, force=a.force)}")
    return 0


def cmd_plot(argv: list[str], prog: str) -> int:
    """PNG of a run's loss, eval loss, lr, tokens/s and grad norm from <dir>/metrics.jsonl; with several run dirs,
    their loss, eval loss and tokens/s overlaid in one PNG, each line labelled by its run dir."""
    from .config.schema import brief
    from .train.plots import plot_metrics, plot_runs

    ap = argparse.ArgumentParser(prog=prog, description=cmd_plot.__doc__)
    ap.add_argument("dirs", nargs="+", metavar="RUN", help="run output dir(s)")
    ap.add_argument("--out", help="PNG path (default <dir>/metrics.png for one run, metrics-compare.png in the "
                                  "current dir for several)")
    a = ap.parse_args(argv)
    dirs = [Path(d) for d in a.dirs]
    what = "--out " if a.out else ""  # how a refusal names the PNG: the file exactly as written, never X.png
    if len(dirs) > 1:
        out = plot_runs(dirs, Path(a.out) if a.out else Path("metrics-compare.png"), what)
        print(f"wrote {out}")
        return 0
    d = dirs[0]
    out = plot_metrics(d / "metrics.jsonl", Path(a.out) if a.out else d / "metrics.png", what)
    if out is None:
        raise UsageError(f"{brief(str(d))}/metrics.jsonl has no logged steps yet")
    print(f"wrote {out}")
    return 0


# Units of --gpu-mem, in GiB. Binary and bare units are GiB (nvidia-smi's MiB too); decimal ones are decimal: a
# "80GB" read as GiB would plan 7% more memory than the card has, the direction in which plans fit and runs do not.
_SIZE_UNITS = {"": 1.0, "g": 1.0, "gib": 1.0, "gb": 1e9 / 2**30, "m": 1 / 1024, "mib": 1 / 1024, "mb": 1e6 / 2**30,
               "t": 1024.0, "tib": 1024.0, "tb": 1e12 / 2**30}


def _gib(text: str) -> float:
    """A GPU memory size in GiB: 80, 80G, 80GiB (GiB), 81559MiB (nvidia-smi's), 80GB (decimal: 74.5 GiB), any
    case; finite and positive."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = t[len(num):].strip() if t.startswith(num) else None
    try:
        v = float(num) * _SIZE_UNITS[unit]  # type: ignore[index]
    except (ValueError, KeyError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"--gpu-mem {text!r}: expected a positive size such as 80GiB, 81559MiB, 80GB (decimal, "
                         f"74.5 GiB) or 40 (GiB)")
    return v


def cmd_plan(argv: list[str], prog: str) -> int:
    """Per-rank memory for weights, gradients, optimizer and activations on ZeRO 0-3 and ZeRO-3 offload, the
    largest micro-batch that fits and a recommended DeepSpeed config. Needs no GPU and no weights."""
    ap = argparse.ArgumentParser(prog=prog, description=cmd_plan.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--gpu-mem", help="per GPU: 80GiB, 80 (GiB), 81559MiB (as nvidia-smi shows it) or 80GB "
                                      "(decimal: 74.5 GiB) (default: the config's hardware section)")
    ap.add_argument("--cpu", action="store_true",
                    help="CPU ranks: --gpus-per-node is ranks per node, --gpu-mem host memory per rank, and the "
                         "table gives RSS per rank")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_intermixed_args(argv)
    from .config import load_config, located
    from .tools.plan import plan

    cfg = load_config(a.config, a.overrides)
    hw = cfg.hardware
    nodes = a.nodes if a.nodes is not None else hw.nodes
    gpus = a.gpus_per_node if a.gpus_per_node is not None else hw.gpus_per_node
    if nodes < 1 or gpus < 1:
        raise UsageError("--nodes and --gpus-per-node must be >= 1")
    gib = _gib(a.gpu_mem) if a.gpu_mem else hw.gpu_mem_gib
    with located(a.config, a.overrides):
        text, _ = plan(cfg, nodes, gpus, gib, cpu=a.cpu)
    if a.gpu_mem and not a.gpu_mem.strip().lower().endswith(("gib", "g")) and any(c.isalpha() for c in a.gpu_mem):
        print(f"--gpu-mem {a.gpu_mem.strip()} = {gib:.2f} GiB")
    print(text)
    return 0


def cmd_resolve(argv: list[str], prog: str) -> int:
    """Print one resolved config value (config + overrides), e.g. for job scripts: --key output.dir."""
    from .config import load_config

    ap = argparse.ArgumentParser(prog=prog, description=cmd_resolve.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--key", required=True, help="dotted key, e.g. output.dir")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    node: object = load_config(args.config, args.overrides).to_dict()
    for part in args.key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"--key {args.key}: no such config key")
        node = node[part]
    # As YAML writes a scalar (null, false, 0.003) and a section or list as one line of JSON, for shell tests such
    # as [ "$(ia3-dist resolve ... --key data.packing)" = false ], not Python's None / False.
    if isinstance(node, str):
        print(node)
    elif node is None or isinstance(node, (bool, int, float)):
        print(json.dumps(node))
    else:
        print(json.dumps(node, ensure_ascii=False, default=str))
    return 0


def cmd_slurm(argv: list[str], prog: str) -> int:
    from .tools.slurm import main as slurm_main

    return slurm_main(argv, prog)


def cmd_sweep(argv: list[str], prog: str) -> int:
    from .tools.sweep import main as sweep_main

    return sweep_main(argv, prog)


def cmd_eval(argv: list[str], prog: str) -> int:
    from .tools.benchmark import main as eval_main

    return eval_main(argv, prog)


def cmd_summary(argv: list[str], prog: str) -> int:
    from .tools.summary import main as summary_main

    return summary_main(argv, prog)


# name: (handler, one line for ``ia3-dist --help``)
COMMANDS: dict[str, tuple[Any, str]] = {
    "train": (cmd_train, "train IA3 on DeepSpeed (the default: `ia3-dist --config X` trains; no --config runs the "
                         "embedded CPU demo)"),
    "check": (cmd_check, "preflight only: config, data, model and DeepSpeed checks and the data report; exit 0 or 2"),
    "prepare": (cmd_prepare, "tokenize the data into the token cache (data.cache_dir) before the job; prints the "
                             "data report"),
    "plan": (cmd_plan, "per-rank memory on ZeRO 0-3/offload, the largest micro-batch that fits, a recommended "
                       "config"),
    "slurm": (cmd_slurm, "write a self-contained sbatch file for a run config (checks the config first)"),
    "sweep": (cmd_sweep, "a grid of config values (--grid train.lr=3e-3,1e-2) as one Slurm job array, or --local"),
    "summary": (cmd_summary, "one table of runs or a sweep (differing values, status, losses, tokens/s, memory) "
                             "and their loss curves"),
    "generate": (cmd_generate, "generate responses from an adapter or merged model with the training template"),
    "chat": (cmd_chat, "interactive chat with an adapter or merged model"),
    "export": (cmd_export, "merge the IA3 adapter into its base and save a plain HF model"),
    "eval": (cmd_eval, "a run's checkpoints on lm-eval benchmarks (offline, local tasks) and its held-out data, "
                       "the base loaded once"),
    "plot": (cmd_plot, "PNG of a run's loss, eval loss, lr and tokens/s; several runs overlaid in one PNG"),
    "resolve": (cmd_resolve, "print one resolved config value (for job scripts)"),
}


def usage(prog: str) -> str:
    width = max(len("-h, --help"), *map(len, COMMANDS))
    lines = [f"usage: {prog} [COMMAND] [options] [key.sub=value ...]", "",
             "Fine-tune causal LMs with IA3 (PEFT) on DeepSpeed, from one CPU box to SLURM clusters.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "options:",
              f"  {'--verbose':<{width}}  show third-party log lines and warnings too (or IA3_DIST_VERBOSE=1)",
              f"  {'-h, --help':<{width}}  this list; `{prog} COMMAND --help` gives a command's options", "",
              "exit codes: 0 done, 2 bad input (nothing started), 3 non-finite loss, 74 a checkpoint could not be "
              "written (disk full), 75 stopped by a signal after checkpointing, 76 hang watchdog (no progress for "
              "train.hang_timeout_s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "ia3-dist") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        os.environ[console.VERBOSE_ENV] = "1"
    console.quiet_third_party()
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage(prog))
        return 0
    cmd = "train"
    if argv and argv[0] in COMMANDS:
        cmd = argv.pop(0)
    elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
        # Neither a command nor what train takes (options, key.sub=value): a mistyped command.
        import difflib

        from .config.schema import brief

        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"{prog}: error: unknown command {brief(argv[0])!r}; {hint}the commands are "
              f"{', '.join(COMMANDS)} (`{prog} --help` says what each does)", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        return COMMANDS[cmd][0](argv, f"{prog} {cmd}")
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except RunFinished as e:
        print(f"{prog}: {e}", flush=True)
        return 0
    except NonFiniteLoss as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except CheckpointWriteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT_WRITE


def entry(prog: str = "ia3-dist") -> None:
    """The process's exit: ``main``'s code; a reader that closed the pipe early (``ia3-dist --help | head -3``)
    ends it quietly, not with a BrokenPipeError traceback (Python's recipe: stdout then points at devnull, so the
    interpreter's own flush at exit cannot fail again)."""
    try:
        code = main(prog=prog)
        sys.stdout.flush()
    except BrokenPipeError:
        # Only stdout's own: a broken socket elsewhere (a tracker's server) is an error to show.
        if not _stdout_closed():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader is gone: poll reports an error on its write end."""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (a test's capture), no poll on this platform
        return False
