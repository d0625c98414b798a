"""Loading a trained model for inference (adapter dir or merged dir) and generating with the training template."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from ..config.schema import show
from ..data.records import Conversation, Turn, parse_json
from ..data.template import CHAT_TEMPLATE, TEMPLATE_FILE, Template, leading_added, tokenizer_template
from ..errors import UsageError
from ..models.files import (
    MAX_SMALL_JSON,
    check_model_dir,
    check_vocab,
    check_weight_file,
    checkpoint_files,
    error_line,
    has_tokenizer_files,
    looks_local,
    read_small_json,
    weights_fingerprint,
)
from ..models.ia3 import check_finite
from ..models.load import DTYPES, HUB_KERNELS, no_code_prompt, pad_with_eos
from ..runtime.adapter import NEW as ADAPTER_NEW
from ..runtime.adapter import set_aside
from ..runtime.checkpoint import comparable
from ..runtime.manifest import adapter_record
from ..runtime.safe_io import check_dir_files, check_links_inside, read_bounded

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order of preference
# Config fields that bound a model's positions (absolute or rotary embeddings), in the order they are tried.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")
# For a model with no position limit (Bloom's ALiBi) and a tokenizer with none either: a prompt past this costs
# attention memory quadratic in its length for no gain, since no such model was trained on longer text.
DEFAULT_CONTEXT = 2048
# tokenizers without a limit report model_max_length as 1e30; anything past this is such a placeholder.
MAX_SANE_CONTEXT = 1 << 20
# One prompt line, and all prompt lines of a file or stdin together: lines are read with a bounded readline, so a
# stream with no newline (/dev/zero) fails fast instead of filling memory.
MAX_PROMPT_CHARS = 16 << 20
MAX_PROMPTS_CHARS = 1 << 30
# A prompt past the context is cut to its end *before* it is tokenized (a 16 MiB prompt tokenized whole takes
# gigabytes): first to this many characters per token of the budget, then four times more while the tail still
# tokenizes to fewer than the budget plus TAIL_MARGIN tokens. The margin absorbs the tokens the cut itself
# changes (a word cut in two), which truncation then drops.
TAIL_CHARS_PER_TOKEN = 8
TAIL_MARGIN = 64

# The adapters the inference tools load: what ia3-dist trains. Anything else fails here, by name, instead of
# somewhere inside PEFT (or, for weights that match no module, not at all: PEFT only warns).
ADAPTER_PEFT_TYPE = "IA3"
ADAPTER_TASK_TYPE = "CAUSAL_LM"
# target_modules, feedforward_modules and exclude_modules may be a regular expression that PEFT full-matches
# against every module name. Only a small subset is accepted: no back-references or lookarounds, no repeated
# group, at most MAX_PATTERN_REPEATS repeats of single characters (each `.*` multiplies the backtracking of a
# failed match by the name length) and MAX_PATTERN_WAYS ways through its optional parts and ambiguous alternations
# (the product of their choices; alternatives that are words with distinct first characters leave one), so one
# match costs at most about 16 * len(name) ** 2 steps.
MAX_PATTERN = 256
MAX_PATTERN_REPEATS = 2
MAX_PATTERN_WAYS = 16
MAX_MODULE_NAMES = 4096
# modules_to_save names are pasted into a regex by PEFT: plain dotted names only.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]{1,256}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def read_adapter_config(d: Path) -> dict[str, Any]:
    """The adapter dir's adapter_config.json, checked for what PEFT and the base lookup need (UsageError naming the
    file otherwise, not a KeyError from inside PEFT)."""
    from peft import PeftType

    f = d / ADAPTER_CONFIG
    cfg = read_small_json(f, "adapter config")
    if not isinstance(cfg, dict):
        raise UsageError(f"{f}: expected a JSON object (PEFT's adapter config), got a {type(cfg).__name__}; "
                         f"re-save the adapter")
    peft_type = cfg.get("peft_type")
    if peft_type not in {t.value for t in PeftType}:
        raise UsageError(f"{f}: 'peft_type' is {_short(peft_type)}, not a PEFT adapter type such as \"IA3\"; "
                         f"re-save the adapter")
    if peft_type != ADAPTER_PEFT_TYPE:
        raise UsageError(f"{f}: 'peft_type' is {_short(peft_type)}; ia3-dist loads {ADAPTER_PEFT_TYPE} adapters "
                         f"only")
    if cfg.get("task_type") != ADAPTER_TASK_TYPE:
        raise UsageError(f"{f}: 'task_type' is {_short(cfg.get('task_type'))}, not \"{ADAPTER_TASK_TYPE}\"; "
                         f"ia3-dist loads causal-LM adapters only")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise UsageError(f"{f}: 'base_model_name_or_path' must be a string, got {type(base).__name__}; fix it or "
                         f"pass --base")
    return cfg


def _safe_pattern(p: str) -> str | None:
    """Why the regex ``p`` is not in the accepted subset (see :data:`MAX_PATTERN`), or None if it is."""
    try:  # the stdlib parser itself: what re.compile will run (re._parser from Python 3.11, sre_parse before)
        import re._constants as sre_c
        import re._parser as sre_p
    except ImportError:
        import sre_constants as sre_c
        import sre_parse as sre_p

    if len(p) > MAX_PATTERN:
        return f"{len(p)} characters, at most {MAX_PATTERN}"
    try:
        parsed = sre_p.parse(p)
    except (re.error, RecursionError, OverflowError) as e:
        return f"it does not compile: {e}"
    single = {sre_c.LITERAL, sre_c.NOT_LITERAL, sre_c.ANY, sre_c.IN, sre_c.CATEGORY}
    # Possessive repeats and atomic groups are Python 3.11's; before, such a pattern does not compile at all.
    repeats = {sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", sre_c.MAX_REPEAT)}
    atomic = getattr(sre_c, "ATOMIC_GROUP", sre_c.SUBPATTERN)

    def one_char(items: Any) -> bool:
        if len(items) != 1:
            return False
        op, av = items[0]
        return op in single or (op == sre_c.SUBPATTERN and one_char(av[-1]))

    def distinct_words(alternatives: Any) -> bool:
        """Alternatives that are plain words starting with different characters: at most one of them can match
        where the branch starts, so the matcher never comes back to try another."""
        firsts = []
        for alt in alternatives:
            if not len(alt) or any(op != sre_c.LITERAL for op, _ in alt):
                return False
            # Case-folded: under (?i) "a" and "A" (and the Kelvin sign and "k") match the same text.
            firsts.append(chr(alt[0][1]).casefold()[:1])
        return len(set(firsts)) == len(firsts)

    n, ways = 0, 1
    stack = [parsed]
    while stack:
        for op, av in stack.pop():
            if op in repeats:
                lo, hi, body = av
                if hi > 1:
                    if not one_char(body):
                        return "a repeated group: nested repetition backtracks exponentially"
                    n += 1
                else:
                    ways *= 2 if lo != hi else 1  # an optional part (?): two ways to match, tried in turn
                    stack.append(body)
            elif op == sre_c.SUBPATTERN or op == atomic:
                stack.append(av[-1] if op == sre_c.SUBPATTERN else av)
            elif op == sre_c.BRANCH:
                ways *= 1 if distinct_words(av[1]) else len(av[1])
                stack.extend(av[1])
            elif op not in single and op != sre_c.AT:
                return f"{str(op).lower()}: back-references and lookarounds are not accepted"
    if n > MAX_PATTERN_REPEATS:
        return f"{n} repetitions, at most {MAX_PATTERN_REPEATS}: each one multiplies the matching work"
    if ways > MAX_PATTERN_WAYS:
        # Each optional part, and each alternation whose alternatives may match the same text, multiplies the ways
        # the matcher tries before it fails: ".?" 100 times never ends.
        shown = ways if ways < 10**6 else "over a million"
        return (f"its optional parts and alternations with overlapping alternatives make {shown} ways to try, at "
                f"most {MAX_PATTERN_WAYS}: each one multiplies the matching work")
    return None


def _check_module_fields(cfg: dict[str, Any], where: str) -> None:
    """The adapter config's module selectors, checked before PEFT matches them against every module name."""
    for key in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, str) and key != "modules_to_save":
            why = _safe_pattern(v)
            if why:
                raise UsageError(f"{where} ('{key}' is not an accepted regular expression: {why}; give a list of "
                                 f"module names instead)")
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise UsageError(f"{where} ('{key}' must be a list of module names, got {_short(v)})")
        if len(v) > MAX_MODULE_NAMES or any(len(x) > 256 for x in v):
            raise UsageError(f"{where} ('{key}': at most {MAX_MODULE_NAMES} names of at most 256 characters)")
        if key == "modules_to_save" and not all(PLAIN_NAME.fullmatch(x) for x in v):
            raise UsageError(f"{where} ('modules_to_save' names may hold only letters, digits, '_' and '.')")
    for key in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise UsageError(f"{where} ('{key}' must be true or false, got {_short(cfg[key])})")


def _check_local_model(path: str, what: str) -> None:
    if looks_local(path):
        check_model_dir(path, what)


def _cannot_load(what: str, path: str, e: Exception) -> UsageError:
    """The error for a failed load; where the dir names custom code (``auto_map``), that is the reason given:
    transformers refuses it because trust_remote_code is off, and it stays off."""
    p = Path(path).expanduser()
    for name in ("config.json", "tokenizer_config.json"):
        f = p / name
        try:
            if f.is_file() and f.stat().st_size <= MAX_SMALL_JSON:
                obj = json.loads(f.read_bytes())
                if isinstance(obj, dict) and obj.get("auto_map"):
                    return UsageError(f"{what} {path}: cannot load it without running the custom code that {f} "
                                      f"names (auto_map: {_short(obj['auto_map'])}); ia3-dist never runs code "
                                      f"from a model, adapter or tokenizer dir")
        except (OSError, ValueError, RecursionError):
            pass
    return UsageError(f"{what} {path}: cannot load it ({error_line(e)})")


def _from_pretrained(path: str, dtype: torch.dtype | str, what: str, revision: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        with no_code_prompt():
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                        revision=revision, use_kernels=HUB_KERNELS)
    except Exception as e:  # transformers raises many types for bad dirs and hub names; all mean "cannot load it"
        raise _cannot_load(what, path, e) from None


def _load_adapter(model: Any, d: Path, base_path: str) -> Any:
    """``PeftModel.from_pretrained(model, d)`` as PEFT does it, keeping the load result that it only warns about:
    every IA3 vector of the model must come from the file and every tensor of the file must land in the model,
    else the adapter is not for this base (an export would write the base unchanged)."""
    from peft import IA3Config, PeftModelForCausalLM

    where = f"{d}: cannot load the adapter onto {base_path}"
    try:
        config = IA3Config.from_pretrained(str(d))
        config.inference_mode = True
        pm = PeftModelForCausalLM(model, config)
        result = pm.load_adapter(str(d), "default", key_mapping=getattr(model, "_checkpoint_conversion_mapping", {}))
    except Exception as e:  # PEFT raises many types (KeyError, TypeError, ValueError...) for one cause
        # torch's load_state_dict puts the tensor and both shapes on the lines after its first.
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
        why = f"{error_line(e)} {detail[:300]}".strip() if detail else error_line(e)
        raise UsageError(f"{where} ({why}); was it trained on this base model?") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        what = (f"{len(missing)} IA3 vector(s) of the model are not in its weights, e.g. {missing[0]}" if missing
                else f"{len(unexpected)} tensor(s) in its weights match no module, e.g. {unexpected[0]}")
        raise UsageError(f"{where} ({what}); was it trained on this base model?")
    check_finite({n: q for n, q in pm.named_parameters() if "ia3_l" in n}, str(d),
                 "the adapter is damaged or from a diverged run: use another checkpoint's")
    return pm.eval()


EXPORT_MARKER = ".ia3-dist-export.json"
"""What ``ia3-dist export`` records in its dir (tools/export.py): ``complete`` is false while it moves files in."""
MAX_EXPORT_MARKER = 1 << 20  # a list of a few dozen file names


def read_export_marker(d: Path) -> dict[str, Any] | None:
    """``ia3-dist export``'s marker in ``d``, or None where there is no readable one of ours. Bounded, and a link
    or FIFO is no marker: the dir may hold anything, and /dev/zero or a FIFO with no writer would hang a plain
    read."""
    try:
        raw = read_bounded(d / EXPORT_MARKER, MAX_EXPORT_MARKER, follow=False, missing_ok=True)
        marker = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (UsageError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "ia3-dist export" else None


def _check_export_finished(d: Path) -> None:
    """A merged dir that ``ia3-dist export --force`` was replacing when it was killed may hold new shards beside
    old ones of the same names, which load without complaint: refused, naming the fix."""
    marker = read_export_marker(d)
    if marker is not None and marker.get("complete") is False:
        raise UsageError(f"{d}: an `ia3-dist export` into it was stopped while it moved the merged model in (its "
                         f"{EXPORT_MARKER} says so), so its files may mix two exports; run the export again with "
                         f"--force")


def load_for_inference(path: str, base: str | None = None, dtype: str = "fp32") -> tuple[Any, Any, Template, bool]:
    """``(model, tokenizer, template, is_adapter)`` from an adapter dir (base from its adapter_config.json unless
    ``base`` is given) or a merged model dir. The template is the one saved beside the weights (training's), else
    :func:`default_template`. Every file is checked before it is loaded: bad input is a UsageError naming the
    file."""
    from transformers import AutoTokenizer, GenerationConfig

    d = Path(path).expanduser()
    if not d.is_dir():
        staged = d.with_name(d.name + ADAPTER_NEW)
        if staged.is_dir() and not staged.is_symlink():
            # runtime/adapter.py save_adapter writes <dir>.new, flushes it, sets the old one aside, renames it.
            if set_aside(d):
                raise UsageError(f"{path}: no such directory; its run was stopped between the two renames that put "
                                 f"a new adapter in place: {staged.name} holds it, complete: rename it to {d.name} "
                                 f"(or resume the run, train.resume=auto, which writes it again)")
            raise UsageError(f"{path}: no such directory; its run was stopped while it wrote the adapter (into "
                             f"{staged.name}): resume the run (train.resume=auto), which writes it again")
        raise UsageError(f"{path}: no such directory (give an adapter dir, e.g. runs/x/adapter, or a merged dir)")
    check_dir_files(d, "adapter or model dir")
    check_links_inside(d, "adapter or model dir")
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]  # auto: the weights' stored dtype (export)
    is_adapter = (d / ADAPTER_CONFIG).is_file()
    template = _load_template(d)
    hub_revision = None  # the version to ask the hub for, where the base is read by its hub id
    if is_adapter:
        cfg = read_adapter_config(d)
        base_path = base or cfg.get("base_model_name_or_path")
        if not base_path:
            raise UsageError(f"{d / ADAPTER_CONFIG} names no base model; pass --base")
        weights = next((d / w for w in ADAPTER_WEIGHTS if (d / w).is_file()), None)
        if weights is None:
            raise UsageError(f"{d}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); the adapter was not saved "
                             f"completely")
        check_weight_file(weights)
        what = "base model" + ("" if base else f" (from {d / ADAPTER_CONFIG}; --base overrides it)")
        _check_module_fields(cfg, f"{d}: cannot load the adapter onto {base_path}")
        base_name = base_path
        base_path, hub_revision = _base_source(d, cfg, base)
        if Path(base_path).expanduser().is_dir():
            check_dir_files(Path(base_path).expanduser(), "base model dir")
        _check_local_model(base_path, what)
        if not base:
            _check_trained_base(d, base_path)
        tok_src = str(d) if has_tokenizer_files(d) else base_path
    elif (d / "config.json").is_file():
        _check_export_finished(d)
        check_model_dir(str(d), "merged model")
        tok_src = str(d)
    else:
        raise UsageError(f"{d}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)")
    # The tokenizer first: a corrupt one fails in a second, not after the whole model has loaded.
    try:
        with no_code_prompt():
            tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=False,
                                                revision=None if Path(tok_src).expanduser().is_dir() else hub_revision)
    except Exception as e:  # tokenizers raise many types for corrupt files
        raise _cannot_load("tokenizer", tok_src, e) from None
    if is_adapter:
        model = _load_adapter(_from_pretrained(base_path, torch_dtype, what, hub_revision), d,
                              base_name)
    else:
        model = _from_pretrained(str(d), torch_dtype, "merged model")
    check_vocab(tok, model.config, f"tokenizer {tok_src}")
    if not (d / TEMPLATE_FILE).is_file():
        template = default_template(tok, f"tokenizer {tok_src} chat_template")
    gen_file = _generation_file(base_path if is_adapter else str(d), hub_revision)
    gen_eos = _generation_eos(gen_file)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"tokenizer {tok_src}: no pad or eos token, so prompts cannot be batched; add an eos "
                             f"token to its special_tokens_map.json")
        pad_with_eos(tok)
    # Tried once here so a template that cannot render (or runs past its budget) fails naming its source.
    template.prompt_for([], "", "hello", "", tok)
    # Of the dir's generation_config.json only the eos ids and a repetition penalty are kept: the rest could ask for
    # a thousand beams or a decoding mode that only custom code provides. generate and chat decode as GenOptions
    # says (its repetition_penalty is always passed); lm-eval's generate_until tasks pass their own settings and
    # leave the penalty to the model's, as `lm_eval --model hf` on the merged export does (Qwen2's instruct
    # models ship 1.05-1.1: dropped, greedy answers differed from the lm-eval CLI's).
    penalty = _generation_penalty(gen_file)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids(tok, template, gen_eos) or None,
                                               **({"repetition_penalty": penalty} if penalty is not None else {}))
    return model.eval(), tok, template, is_adapter


def _check_trained_base(adapter: Path, base_path: str) -> None:
    """The base dir its adapter_config.json names holds the weights the adapter was trained on, where the adapter
    records them (ia3-dist's adapters do: ``base_weights`` in its step record); a dir replaced by other weights of
    the same architecture since would load, and answer, as another model. ``--base`` skips this: it names the
    weights to use."""
    rec = adapter_record(adapter)
    want = rec.get("base_weights") if rec is not None else None
    b = Path(base_path).expanduser()
    if not isinstance(want, str) or not b.is_dir():
        return
    now = weights_fingerprint(b)
    if comparable(want, now) and now != want:
        raise UsageError(f"{adapter}: trained on other weights than {base_path} holds now (their fingerprint "
                         f"{want}, now {now}: the dir was replaced or retrained since). Give --base the weights it "
                         f"was trained on, or --base {base_path} to load it onto these anyway")


def _base_source(d: Path, cfg: dict[str, Any], base: str | None) -> tuple[str, str | None]:
    """``(where the base loads from, the hub revision to ask for)`` of the adapter in ``d`` (its
    adapter_config.json ``cfg``): ``base``, else the base it names at the version it was trained on (ia3-dist
    records the hub base's commit; --base names its own), taken whole from the hub cache's snapshot where there is
    one (no revision to ask for then)."""
    name = base or cfg.get("base_model_name_or_path")
    revision = None if base else _revision(cfg, d)
    snapshot = cached_snapshot(name, revision)
    return (str(snapshot), None) if snapshot is not None else (name, revision)


def base_weights_of(adapter: Path, base: str | None = None) -> str | None:
    """The fingerprint (:func:`weights_fingerprint`) of the base weights the adapter in ``adapter`` loads onto:
    ``base``, else the base its adapter_config.json names (its hub snapshot where cached, at the recorded revision).
    None where no local weights are found: a hub base not cached, or a dir without weight files, which the load
    itself then names."""
    cfg = read_adapter_config(adapter)
    name = base or cfg.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    d = Path(_base_source(adapter, cfg, base)[0]).expanduser()
    if not d.is_dir():
        return None
    try:
        checkpoint_files(d)
    except UsageError:  # no weight files: load_for_inference says so, naming the dir
        return None
    return weights_fingerprint(d)


def _revision(cfg: dict[str, Any], d: Path) -> str | None:
    rev = cfg.get("revision")
    if rev is not None and not (isinstance(rev, str) and 0 < len(rev) <= 256):
        raise UsageError(f"{d / ADAPTER_CONFIG}: 'revision' must be a hub revision (a commit, branch or tag), got "
                         f"{show(rev)}; fix it or pass --base")
    return rev


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The hub cache's snapshot of the hub model ``repo_id`` when it holds the config and every weight file that
    loads; None for a local path, a model not cached, or a partial snapshot (``ia3-dist prepare`` caches the config
    and tokenizer only), which the hub id then loads (and downloads) as before.

    Taken whole from the cache, with no hub request: an adapter trained on a hub base is mostly used where that
    base was trained, so its snapshot is there, and offline (a compute node) each file's request would otherwise
    be retried for some 20 s before transformers falls back to the same cached file (three minutes per load)."""
    if looks_local(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id: from_pretrained names the problem
        return None
    if not isinstance(hit, str):
        return None
    d = Path(hit).parent
    try:
        files = checkpoint_files(d)
    except UsageError:  # no weights, or an unreadable index: loading the hub id reports it
        return None
    return d if all(f.is_file() for f in files) else None


GENERATION_CONFIG = "generation_config.json"


def _generation_file(model_path: str, revision: str | None = None) -> dict[str, Any]:
    """A model's generation_config.json (local dir, or the hub cache: nothing is downloaded for it); empty when
    there is none or it is unusable: only hints for decoding, the model itself was checked and loaded."""
    from ..runtime.safe_io import read_bounded

    p = Path(model_path).expanduser()
    f: Path | None = p / GENERATION_CONFIG
    if not p.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model_path, GENERATION_CONFIG, revision=revision)
            f = Path(hit) if isinstance(hit, str) else None
        except Exception:  # not a repo id, or no cache: there is no file to read
            f = None
    if f is None:
        return {}
    try:
        # follow: the hub cache links its files; read_bounded still refuses FIFOs and devices.
        raw = read_bounded(f, MAX_SMALL_JSON, follow=True, missing_ok=True)
        obj = json.loads(raw.decode("utf-8")) if raw else None
    except (UsageError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _generation_eos(gen: dict[str, Any]) -> list[int]:
    """The ``eos_token_id`` list of a generation_config.json's contents. Instruct models list their end-of-turn
    token there (Llama 3's <|eot_id|>), not in the tokenizer."""
    v = gen.get("eos_token_id")
    ids = v if isinstance(v, list) else [v]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


MAX_REPETITION_PENALTY = 10.0
"""Past this a generation_config.json's repetition_penalty is no model's setting (1.0-1.3 in practice): ignored."""


def _generation_penalty(gen: dict[str, Any]) -> float | None:
    """A generation_config.json's ``repetition_penalty`` when it is one a model ships (a number in
    (0, MAX_REPETITION_PENALTY], not 1.0, which changes nothing); None otherwise."""
    v = gen.get("repetition_penalty")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v) if 0 < v <= MAX_REPETITION_PENALTY and v != 1.0 else None


END_PROBE = "Zq7 end of answer"


def end_of_turn_ids(tok: Any, template: Template) -> list[int]:
    """The special token(s) ``template`` writes right after an assistant's answer (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, eos with append_eos): what the model was trained to emit when it is done, so what generation must
    stop on. Found by rendering a one-turn conversation, since templates spell it in many ways."""
    try:
        segs = template.segments(Conversation([Turn("hello", "", END_PROBE)]), tok)
        answer = next(text for text, label in segs if label)
    except (UsageError, StopIteration):
        return []
    at = answer.find(END_PROBE)
    if at < 0:
        return []
    special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                                           if getattr(t, "special", False)}
    out: list[int] = []
    for i in tok(answer[at + len(END_PROBE):], add_special_tokens=False)["input_ids"]:
        if i not in special:
            break
        out.append(i)
    return out


def stop_ids(tok: Any, template: Template, extra: list[int] = ()) -> list[int]:  # type: ignore[assignment]
    """Every id that ends an answer: ``extra`` (generation_config.json's), the tokenizer's eos and the template's
    end of turn, each once, in vocab."""
    ids = [*extra, tok.eos_token_id, *end_of_turn_ids(tok, template)]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < len(tok)))


def default_template(tok: Any, where: str = "the tokenizer's chat_template") -> Template:
    """The format for a model or adapter that saved none (not trained by ia3-dist, or a plain hub model): the
    tokenizer's own chat template when it ships one (Llama 3, Qwen2.5, Mistral instruct models), the model's
    native format; else the reference recipe's ``Human: ... Assistant:``."""
    text = tokenizer_template(tok, where, "give the adapter's training template (ia3_dist.json) or a model dir "
                                          "with a default chat template")
    if text:
        return Template(CHAT_TEMPLATE, chat_template=text).checked(where)
    return Template()


def _load_template(d: Path) -> Template:
    """The saved template, tried once so a broken one fails here naming its file, not mid-generation."""
    t = Template.load(d)
    try:
        t.prompt("", "")
        if not isinstance(t.response_prefix, str):
            raise TypeError(f"response_prefix is a {type(t.response_prefix).__name__}")
    except Exception as e:  # str.format raises KeyError/IndexError/ValueError/AttributeError for bad templates
        raise UsageError(f"{d / TEMPLATE_FILE}: unusable prompt template ({error_line(e)}); fields may use only "
                         f"{{instruction}} and {{input}}") from None
    return t


def context_limit(model: Any, tok: Any) -> tuple[int, bool]:
    """``(tokens, hard)``: the model's position limit from its config, else (no limit, e.g. ALiBi) the tokenizer's
    ``model_max_length`` when it is a real one, else :data:`DEFAULT_CONTEXT`. ``hard`` when it came from the
    config: positions past it do not exist."""
    cfg = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return min(v, MAX_SANE_CONTEXT), True
    m = getattr(tok, "model_max_length", None)
    if isinstance(m, int) and 0 < m <= MAX_SANE_CONTEXT:
        return m, False
    return DEFAULT_CONTEXT, False


def prompt_budget(model: Any, tok: Any, max_new_tokens: int) -> tuple[int, int]:
    """``(prompt tokens, context)``: how many prompt tokens fit beside ``max_new_tokens`` new ones."""
    ctx, hard = context_limit(model, tok)
    budget = ctx - max_new_tokens
    if hard and budget < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                         f"of {ctx} tokens; use at most {ctx - 1}")
    # With no hard limit a long generation may run past ctx; the prompt still keeps a useful share of it.
    return (budget if hard else max(budget, ctx // 2)), ctx


def read_prompt_lines(fh: TextIO, src: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a prompts stream, read a bounded line at a time;
    UsageError naming ``src`` and the line for an over-long line, undecodable text or a read error."""
    out: list[tuple[int, str]] = []
    n = total = 0
    while True:
        try:
            line = fh.readline(MAX_PROMPT_CHARS + 1)
        except UnicodeDecodeError as e:
            raise UsageError(f"{src}:{n + 1}: not UTF-8 ({e.reason}); re-encode it as UTF-8") from None
        except OSError as e:
            raise UsageError(f"{src}: cannot read it ({e.strerror or e})") from None
        if not line:
            return out
        n += 1
        if n == 1:
            line = line.removeprefix("\ufeff")  # a BOM (Windows editors write one): the training reader drops it too
        if len(line) > MAX_PROMPT_CHARS and not line.endswith(("\n", "\r")):
            raise UsageError(f"{src}:{n}: line longer than {MAX_PROMPT_CHARS} characters, the limit for one prompt "
                             f"(prompts are one per line)")
        total += len(line)
        if total > MAX_PROMPTS_CHARS:
            raise UsageError(f"{src}: more than {MAX_PROMPTS_CHARS} characters of prompts; split it into smaller "
                             f"files")
        if line.strip():
            out.append((n, line))


@dataclass
class GenOptions:
    max_new_tokens: int = 128
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    repetition_penalty: float = 1.0


def prompt_ids(template: Template, conv: Conversation, tok: Any, budget: int) -> tuple[list[int], bool]:
    """The ids a model continues to answer the last turn of ``conv``, encoded as training encodes the
    conversation (its pieces apart: :meth:`Template.prompt_pieces`), cut to their last ``budget``; and whether they
    were cut. Encoded from the end, each piece only as far back as the budget needs (:func:`cut_to_tail`)."""
    add = template.add_special_tokens
    lead = leading_added(tok) if add else ()
    pieces = template.prompt_pieces(conv, tok)
    # What a cut keeps at the start, as training's (tokenize.head_length): the BOS the model always saw first.
    head = list(lead) if add else ([tok.bos_token_id] if tok.bos_token and pieces and pieces[0].startswith(
        tok.bos_token) else [])
    head = head if len(head) < budget else []
    ids: list[int] = []
    for k in range(len(pieces) - 1, -1, -1):
        if len(ids) >= budget - len(head):  # the earlier pieces fall outside the budget
            return head + ids[len(ids) - budget + len(head):], True
        piece = tok(cut_to_tail(tok, pieces[k], budget - len(ids), add), add_special_tokens=add)["input_ids"]
        ids = template.piece_ids(piece, k, lead) + ids
    if len(ids) <= budget:
        return ids, False
    return head + ids[len(ids) - budget + len(head):], True


def cut_to_tail(tok: Any, text: str, budget: int, add_special_tokens: bool = True) -> str:
    """``text``, or an end of it long enough that its last ``budget`` tokens are those of the whole text (see
    :data:`TAIL_CHARS_PER_TOKEN`): tokenizing costs what the tail costs, not what the text does."""
    n = max(budget, 1) * TAIL_CHARS_PER_TOKEN
    while n < len(text):
        tail = text[-n:]
        if len(tok(tail, add_special_tokens=add_special_tokens)["input_ids"]) >= budget + TAIL_MARGIN:
            return tail
        n *= 4
    return text


def generate(model: Any, tok: Any, template: Template, requests: list[Conversation], opts: GenOptions,
             batch_size: int = 8) -> list[str]:
    """The answer to the last turn of each conversation (its output is ignored), after the earlier turns, encoded
    as training encodes them (:func:`prompt_ids`). A prompt longer than the model's context (minus
    ``max_new_tokens``) keeps its last tokens, where the response prefix is, and stderr says so once per call.
    Sampled, prompt ``i`` draws from its own seed (``opts.seed`` + i), one prompt at a time: its answer does not
    depend on the prompts batched with it or after it."""
    torch.manual_seed(opts.seed)
    if opts.sample:
        batch_size = 1
    budget, ctx = prompt_budget(model, tok, opts.max_new_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # The generation config's ids (load_for_inference put generation_config.json's there) and the template's end
    # of turn: a model trained on a chat template ends its answer with that, not with eos.
    known = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = stop_ids(tok, template, known if isinstance(known, list) else [known])
    outs: list[str] = []
    cut = 0
    for i in range(0, len(requests), batch_size):
        got = [prompt_ids(template, c, tok, budget) for c in requests[i:i + batch_size]]
        cut += sum(was_cut for _, was_cut in got)
        width = max(len(ids) for ids, _ in got)
        # Padded on the left: decoder-only generation continues from the right edge.
        enc = {"input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in got]),
               "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in got])}
        kw: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.sample,
                              "pad_token_id": pad, "eos_token_id": eos,
                              "repetition_penalty": opts.repetition_penalty}
        if opts.sample:
            kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
            torch.manual_seed((opts.seed + i) % 2**64)
        with torch.no_grad():
            ids = model.generate(**enc, **kw)
        outs += [answer_text(tok, row, eos) for row in ids[:, width:].tolist()]
    if cut:
        print(f"note: {cut} prompt(s) longer than {budget} tokens were cut to their last {budget} (the context of "
              f"{ctx} tokens less --max-new-tokens {opts.max_new_tokens})", file=sys.stderr, flush=True)
    return outs


# A UTF-8 character is at most 4 bytes, so an incomplete one at the end of a cut answer spans at most 3 byte tokens.
MAX_PARTIAL_TOKENS = 3


def answer_text(tok: Any, new_ids: list[int], stop: list[int]) -> str:
    """The text of one generated row: up to its first stop id (what follows is padding, and a stop id that is
    not a special token would otherwise be decoded into the answer). An answer cut by ``max_new_tokens`` in the
    middle of a character that byte-level tokenizers spell in several tokens (most CJK characters outside the
    vocabulary, emoji) would end in U+FFFD: its incomplete tokens are dropped instead."""
    stops = set(stop)
    end = next((k for k, i in enumerate(new_ids) if i in stops), None)
    ids = new_ids if end is None else new_ids[:end]
    text = tok.decode(ids, skip_special_tokens=True)
    if end is None and text.endswith("\ufffd"):
        for k in range(1, min(MAX_PARTIAL_TOKENS, len(ids)) + 1):
            shorter = tok.decode(ids[:-k], skip_special_tokens=True)
            if not shorter.endswith("\ufffd"):
                text = shorter
                break
    return text.strip()


def _text(v: Any, where: str, what: str) -> str:
    if not isinstance(v, str):
        raise UsageError(f"{where}: {what} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes or a JSON \ud800 escape; tokenizers reject them
        raise UsageError(f"{where}: not valid Unicode text (undecodable bytes or an unpaired \\uD800-\\uDFFF "
                         f"escape)") from None
    return v


# The roles the training data's parser reads by default (data.formats: ShareGPT's product names for the assistant,
# OpenAI's developer for system), so a prompt in the shape of a training record reads the same here.
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
                "bing": "assistant", "bard": "assistant", "system": "system", "developer": "system"}


def _from_messages(msgs: Any, where: str, role_key: str, content_key: str) -> Conversation:
    """A conversation that ends with the user's turn to answer: [system], user, assistant, ..., user."""
    from ..data.formats import content_text

    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: expected a non-empty list of messages")
    system = ""
    turns: list[Turn] = []
    pending: str | None = None
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UsageError(f"{where}: message {k} is not an object")
        raw_role = m.get(role_key)
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        # A string or OpenAI's text content parts, as the training data's parser reads them.
        content = content_text(m.get(content_key), f"message {k} {content_key}", where)
        if role is None:
            raise UsageError(f"{where}: message {k} has role {show(raw_role)}; use system, user or assistant")
        if role == "system" and k == 0:
            system = content
        elif role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            turns.append(Turn(pending, "", content))
            pending = None
        else:
            raise UsageError(f"{where}: message {k} ({role}) is out of order; messages alternate user and "
                             f"assistant after an optional system message")
    if pending is None:
        raise UsageError(f"{where}: the last message must be the user's (the one to answer)")
    return Conversation([*turns, Turn(pending, "", "")], system)


TOOL_ROLES = ("tool", "function_call", "observation")
MAX_TOOLS_FILE = 1 << 20


def read_tools(path: str) -> tuple[dict[str, Any], ...]:
    """``--tools FILE``: a JSON list of function schemas (bare or ``{"type": "function", "function": ...}``)."""
    from ..data.tools import tool_list
    from ..runtime.safe_io import read_bounded

    raw = read_bounded(Path(path), MAX_TOOLS_FILE, fix="give a JSON list of tool schemas", label="--tools ",
                       follow=True) or b""  # never None: missing_ok is off, a missing file is a UsageError
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--tools {path}: not UTF-8 ({e.reason})") from None
    return tool_list(text, "the tools", f"--tools {path}")


def _uses_tools(obj: dict[str, Any]) -> bool:
    msgs = obj.get("messages", obj.get("conversations"))
    return obj.get("tools") is not None or (isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role", m.get("from")) in TOOL_ROLES or "tool_calls" in m) for m in msgs))


def _tool_request(obj: dict[str, Any], where: str) -> Conversation:
    """A request with tools or tool turns, read by the training data's own parser (the same shapes, the same
    checks): it ends with the user's message or the tools' results, the turn to answer."""
    from ..data.formats import MESSAGES, SHAREGPT, Columns, to_conversation

    fmt, key, role, content = ((MESSAGES, "messages", "role", "content") if "messages" in obj else
                               (SHAREGPT, "conversations", "from", "value"))
    msgs = obj.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: a request with tools needs 'messages' (or 'conversations') ending with the "
                         f"user's message or the tools' results")
    last = msgs[-1].get(role) if isinstance(msgs[-1], dict) else None
    if last in ("assistant", "gpt", "function_call") or (isinstance(msgs[-1], dict) and "tool_calls" in msgs[-1]):
        raise UsageError(f"{where}: the last message must be the user's or a tool result (the turn to answer)")
    return to_conversation({**obj, key: [*msgs, {role: "assistant" if fmt == MESSAGES else "gpt", content: ""}]},
                           fmt, Columns(None), where)


def parse_request(line: str, where: str) -> Conversation:
    """A prompt line: plain text, or JSON as the training data spells it: ``{"instruction", "input", "system",
    "history"}``, ``{"messages": [{role, content}...]}`` or ``{"conversations": [{from, value}...]}``, ending with
    the user's turn to answer."""
    s = line.strip()
    if not s.startswith("{"):
        return Conversation([Turn(_text(s, where, "the prompt"), "", "")])
    try:
        obj = parse_json(s, where, one_line=True)
    except UsageError as e:
        raise UsageError(f"{e} (a prompt starting with '{{' is read as a JSON request; to ask it as plain text, "
                         f"send it as {{\"instruction\": \"...\"}})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: a JSON prompt must be an object")
    if ("messages" in obj or "conversations" in obj) and _uses_tools(obj):
        return _tool_request(obj, where)
    if "messages" in obj or "conversations" in obj:
        # A top-level system goes with either shape, as in the training data (data.formats).
        conv = (_from_messages(obj["messages"], where, "role", "content") if "messages" in obj else
                _from_messages(obj["conversations"], where, "from", "value"))
        if "system" in obj:
            if conv.system:
                raise UsageError(f"{where}: both a leading system message and a top-level 'system'; keep one")
            conv.system = _text(obj["system"], where, "system")
        return conv
    if obj.get("instruction") is None:
        raise UsageError(f"{where}: a JSON prompt needs 'instruction' (and optional 'input', 'system', 'history', "
                         f"'tools'), 'messages' or 'conversations'")
    # Read by the training data's own parser: the same shapes (nulls as absent, history as pairs, tools), the
    # same checks; its answer, if the line is a training record, is the one to generate.
    from ..data.formats import ALPACA, Columns, to_conversation

    return to_conversation({**obj, "output": ""}, ALPACA, Columns(None), where)
