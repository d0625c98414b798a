"""The run config's schema: one dataclass per YAML section, each field documented, checks in ``__post_init__``.

Loading (YAML, overrides, type coercion, unknown keys) is in :mod:`ia3_dist.config.load`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import reprlib
import string
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import UsageError
from .archs import ARCHS

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow")


SHOW_CHARS = 200
"""Longest quote of a user value in an error message: a hostile value can be megabytes (or, expanded, gigabytes)."""
MAX_TEXT = 4096
"""Longest prompt template or response prefix: both are repeated in every example."""
MAX_STEPS = 10**9
MAX_GRAD_ACCUM = 65536
"""Bound on ``train.grad_accum`` (and the accumulation ``train.global_batch_size`` makes): preflight plans every
micro-step of a step."""
MAX_SOURCES = 256
"""Sources one mixture may name: each is read, hashed and reported on its own."""
"""Bound on every step count and interval: far beyond any real run, small enough that no arithmetic overflows."""


class _BoundedRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 6, 8, 8, 8
        self.maxstring, self.maxother = SHOW_CHARS, SHOW_CHARS

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int over 4300 digits raises ValueError instead of printing.
        if x.bit_length() > 256:
            return f"<integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _BoundedRepr()


def show(value: Any) -> str:
    """``repr(value)`` for an error message, at most about :data:`SHOW_CHARS` characters and on one line, in time
    bounded by the limit rather than the value's size."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "..."


def brief(text: str) -> str:
    """``text`` as it is when short and printable (a key, a path); otherwise escaped and shortened like
    :func:`show`, without the quotes, so the message stays one short line."""
    return text if len(text) <= SHOW_CHARS and text.isprintable() else show(text)[1:-1]


class ConfigKeyError(UsageError):
    """A bad value of one config key; :func:`~ia3_dist.config.load.load_config` uses ``key`` to say where it was
    set (the file's line, or the override)."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(f"config key '{brief(key)}': {msg}")
        self.key, self.msg = key, msg

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled between processes (a worker's error): rebuilt from both parts, not from the one message.
        return type(self), (self.key, self.msg)


def fail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigKeyError(key, msg)


def home(path: str) -> str:
    """``path`` with a leading ``~`` expanded, once when the config is built: every reader of the setting (the run,
    ``ia3-dist eval``, the Slurm and sweep tools) then names the same directory. Hub names never start with ``~``."""
    return os.path.expanduser(path) if path.startswith("~") else path


def _in_range(key: str, value: int | float, lo: int | float, hi: int | float) -> None:
    if value < lo:
        fail(key, f"must be >= {lo}, got {show(value)}")
    if value > hi:
        fail(key, f"must be <= {hi}, got {show(value)}")


MIN_WEIGHT, MAX_WEIGHT = 1e-9, 1e9
"""The range of a ``data.sources`` weight."""


def _finite(key: str, value: float, lo: float = 0.0, strict: bool = False) -> None:
    """``value`` must be finite and >= ``lo`` (> ``lo`` when ``strict``): NaN compares false with everything, so
    ``value < lo`` alone would let it through to the optimizer."""
    if not math.isfinite(value) or value < lo or (strict and value == lo):
        fail(key, f"must be a finite number {'>' if strict else '>='} {lo}, got {show(value)}")


def _check_template(key: str, template: str) -> None:
    """Only plain ``{instruction}`` and ``{input}``: a format spec such as ``{instruction:>99999999999}`` asks
    str.format for gigabytes, and attribute or index access reaches into objects."""
    allowed = "only plain {instruction} and {input} fields are allowed (write a literal brace as {{ or }})"
    if len(template) > MAX_TEXT:
        fail(key, f"{len(template)} characters; at most {MAX_TEXT}")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        fail(key, f"bad template ({e}); {allowed}")
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in ("instruction", "input") or spec or conversion is not None:
            text = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            fail(key, f"field {show(text)} is not allowed; {allowed}, with no format spec, conversion, index "
                      f"or attribute")
    if "instruction" not in {name for _, name, _, _ in fields}:
        # Every prompt would lose its instruction: the model learns answers to questions it is never shown.
        fail(key, f"has no {{instruction}} field; put it where the instruction belongs (the default is "
                  f"{show(PROMPT_DEFAULT)})")


PROMPT_DEFAULT = "Human: {instruction}\n{input}"
"""The reference recipe's prompt: ``"\n".join(["Human: " + instruction, input])``."""
ATTENTIONS = ("auto", "sdpa", "eager", "flex")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class ModelSection:
    path: str = "demo:tiny-bloom"
    """Local model dir or hub name for ``AutoModelForCausalLM.from_pretrained``; ``demo:tiny-bloom`` builds the
    embedded tiny Bloom once and caches it."""
    tokenizer: str | None = None
    """Tokenizer dir or hub name; defaults to ``model.path``."""
    arch: str | None = None
    """A shipped shape (Bloom: bloom-560m .. bloom, bloom-1b4-zh; llama-3.2-1b/3b, llama-3.1-8b/70b;
    qwen2.5-0.5b .. qwen2.5-72b; mistral-7b, mistral-7b-v0.3; all in ``ia3_dist/config/archs.py``), so
    ``ia3-dist plan`` works without weights or network."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for model and tokenizer."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repo. Off unless set: it runs code from the repo."""
    fused_gelu: bool = True
    """Run Bloom's tanh GeLU as one fused kernel (same formula; last-bit rounding differs, max 5e-7)."""
    attention: str = "auto"
    """Bloom's attention: ``sdpa`` (``scaled_dot_product_attention`` with the ALiBi bias as its mask: same maths,
    the probabilities are not kept for the backward pass, so it needs less memory), ``eager`` (transformers' own),
    ``flex`` (FlexAttention with ALiBi as a score modification: same maths; fused when compiled), or ``auto``:
    eager, the faster one where measured (an H200 in bf16: eager 1.33x SDPA, whose float ALiBi mask rules out the
    flash kernel; CPU: the same speed within noise). Families without an alternative ignore it."""
    last_mlp_at_labels: bool = True
    """Run the last layer's MLP only at positions that predict a label token (no other position reaches the
    loss). Off by itself under gradient checkpointing, whose recomputation would see all positions."""

    def __post_init__(self) -> None:
        if not self.path:
            fail("model.path", "must be a model directory or hub name")
        self.path = home(self.path)
        if self.tokenizer is not None:
            self.tokenizer = home(self.tokenizer)
        if self.arch is not None and self.arch not in ARCHS:
            fail("model.arch", f"unknown {show(self.arch)}; known: {', '.join(ARCHS)}")
        if self.attention not in ATTENTIONS:
            fail("model.attention", f"must be one of {'|'.join(ATTENTIONS)}, got {show(self.attention)}")


FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt")
# What data.columns may map: record columns, message keys, role values.
COLUMN_NAMES = ("instruction", "input", "output", "system", "history", "conversations", "messages", "role",
                "content", "user", "assistant", "prompt", "chosen", "rejected", "tools", "function_call",
                "observation", "tool", "system_role")
# Parts of a record that one format reads together (alpaca; pairs with a prompt, or alpaca-style with an
# instruction), so no two may share a column. (prompt: instruction is how alpaca-style pairs are mapped.)
READ_TOGETHER = (("instruction", "input", "output", "system"), ("prompt", "chosen", "rejected", "system"),
                 ("instruction", "input", "chosen", "rejected", "system"))
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
# What an evaluation on the held-out data reports, by objective (the eval lines of metrics.jsonl): the metrics
# train.early_stopping and checkpoint.keep_best may follow.
EVAL_METRICS = {"sft": ("eval_loss", "eval_ppl")}
_PAIR_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                 "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")
EVAL_METRICS.update(dpo=_PAIR_METRICS, orpo=(*_PAIR_METRICS, "eval_nll_loss", "eval_log_odds_ratio",
                                             "eval_log_odds_chosen"), simpo=(*_PAIR_METRICS, "eval_nll_loss"))
STOP_MODES = ("auto", "min", "max")


def has_heldout(cfg: Any) -> bool:
    """Whether a run has held-out data whose loss ``ia3-dist eval`` computes per checkpoint (an SFT run with
    ``data.eval_ratio`` or ``data.eval_path``)."""
    return cfg.train.objective == "sft" and bool(cfg.data.eval_ratio or cfg.data.eval_path)


def why_no_heldout(cfg: Any) -> str:
    """Why :func:`has_heldout` is false, for messages: a preference run may well hold out pairs (their metrics are
    logged while it trains), but ``ia3-dist eval`` computes the held-out loss per checkpoint for SFT runs only."""
    if cfg.train.objective != "sft":
        return (f"ia3-dist eval computes the held-out loss per checkpoint for train.objective sft only; this run's "
                f"is {cfg.train.objective} (its held-out pair metrics are in metrics.jsonl, logged as it trained)")
    return "it sets no data.eval_ratio or data.eval_path"


def lower_is_better(metric: str, mode: str = "auto") -> bool:
    """``min`` / ``max`` as given; ``auto``: losses (``nll_loss`` too), perplexities, bits per byte, TER, Brier
    scores and the rejected answers' rewards and log-probabilities go down; accuracies, margins, the chosen side
    and log-odds go up."""
    if mode != "auto":
        return mode == "min"
    # A benchmark's is "<task>/<metric>,<filter>" (wikitext/word_perplexity,none): judge the metric's own name, not
    # the task's (a task may be called anything); a per-source loss (eval_loss/<source>) by its head.
    head = metric.split("/", 1)[0]
    name = metric.rsplit("/", 1)[-1].split(",", 1)[0]
    if head in ("eval_rewards", "eval_logps"):
        return name == "rejected"  # preference training pushes the rejected side down, the chosen up
    # lm-eval's metrics whose higher_is_better is False (its registry: perplexities, bits_per_byte, TER, Brier).
    return (head.startswith("eval_") and head.endswith(("loss", "ppl"))) or \
        name.endswith(("loss", "ppl", "perplexity", "bits_per_byte", "brier_score")) or name == "ter"
DPO_LOSSES = ("sigmoid", "ipo", "robust", "hinge")


MIX_BY = ("examples", "tokens")


@dataclass
class DataSource:
    """One source of a weighted mixture (``data.sources``): its own file, format, columns and template."""

    path: str = ""
    """A data file, ``save_to_disk`` dir or hub dataset name, as ``data.path`` takes (not the demo data)."""
    weight: float = 1.0
    """Sampling ratio against the other sources' weights (normalised: 0.7/0.2/0.1 and 7/2/1 mix alike); by
    examples, or by tokens with ``data.mix_by: tokens``. A source drawn more often than it has examples repeats
    them (over-sampling), less often uses a seeded subset. Between 1e-9 and 1e9."""
    format: str | None = None
    """This source's record format; null: ``data.format``."""
    columns: dict[str, str] | None = None
    """This source's column renames; null: ``data.columns``."""
    template: str | None = None
    """How this source's conversations become text; null: ``data.template``. (Prompts at inference follow
    ``data.template``.)"""
    max_examples: int | None = None
    """Read only this source's first N records (as ``data.limit`` does for a single source); null: all."""


@dataclass
class DataSection:
    path: str | list[str] | None = "demo:zh-styles"
    """A data file (``.json`` list, ``.jsonl``, ``.parquet``, ``.csv``, ``.arrow``), a ``save_to_disk`` dir, a hub
    dataset name, ``demo:zh-styles``, or a list of files (concatenated in order, each in its own format). null:
    unset, for a mixture in ``data.sources`` on top of a config that sets ``data.path``."""
    sources: list[DataSource] | None = None
    """A weighted mixture instead of ``data.path``: a list of ``{path, weight, format, columns, template,
    max_examples}``. The mixture draws as many examples (or tokens, ``mix_by``) as the sources hold together, each
    source's share its weight's; it is fixed when the data is prepared (seeded by ``train.seed``), so every rank,
    epoch and resume trains on the same draws. ``eval_ratio`` holds out each source's share before the draws and
    the eval reports a loss per source (sft)."""
    mix_by: str = "examples"
    """What ``data.sources`` weights divide: ``examples`` (default) or ``tokens`` (each source's share of the
    mixture's tokens)."""
    format: str = "auto"
    """Record format: ``alpaca`` (instruction/input/output, optional system and history), ``sharegpt``
    (conversations of from/value), ``messages`` (role/content), ``prompt`` (preference pairs only:
    prompt/chosen/rejected), or ``auto``: detected per file from its columns."""
    columns: dict[str, str] | None = None
    """Our name -> the data's name, for columns (instruction, input, output, system, history, conversations,
    messages), message keys (role, content) and role values (user, assistant, tool; sharegpt's function_call and
    observation; ``system_role``, a system message's role: ``system``, and ``developer`` in messages, without it);
    e.g. ``{instruction: question, output: answer}`` or ``{user: customer, assistant: agent}``."""
    template: str = "human_assistant"
    """How a conversation becomes text: ``human_assistant`` (the reference recipe's ``Human: ...\n\nAssistant: ``,
    turn after turn), ``chat_template`` (the tokenizer's own), or a path to a Jinja chat-template file."""
    train_on: str = "all"
    """Which assistant turns carry labels: ``all`` of them, or the ``last`` one only. System, user text and
    template scaffolding are never labels."""
    truncation: str = "right"
    """At ``max_length``: ``right`` cuts the end (the reference recipe), ``prompt`` cuts the oldest prompt text
    first so the last response survives (then the response's end, if it alone is too long)."""
    unlabeled: str = "drop"
    """Examples left with no label token after truncation: ``drop`` them (they carry no loss), or ``keep`` them in
    the batches as the reference recipe does (its exact batch composition)."""
    template_date: str | None = None
    """The day a chat template's ``strftime_now()`` renders while the data is tokenized (``YYYY-MM-DD``; Llama
    3.x's system header says ``Today Date: ...``), so the tokens, the token cache and a resume do not depend on the
    day the data was tokenized. null: the clock, as transformers renders (a cache then keeps the day it was built);
    prompts at inference always render the clock."""
    split: str = "train"
    """Split to use for hub datasets and ``DatasetDict`` dirs."""
    max_length: int = 256
    """Truncate ids, attention mask and labels to this many tokens (the reference recipe uses 256)."""
    prompt_template: str = PROMPT_DEFAULT
    """Prompt built from the record's fields (``{instruction}``, ``{input}``)."""
    strip_prompt: bool = True
    """Strip the prompt before the response prefix (the reference recipe does)."""
    response_prefix: str = "\n\nAssistant: "
    """Appended to the prompt; the model learns to continue after it."""
    append_eos: bool = True
    """Append the tokenizer's eos token to the output before tokenizing (the reference recipe does)."""
    shuffle: bool = True
    """Reshuffle the example order every epoch from ``train.seed``; false keeps the file order."""
    group_by_length: bool | None = None
    """Build micro-batches of similar lengths (sorted within large groups, shuffled between them) so little compute
    goes to padding. null (auto): on when micro_batch_size > 1 and shuffle is on and data.packing is off; off keeps
    the plain order."""
    packing: bool = False
    """Lay the examples of each rank's optimizer step end to end in rows of ``data.pack_length`` tokens, each
    example attending only to itself with its own positions (exact: the same losses as unpacked, within float
    summation order). Which examples form each step does not change, only their layout; no length grouping is
    needed, so the order stays freely shuffled. Tested families only (Bloom, Llama, Qwen2, Mistral, GPT-NeoX)."""
    pack_length: int | str = "auto"
    """Tokens per packed row: ``auto`` picks, from the run's own batches, the width (a multiple of 64, at least the
    longest example) that packs best; the data report states the efficiency it reaches."""
    limit: int | None = None
    """Use only the first N records (after loading, before tokenizing)."""
    eval_ratio: float = 0.0
    """Hold out this fraction of the examples (chosen from ``train.seed``) for eval loss and perplexity; examples
    with the same tokens as a held-out one (repeated records) are left out of training, and the report counts them."""
    eval_path: str | None = None
    """A separate held-out file or dir (same formats as ``path``); excludes ``eval_ratio``."""
    num_proc: int = 0
    """Tokenizer processes for large datasets (0: one per available core; 1: in this process)."""
    on_bad_record: str = "error"
    """A malformed record (bad JSON line, missing/non-string field, empty record): ``error`` stops before training
    naming file and line; ``skip`` drops it and reports how many and where."""
    cache_dir: str | None = None
    """Where tokenized data (and the demo assets) are cached; default ``$IA3_DIST_CACHE`` or
    ``~/.cache/ia3-dist``."""
    require_prepared: bool = False
    """true: a run whose token cache is missing stops (exit 2, before the process group starts) instead of
    tokenizing in the job; build the cache first with ``ia3-dist prepare`` (e.g. on a login or CPU node)."""

    def __post_init__(self) -> None:
        _in_range("data.max_length", self.max_length, 2, 1 << 20)
        if not 0.0 <= self.eval_ratio < 1.0:
            fail("data.eval_ratio", f"must be in [0, 1), got {show(self.eval_ratio)}")
        if self.eval_ratio and self.eval_path:
            fail("data.eval_ratio", "set either data.eval_ratio or data.eval_path, not both")
        # Each process is a fork with its own tokenizer: thousands would exhaust the machine, not speed it up.
        _in_range("data.num_proc", self.num_proc, 0, 1024)
        for key, allowed in (("format", FORMATS), ("train_on", ("all", "last")), ("truncation", ("right", "prompt")),
                             ("unlabeled", ("drop", "keep"))):
            if getattr(self, key) not in allowed:
                fail(f"data.{key}", f"must be one of {'|'.join(allowed)}, got {show(getattr(self, key))}")
        if self.template_date is not None:
            self.template_day()
        if self.mix_by not in MIX_BY:
            fail("data.mix_by", f"must be one of {'|'.join(MIX_BY)}, got {show(self.mix_by)}")
        if self.path is None:
            if self.sources is None:
                fail("data.path", "is null (unset) and data.sources is not set: give a data file, dir, list of files "
                                  "or hub dataset name, or a mixture in data.sources")
            # What a mixture config has when it never wrote data.path: the default, which the mixture ignores (and
            # every reader of data.path keeps a string).
            self.path = DataSection.path
        if self.sources is not None:
            self._check_sources()
        if isinstance(self.path, list):
            if not self.path or not all(self.path):
                fail("data.path", "a list of data files must name at least one file, none empty")
            if any(p.startswith("demo:") for p in self.path):
                fail("data.path", "the demo data cannot be part of a list")
        elif not self.path:
            fail("data.path", "must be a data file, dir, list of files or hub dataset name")
        self.path = [home(p) for p in self.path] if isinstance(self.path, list) else home(self.path)
        if self.eval_path is not None:
            self.eval_path = home(self.eval_path)
        if self.cache_dir is not None:
            self.cache_dir = home(self.cache_dir)
        _check_columns("data.columns", self.columns)
        if not self.template:
            fail("data.template", "use human_assistant, chat_template or a path to a Jinja file")
        if self.on_bad_record not in ("error", "skip"):
            fail("data.on_bad_record", f"must be error or skip, got {show(self.on_bad_record)}")
        if self.limit is not None and self.limit < 1:
            fail("data.limit", f"must be >= 1 or null, got {show(self.limit)}")
        _check_template("data.prompt_template", self.prompt_template)
        if isinstance(self.pack_length, str):
            if self.pack_length != "auto":
                fail("data.pack_length", f"must be a positive integer or auto, got {show(self.pack_length)}")
        else:
            _in_range("data.pack_length", self.pack_length, 2, 1 << 20)
        if len(self.response_prefix) > MAX_TEXT:
            fail("data.response_prefix", f"{len(self.response_prefix)} characters; at most {MAX_TEXT}")

    def template_day(self) -> datetime.date | None:
        """``template_date`` as a date (None when unset); a value that is not one fails naming the key."""
        if self.template_date is None:
            return None
        text = self.template_date
        try:
            if not isinstance(text, str) or len(text) != 10:
                raise ValueError
            return datetime.date.fromisoformat(text)
        except ValueError:
            fail("data.template_date", f"must be a day written YYYY-MM-DD (e.g. 2024-07-26), got {show(text)}")

    def _check_sources(self) -> None:
        """Each source's values, named by its index (``data.sources[1].weight``)."""
        if not self.sources:
            fail("data.sources", "a mixture needs at least one source ({path: ..., weight: ...}); or remove the key")
        if self.path != DataSection.path:
            fail("data.sources", "set either data.path or data.sources, not both (each source names its own path; "
                                 "data.path=null unsets a path the config sets)")
        if self.limit is not None:
            fail("data.limit", "does not apply to a mixture; set data.sources[i].max_examples per source")
        if len(self.sources) > MAX_SOURCES:
            fail("data.sources", f"{len(self.sources)} sources; at most {MAX_SOURCES}")
        for i, s in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not s.path:
                fail(f"{key}.path", "every source needs a path (a data file, save_to_disk dir or hub dataset)")
            if s.path.startswith("demo:"):
                fail(f"{key}.path", "the demo data cannot be part of a mixture")
            s.path = home(s.path)
            _finite(f"{key}.weight", s.weight, 0.0, strict=True)
            if not MIN_WEIGHT <= s.weight <= MAX_WEIGHT:
                # Weights are ratios: their sum overflowed near 1e308, and a share below 1e-18 draws nothing.
                fail(f"{key}.weight", f"must be between {MIN_WEIGHT:g} and {MAX_WEIGHT:g} (only the ratios of the "
                                      f"weights count: 0.7/0.3 and 7/3 mix alike), got {show(s.weight)}")
            if s.format is not None and s.format not in FORMATS:
                fail(f"{key}.format", f"must be one of {'|'.join(FORMATS)}, got {show(s.format)}")
            _check_columns(f"{key}.columns", s.columns)
            if s.template is not None and not s.template:
                fail(f"{key}.template", "use human_assistant, chat_template or a path to a Jinja file (or null)")
            if s.max_examples is not None and s.max_examples < 1:
                fail(f"{key}.max_examples", f"must be >= 1 or null, got {show(s.max_examples)}")


def _check_columns(key: str, columns: dict[str, str] | None) -> None:
    """A column map (``data.columns`` or a source's) names only known fields, each mapped to a non-empty column."""
    if columns is None:
        return
    unknown = sorted(set(columns) - set(COLUMN_NAMES))
    if unknown:
        fail(key, f"unknown name(s) {show(unknown)}; map any of {', '.join(COLUMN_NAMES)}")
    if not all(columns.values()):
        fail(key, "every mapped name must be non-empty")


def _check_shared_columns(key: str, columns: dict[str, str] | None, pairs: bool) -> None:
    """No two parts of a record that the objective's formats read together share a column: {instruction: output}
    trained the model to repeat its prompt."""
    if columns is None:
        return
    for group in READ_TOGETHER[1:] if pairs else READ_TOGETHER[:1]:
        seen: dict[str, str] = {}
        for name in group:
            col = columns.get(name, name)
            # Pairs come as prompt/chosen/rejected or alpaca-style: a column one layout names by default may be
            # another's mapped part, so there only two mapped parts clash.
            if col in seen and ((name in columns and seen[col] in columns) if pairs else
                                (name in columns or seen[col] in columns)):
                fail(key, f"{seen[col]} and {name} both read column {show(col)}; map each to its own column")
            seen.setdefault(col, name)


IA3_VARIANTS = ("default", "paper")


@dataclass
class IA3Section:
    target_modules: list[str] | None = None
    """Modules whose activations IA3 scales; null uses PEFT's default for the architecture
    (Bloom: ``query_key_value``, ``mlp.dense_4h_to_h``)."""
    feedforward_modules: list[str] | None = None
    """Subset of target modules scaled on their input; null uses PEFT's default for the architecture (Bloom:
    ``mlp.dense_4h_to_h``), with ``target_modules`` given too (none for a model type PEFT has no default for);
    ``[]``: none."""
    variant: str = "default"
    """``default``: PEFT's IA3 as configured above. ``paper``: the IA3 paper's choice, keys, values and the MLP's
    inner activations but not queries. Where q, k and v are one fused Linear (Bloom, GPT-NeoX
    ``query_key_value``) its vector keeps the full size and the query entries stay exactly 1.0; on separate
    projections the targets are ``k_proj``, ``v_proj`` and ``down_proj`` (Llama, Mistral: PEFT's default already;
    Qwen2: PEFT's default scales ``q_proj`` instead of ``k_proj``). Sets the targets itself."""
    init_from: str | None = None
    """An adapter dir (``<output.dir>/adapter`` of an earlier run, or PEFT's) to start from instead of a fresh
    adapter: SFT, then DPO from the SFT adapter. Its vectors must match this model and these ia3.* settings. Under
    ``train.objective: dpo`` it is also the reference. Null: a fresh adapter (every vector 1.0)."""

    def __post_init__(self) -> None:
        if self.init_from is not None and not self.init_from.strip():
            fail("ia3.init_from", "must be an adapter dir, or null for a fresh adapter")
        if self.init_from is not None:
            self.init_from = home(self.init_from)
        if self.variant not in IA3_VARIANTS:
            fail("ia3.variant", f"must be one of {'|'.join(IA3_VARIANTS)}, got {show(self.variant)}")
        # Before the rules between the two lists: their advice (set target_modules too) would lead into this one.
        if self.variant == "paper" and self.target_modules is not None:
            fail("ia3.variant", "paper chooses the target modules itself; set ia3.target_modules to null or use "
                                "ia3.variant=default")
        if self.variant == "paper" and self.feedforward_modules is not None:
            fail("ia3.feedforward_modules", "ia3.variant=paper chooses the feed-forward modules itself; set "
                                            "ia3.feedforward_modules to null or use ia3.variant=default")
        for key in ("target_modules", "feedforward_modules"):
            names = getattr(self, key)
            if names is not None and not all(names):
                fail(f"ia3.{key}", f"empty module name in {show(names)}")
        if self.target_modules == []:
            # PEFT fails on an empty list only once the model is built, after the process group started.
            fail("ia3.target_modules", "must name at least one module, or be null for PEFT's default")
        if (self.feedforward_modules is not None) and self.target_modules is None:
            fail("ia3.feedforward_modules", "set ia3.target_modules too (feedforward modules must be a subset)")
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                fail("ia3.feedforward_modules", f"{show(sorted(extra))} not in ia3.target_modules")


@dataclass
class EarlyStoppingSection:
    metric: str = ""
    """Stop training when this metric has not improved for ``patience`` evaluations in a row: a held-out one,
    ``eval_loss`` or ``eval_ppl`` (sft), ``eval_rewards/accuracies``, ``eval_rewards/margins``, ``eval_loss`` ...
    (preference objectives), which needs held-out data and ``train.eval_every``; or a benchmark score of
    ``eval.tasks``, ``<task>/<metric>,<filter>`` (``tiny_mc/acc,none``), which needs ``eval.every`` (or
    ``train.eval_every``). The run ends cleanly (exit 0) with a final checkpoint and the log line saying why;
    resuming it is a no-op. "": off."""
    patience: int = 3
    """Evaluations in a row without an improvement of more than ``min_delta`` before the run stops."""
    min_delta: float = 0.0
    """The smallest change that counts as an improvement (in the metric's own units)."""
    mode: str = "auto"
    """``min``, ``max``, or ``auto`` (:func:`lower_is_better`): losses, perplexities and the rejected answers'
    rewards and log-probabilities lower is better; accuracies, margins, the chosen side and log-odds higher."""
    final: str = "best"
    """What ``adapter/`` holds when the run stops early: ``best`` (the vectors of the best evaluation) or ``last``
    (the step it stopped at)."""

    def __post_init__(self) -> None:
        _in_range("train.early_stopping.patience", self.patience, 1, MAX_STEPS)
        _finite("train.early_stopping.min_delta", self.min_delta)
        if self.min_delta < 0:
            fail("train.early_stopping.min_delta", f"must be >= 0, got {show(self.min_delta)}")
        if self.mode not in STOP_MODES:
            fail("train.early_stopping.mode", f"must be one of {'|'.join(STOP_MODES)}, got {show(self.mode)}")
        if self.final not in ("best", "last"):
            fail("train.early_stopping.final", f"must be best or last, got {show(self.final)}")


@dataclass
class TrainSection:
    micro_batch_size: int | str = 1
    """Examples per rank per forward pass, or ``auto``: the largest micro-batch that fits among the divisors of
    ``grad_accum`` (plan's memory model, then one probe step on the longest examples; ZeRO-3: the plan alone).
    ``grad_accum`` then counts examples per rank per optimizer step and the accumulation becomes grad_accum /
    micro-batch, so the global batch stays grad_accum x world size. A resumed run keeps its checkpoint's."""
    grad_accum: int = 8
    """Micro-batches per rank per optimizer step. Global batch = micro_batch_size x grad_accum x world size."""
    global_batch_size: int = 0
    """Examples per optimizer step over all ranks. 0: micro_batch_size x grad_accum x world size. > 0: replaces
    ``grad_accum``, which becomes global_batch_size / (micro_batch_size x world size) on whatever allocation the
    run gets (it must divide), so a job that resumes on fewer or more ranks (a Slurm node range, a requeue after a
    node failure) trains the same steps. With ``micro_batch_size: auto`` it fixes the examples per rank per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    epochs: int = 1
    """Passes over the data; ignored when ``max_steps`` > 0."""
    max_steps: int = 0
    """Stop after this many optimizer steps (> 0 overrides ``epochs``)."""
    seed: int = 42
    """Seed for IA3 init, data order and dropout."""
    precision: str = "fp32"
    """``bf16``, ``fp16`` or ``fp32`` training (DeepSpeed mixed precision)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    scheduler: str = "linear"
    """LR schedule after warmup: ``linear`` or ``cosine`` decay to 0, or ``constant``."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    log_every: int = 10
    """Log loss, lr, grad norm and tokens/s every N optimizer steps (and at the last step)."""
    eval_every: int = 0
    """Evaluate on the held-out data every N optimizer steps (0: only at the end); needs data.eval_ratio or
    data.eval_path (or, for benchmarks alone, eval.tasks)."""
    threads: int = 0
    """Torch/OMP threads per rank on CPU; 0 gives each local rank its share of the cores."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (HF non-reentrant checkpointing): activation
    memory drops from ~34 to ~2 bytes per token and hidden unit per layer, for ~1/3 more compute."""
    bind_cores: bool = False
    """Pin each local rank to its own slice of the cores (CPU runs)."""
    lean_host_memory: bool | None = None
    """Hand freed host memory back to the OS at once (glibc mmap threshold 64 KiB) instead of keeping it for
    reuse. On CPU ZeRO-3 this halves peak RSS per rank (gathered layers otherwise pile up in the heap) for ~25%
    lower throughput. None: on for ZeRO-3 on CPU, off elsewhere."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for the MFU estimate; 0: known GPUs are looked up, otherwise MFU is omitted."""
    resume: str = "none"
    """``auto`` (newest complete checkpoint in ``<output.dir>/checkpoints``, or a fresh start if there is none),
    a checkpoint path, or ``none``."""
    stop_after_steps: int = 0
    """End this invocation after N optimizer steps with a checkpoint (exit 0), without changing the schedule: for
    chunked jobs under short time limits. 0: run to the end."""
    compile: bool = False
    """``torch.compile`` each decoder block (not under ZeRO-3). Measured on CPU it does not pay (see README:
    compile time of minutes against a small step-time gain), so it is off unless asked for."""
    compile_mode: str = "default"
    """``torch.compile`` mode for ``train.compile``: ``default``, ``reduce-overhead`` (CUDA graphs: each block's
    kernels replayed as one launch, for host-bound GPU steps; pair it with ``data.packing`` so shapes repeat) or
    ``max-autotune-no-cudagraphs``. Off the GPU, CUDA graphs do not apply and the modes compile alike."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend for ``train.compile``: ``inductor`` (fused kernels: the one that speeds a step
    up), or ``aot_eager`` / ``eager`` (the same graph capture and recompile behaviour without code generation:
    for checking that a setup compiles without recompiles in seconds instead of minutes, or for isolating an
    inductor problem). ``train.compile_mode`` is inductor's."""
    loss_chunk_mib: int = 1024
    """The LM head's fp32 logits of a micro-batch's label rows are computed this many MiB at a time (each chunk
    recomputed in the backward pass), so full logits never exist at once. At Bloom's 250,880-token vocabulary a row
    costs 1 MB: 1024 MiB is 1070 rows per chunk. Below the budget nothing changes (the reference shape's 46,145
    entries stay whole up to 5,800 label rows). The recomputation costs one more LM-head forward over the chunked
    rows, so the budget is large by default. 0: never chunk."""
    objective: str = "sft"
    """What the adapter learns. ``sft``: the reference recipe's token cross-entropy on instruction data. On
    preference pairs (``chosen``/``rejected``, see README: Preference training), as TRL defines them: ``dpo``
    (against a frozen reference: the base model, or the starting adapter of ``ia3.init_from``, its log-probs
    computed once before step 1), ``orpo`` (odds ratio plus the chosen sequence's NLL) and ``simpo``
    (length-normalised margin, no reference)."""
    beta: float = 0.1
    """Preference objectives' temperature (TRL's ``beta``; for ``loss_type: ipo`` the regularisation tau, for
    ``orpo`` the weight of the odds-ratio term)."""
    loss_type: str = "sigmoid"
    """``dpo``'s loss (TRL's ``loss_type``): ``sigmoid`` (DPO), ``ipo`` (IPO, length-normalised), ``robust``
    (conservative DPO under ``label_smoothing`` label noise) or ``hinge``."""
    label_smoothing: float = 0.0
    """Assumed probability that a pair's preference is flipped, in [0, 0.5): ``dpo`` with ``loss_type: robust``,
    and ``simpo`` (TRL's conservative form)."""
    simpo_gamma: float = 0.5
    """``simpo``'s target reward margin gamma (TRL's ``simpo_gamma``)."""
    cpo_alpha: float = 0.0
    """``simpo``: weight of the chosen responses' NLL added to the loss (TRL's ``cpo_alpha``; 0 is SimPO itself,
    TRL's CPOConfig defaults to 1.0)."""
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    """Stop when a held-out metric stops improving (see its keys; off unless ``metric`` is set)."""
    hang_timeout_s: float = 600.0
    """End the job (exit 76, every rank's Python stacks in its log) when no optimizer step completes for this many
    seconds: a frozen or dead peer, a cut link, a rank stuck in Python or in a collective. Armed after the first
    step (loading, compilation and warm-up never count); a checkpoint save gets 10x (at least 30 min). Choose
    several times the slowest real step: 600 s covers steps of a minute or two with room for a slow log or eval
    batch; the run warns when a step takes more than a third of it. 0: off."""

    def __post_init__(self) -> None:
        # Upper bounds: a micro-batch or accumulation count of 10**12 would make preflight plan 10**12 micro-steps.
        if isinstance(self.micro_batch_size, str):
            if self.micro_batch_size != "auto":
                fail("train.micro_batch_size", f"must be a positive integer or auto, got {show(self.micro_batch_size)}")
        else:
            _in_range("train.micro_batch_size", self.micro_batch_size, 1, 65536)
        _in_range("train.grad_accum", self.grad_accum, 1, MAX_GRAD_ACCUM)
        _in_range("train.global_batch_size", self.global_batch_size, 0, 1 << 30)
        _in_range("train.epochs", self.epochs, 1, 10**6)
        _in_range("train.log_every", self.log_every, 1, MAX_STEPS)
        for key in ("max_steps", "eval_every", "warmup_steps", "stop_after_steps"):
            _in_range(f"train.{key}", getattr(self, key), 0, MAX_STEPS)
        # numpy's and torch's generators take seeds in [0, 2**32) everywhere the seed is used.
        if not 0 <= self.seed < 2**32:
            fail("train.seed", f"must be in [0, 2**32) (0 .. {2**32 - 1}), got {show(self.seed)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("train.lr", f"must be a positive number (finite, e.g. 3e-3), got {show(self.lr)}")
        if self.precision not in PRECISIONS:
            fail("train.precision", f"must be one of {'|'.join(PRECISIONS)}, got {show(self.precision)}")
        if self.scheduler not in SCHEDULERS:
            fail("train.scheduler", f"must be one of {'|'.join(SCHEDULERS)}, got {show(self.scheduler)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("train.betas", f"must be two numbers in [0, 1), got {show(self.betas)}")
        _finite("train.weight_decay", self.weight_decay)
        _finite("train.eps", self.eps, strict=True)
        _finite("train.grad_clip", self.grad_clip)
        _finite("train.peak_tflops", self.peak_tflops)
        _in_range("train.threads", self.threads, 0, 4096)
        _in_range("train.loss_chunk_mib", self.loss_chunk_mib, 0, 1 << 20)
        if self.compile_mode not in COMPILE_MODES:
            fail("train.compile_mode", f"must be one of {'|'.join(COMPILE_MODES)}, got {show(self.compile_mode)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            fail("train.compile_backend",
                 f"must be one of {'|'.join(COMPILE_BACKENDS)}, got {show(self.compile_backend)}")
        if self.compile_backend != "inductor" and self.compile_mode != "default":
            fail("train.compile_mode", f"{self.compile_mode} is a mode of the inductor backend; with "
                                       f"train.compile_backend={self.compile_backend} leave it at default")
        _finite("train.hang_timeout_s", self.hang_timeout_s)
        if 0 < self.hang_timeout_s < 1:
            fail("train.hang_timeout_s", f"must be 0 (off) or at least 1 second, got {show(self.hang_timeout_s)}")
        if not self.resume:
            fail("train.resume", "must be auto, none or a checkpoint path")
        if self.objective not in OBJECTIVES:
            fail("train.objective", f"must be one of {'|'.join(OBJECTIVES)}, got {show(self.objective)}")
        if self.loss_type not in DPO_LOSSES:
            fail("train.loss_type", f"must be one of {'|'.join(DPO_LOSSES)} (dpo's loss), got {show(self.loss_type)}")
        if self.loss_type != "sigmoid" and self.objective != "dpo":
            fail("train.loss_type", f"{self.loss_type} is a dpo loss; train.objective is {self.objective}")
        _finite("train.beta", self.beta, strict=True)
        _finite("train.simpo_gamma", self.simpo_gamma)
        _finite("train.cpo_alpha", self.cpo_alpha)
        _finite("train.label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing < 0.5:
            fail("train.label_smoothing", f"must be in [0, 0.5), got {show(self.label_smoothing)}")
        if self.label_smoothing and not (self.objective == "simpo" or self.loss_type == "robust"):
            fail("train.label_smoothing", "applies to train.objective=simpo and to dpo with train.loss_type=robust "
                                          "(TRL's sigmoid DPO has no label smoothing)")
        if self.cpo_alpha and self.objective != "simpo":
            fail("train.cpo_alpha", f"weights the chosen answers' NLL in train.objective=simpo; "
                                    f"{self.objective} does not read it (remove it)")


@dataclass
class DeepSpeedSection:
    config: str = "zero2"
    """A shipped config name (``zero0`` .. ``zero3``, ``zero3_offload``), a path to a DeepSpeed JSON file, or
    ``auto``: the lowest shipped stage whose per-rank memory fits this rank's GPU (or host share), by ``plan``'s
    memory model. Batch sizes, precision, optimizer and scheduler are filled from this run config."""
    timeout_minutes: int = 30
    """Collective timeout for the process group."""

    def __post_init__(self) -> None:
        if not self.config:
            fail("deepspeed.config", "must be a shipped config name or a DeepSpeed JSON path")
        # timedelta and the collectives' millisecond timeouts overflow long before 10**5 minutes (~69 days).
        _in_range("deepspeed.timeout_minutes", self.timeout_minutes, 1, 10**5)


@dataclass
class CheckpointSection:
    every: int = 0
    """Save a DeepSpeed checkpoint (trainable params and optimizer only) every N optimizer steps; 0: only at the
    end."""
    keep: int = 2
    """How many checkpoints to keep."""
    at_end: bool = True
    """Save a checkpoint after the last step."""
    keep_best: str = ""
    """A held-out metric (as for ``train.early_stopping.metric``; its ``mode`` decides the direction, ``auto``
    otherwise): the checkpoint of the best evaluation so far is saved at that step and kept outside the rotation
    of ``keep``, named by ``checkpoints/best``. Needs held-out data and ``train.eval_every``; or a benchmark's
    score as logged, filter included (``tiny_mc/acc,none``), with ``eval.tasks``. "": off."""
    check_base_weights: bool = True
    """A resume refuses base weights other than those the checkpoint trained on (a fingerprint of the weight files'
    tensors in ``meta.json``: names, shapes, dtypes, leading bytes), as it refuses other data. false: resume on
    them anyway, for weights whose files changed but not the values the run loads (re-saved in another dtype)."""

    def __post_init__(self) -> None:
        _in_range("checkpoint.every", self.every, 0, MAX_STEPS)
        _in_range("checkpoint.keep", self.keep, 1, 10**6)


@dataclass
class OutputSection:
    dir: str = "runs/demo"
    """Run directory: run.yaml, ds_config.json, metrics.jsonl, adapter/, checkpoints/. A leading ``~`` is expanded
    (as in every path setting)."""
    overwrite: bool = False
    """Start over in an output dir that holds another run of ours: only the files ia3-dist wrote there (listed in
    its ``.ia3-dist-run.json``) are removed, anything else in the dir stays; without it, a dir holding another run
    or files ia3-dist did not write is refused."""
    report_to: list[str] | None = None
    """Experiment trackers that get every line of metrics.jsonl (rank 0 only): any of ``tensorboard`` (event files
    in ``<output.dir>/tensorboard``), ``wandb`` (honours ``WANDB_MODE``; offline under Slurm unless it is set),
    ``mlflow`` (honours ``MLFLOW_TRACKING_URI``; default a SQLite store in ``<output.dir>/mlflow``). ``[]`` or
    ``none``: no tracker. null: tensorboard if it is installed."""
    project: str = "ia3-dist"
    """wandb project and MLflow experiment the run is reported to."""
    run_name: str | None = None
    """wandb and MLflow run name; null: the output dir's name."""
    log_examples: bool = False
    """Write ``examples.jsonl`` (rank 0): one line per optimizer step with the training examples it used, as
    indices into the training set (file order, after the held-out split). For auditing the data order across
    preemptions and resumes; a resume trims it to the checkpoint's step like metrics.jsonl."""

    def __post_init__(self) -> None:
        if not self.dir:
            fail("output.dir", "must be a directory path")
        self.dir = home(self.dir)
        if self.report_to == ["none"]:
            self.report_to = []
        if self.report_to is not None:
            unknown = [t for t in self.report_to if t not in TRACKERS]
            if unknown:
                fail("output.report_to", f"unknown tracker(s) {show(unknown)}; choose from {', '.join(TRACKERS)} "
                                         f"(a list, e.g. [tensorboard, wandb]), or [] for none")
            if len(set(self.report_to)) != len(self.report_to):
                fail("output.report_to", f"names a tracker twice: {show(self.report_to)}")
        if not self.project.strip():
            fail("output.project", "must be a non-empty name")
        if self.run_name is not None and not self.run_name.strip():
            fail("output.run_name", "must be a non-empty name, or null for the output dir's name")


@dataclass
class HardwareSection:
    nodes: int = 1
    """Nodes the run is meant for (``ia3-dist plan`` defaults; the launcher uses what it is given)."""
    gpus_per_node: int = 1
    """GPUs per node the run is meant for."""
    gpu_mem_gib: float = 80.0
    """Memory of one GPU, GiB."""

    def __post_init__(self) -> None:
        _in_range("hardware.nodes", self.nodes, 1, 10**5)
        _in_range("hardware.gpus_per_node", self.gpus_per_node, 1, 4096)
        _finite("hardware.gpu_mem_gib", self.gpu_mem_gib, strict=True)
        _in_range("hardware.gpu_mem_gib", self.gpu_mem_gib, 0, 10**6)


@dataclass
class EvalSection:
    """Benchmarks during training: lm-evaluation-harness tasks on the live model (data-parallel over the ranks),
    as ``ia3-dist eval`` runs them on checkpoints afterwards."""

    tasks: list[str] | None = None
    """lm-eval task names (its registry, with the data on this machine, or local task files in ``eval.include``);
    each metric is logged as ``<task>/<metric>,<filter>`` (lm-eval's names: ``tiny_mc/acc,none``), and
    ``train.early_stopping.metric`` and ``checkpoint.keep_best`` may follow one, named so."""
    include: str | None = None
    """A directory of local task YAML files (their data files must be local: training runs offline)."""
    every: int = 0
    """Steps between benchmark evaluations (and one at the end); 0: at every held-out evaluation
    (``train.eval_every``), or only at the end without one. Needs ``eval.tasks``."""
    limit: int | None = None
    """At most this many documents per task (a quick signal on big benchmarks)."""
    batch_size: int = 8
    """Requests per forward pass."""

    def __post_init__(self) -> None:
        if self.tasks is not None:
            if not self.tasks or not all(t.strip() for t in self.tasks):
                fail("eval.tasks", "name at least one lm-eval task, none empty (or null for no benchmarks)")
            if len(self.tasks) > 256:
                fail("eval.tasks", f"{len(self.tasks)} tasks; at most 256")
        elif self.include is not None:
            fail("eval.include", "names task files for eval.tasks; set eval.tasks too")
        if self.include is not None:
            self.include = home(self.include)
        _in_range("eval.every", self.every, 0, MAX_STEPS)
        if self.every and self.tasks is None:
            fail("eval.every", "schedules the benchmarks of eval.tasks, and none is set: set eval.tasks (or "
                               "eval.every=0), or use train.eval_every for the held-out evaluation")
        _in_range("eval.batch_size", self.batch_size, 1, 1 << 16)
        if self.limit is not None:
            _in_range("eval.limit", self.limit, 1, MAX_STEPS)
            if self.tasks is None:
                fail("eval.limit", "limits the documents of eval.tasks, and none is set: set eval.tasks or remove "
                                   "eval.limit")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """Base model and tokenizer."""
    data: DataSection = field(default_factory=DataSection)
    """Instruction data and preprocessing."""
    ia3: IA3Section = field(default_factory=IA3Section)
    """IA3 adapter placement."""
    train: TrainSection = field(default_factory=TrainSection)
    """Optimisation."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed ZeRO config."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpointing."""
    output: OutputSection = field(default_factory=OutputSection)
    """Where results go."""
    hardware: HardwareSection = field(default_factory=HardwareSection)
    """The hardware the run is sized for (used by ``ia3-dist plan``)."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Benchmarks during training (lm-eval tasks)."""

    def __post_init__(self) -> None:
        pairs = self.train.objective != "sft"
        _check_shared_columns("data.columns", self.data.columns, pairs)
        for i, src in enumerate(self.data.sources or []):
            _check_shared_columns(f"data.sources[{i}].columns", src.columns, pairs)
        if pairs and self.data.packing:
            fail("data.packing", f"packs SFT examples; train.objective={self.train.objective} trains on pairs (two "
                                 f"rows each, padded): set data.packing=false")
        if pairs and self.train.micro_batch_size == "auto":
            fail("train.micro_batch_size", f"auto probes SFT batches; with train.objective={self.train.objective} "
                                           f"give it a number (each pair is two rows)")
        # Here, where the error can name the file line or override (prepare's checks cannot).
        if self.data.packing and self.train.micro_batch_size == "auto":
            fail("data.packing", "does not combine with train.micro_batch_size=auto (the probe measures padded "
                                 "batches); give train.micro_batch_size a number")
        if self.train.compile and self.deepspeed.config in ("zero3", "zero3_offload"):
            fail("train.compile", "is not supported with ZeRO-3 (deepspeed.config); use ZeRO-0/1/2 or set it to false")
        if not pairs and self.data.format == "prompt":
            fail("data.format", "prompt is a preference-pair format (prompt, chosen, rejected); set "
                                "train.objective to dpo, orpo or simpo")
        for i, s in enumerate(self.data.sources or []):
            if not pairs and s.format == "prompt":
                fail(f"data.sources[{i}].format", "prompt is a preference-pair format (prompt, chosen, rejected); "
                                                  "set train.objective to dpo, orpo or simpo")
        valid = EVAL_METRICS[self.train.objective]
        tasks = self.eval.tasks or []
        for key, metric in (("train.early_stopping.metric", self.train.early_stopping.metric),
                            ("checkpoint.keep_best", self.checkpoint.keep_best)):
            if not metric:
                continue
            task, _, name = metric.partition("/")
            if task in tasks and name:
                measure, comma, filt = name.partition(",")
                if not (comma and measure and filt):
                    # lm-eval names every score "<metric>,<filter>"; the tracker skips an evaluation that does not
                    # have the metric it follows, so without the filter it would follow nothing, silently.
                    fail(key, f"{show(metric)}: lm-eval logs a benchmark's scores as <task>/<metric>,<filter>; add the "
                              f"filter, e.g. {task}/{measure or 'acc'},none")
                if not (self.eval.every or self.train.eval_every):
                    fail(key, f"follows the benchmark {show(metric)}: set eval.every (or train.eval_every) so it is "
                              f"evaluated during training")
                continue
            if metric not in valid:
                bench = f", or <task>/<metric>,<filter> of eval.tasks {tasks}" if tasks else ""
                fail(key, f"{show(metric)} is not a held-out metric of train.objective={self.train.objective}; "
                          f"one of {', '.join(valid)}{bench}")
            if not (self.data.eval_ratio or self.data.eval_path) or not self.train.eval_every:
                fail(key, "follows the held-out evaluation: set data.eval_ratio (or data.eval_path) and "
                          "train.eval_every (evaluations every N steps)")
        if self.train.eval_every and not (self.data.eval_ratio or self.data.eval_path or self.eval.tasks):
            fail("train.eval_every", "schedules the held-out evaluation (and the benchmarks of eval.tasks), and the "
                                     "run has neither: set data.eval_ratio or data.eval_path (or eval.tasks), or "
                                     "train.eval_every=0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


