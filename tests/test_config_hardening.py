"""Hostile run configs and DeepSpeed files from the security review: each input that used to hang, exhaust memory or
end in a traceback is now a one-line UsageError (exit 2 from ``ia3-dist check``, output dir untouched) naming the
file/line or key. Families of inputs are fuzzed with hypothesis."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from _util import deadline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia3_dist.cli import main
from ia3_dist.config import DataSection, build_config, load_config, parse_override, read_yaml
from ia3_dist.config.schema import SHOW_CHARS, show
from ia3_dist.data.template import Template
from ia3_dist.errors import UsageError
from ia3_dist.runtime import ds_config as dsc

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
GOOD = [{"instruction": "问题", "input": "", "output": "回答。"}] * 3
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Longest a config error may be: the key, the bounded value quote and the fix fit well inside.
MAX_MESSAGE = 1000



def _w(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _one_line(msg: str) -> str:
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE, msg
    return msg


def _refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UsageError) as e:
        fn(*args, **kwargs)
    return _one_line(str(e.value))


def check_exits_2(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture, args: list[str],
                  seconds: float = 120) -> str:
    """``ia3-dist check`` with ``args`` (``--config TINY`` unless given) exits 2 with no traceback, within
    ``seconds``, leaving the output dir as it was; returns stderr."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("user data")
    if "--config" not in args:
        args = ["--config", TINY, *args]
    with deadline(seconds):
        rc = main(["check", *args, f"model.path={tiny_model}", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    return _one_line(err.strip())


# ------------------------------------------------------------------------------------------------------------
# 1. YAML aliases and anchors ("billion laughs"), and bounded values in messages.

def bomb(width: int = 9, depth: int = 9) -> str:
    names = string.ascii_lowercase
    lines = [f"{names[0]}: &{names[0]} [{','.join(['lol'] * width)}]"]
    lines += [f"{names[i]}: &{names[i]} [{','.join(['*' + names[i - 1]] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_at_once(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    text = bomb()
    assert len(text) < 600
    f = _w(tmp_path / "bomb.yaml", text)
    err = check_exits_2(tmp_path, tiny_model, capsys, ["--config", f], seconds=20)
    assert f"{f}:1:" in err and "anchor &a" in err and "aliases" in err


@FUZZ
@given(width=st.integers(1, 12), depth=st.integers(1, 12))
def test_fuzz_alias_bombs(tmp_path: Path, width: int, depth: int) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text(bomb(width, depth))
    with deadline(10):
        msg = _refused(load_config, f)
    assert f"{f}:1:" in msg and "anchor" in msg


@FUZZ
@given(section=st.sampled_from(["train", "data", "model", "ia3"]), anchor=st.from_regex(r"[a-z][a-z0-9]{0,8}",
                                                                                     fullmatch=True),
       use_alias=st.booleans())
def test_fuzz_any_anchor_or_alias_is_refused(tmp_path: Path, section: str, anchor: str, use_alias: bool) -> None:
    f = tmp_path / "c.yaml"
    # The alias alone (anchor missing) is invalid YAML; anchored and aliased is what a bomb needs.
    text = f"{section}: &{anchor} {{}}\n" + (f"other: *{anchor}\n" if use_alias else "")
    f.write_text(text)
    msg = _refused(load_config, f)
    assert f"{f}:1:" in msg and f"&{anchor}" in msg


def test_alias_in_an_override_is_not_expanded() -> None:
    parts, value = parse_override("train.betas=[&a 0.9, *a]")
    assert parts == ["train", "betas"] and value == "[&a 0.9, *a]"
    msg = _refused(load_config, None, ["train.betas=[&a 0.9, *a]"], base={})
    assert "'train.betas'" in msg and "YAML anchor &a is not allowed in a run config" in msg, msg


def test_expanded_value_in_a_message_is_bounded() -> None:
    # The shape a bomb expands to, built with shared references (9**9 leaves if printed in full).
    value: Any = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9
    for raw in ({"train": {"lr": value}}, {"train": {"betas": value}}, {"ia3": {"target_modules": value}},
                {"train": {"precision": "x" * 10**6}}, {"train": value}, {"x" * 10**5: 1},
                {"train": {"seed": 10**5000}}, {"output": {"dir": 10**5000}}):
        with deadline(10):
            msg = _refused(build_config, raw)
        assert "..." in msg or "digits" in msg, msg


@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=2000)
                          | st.binary(max_size=2000),
                          lambda c: st.lists(c, max_size=30) | st.dictionaries(st.text(max_size=300), c, max_size=30),
                          max_leaves=200))
@FUZZ
def test_fuzz_show_is_short_and_one_line(value: Any) -> None:
    text = show(value)
    assert len(text) <= SHOW_CHARS + 3 and "\n" not in text


# ------------------------------------------------------------------------------------------------------------
# 2. Duplicate keys.

@pytest.mark.parametrize("text, line, key", [
    ("train: {lr: 0.1, lr: 0.2}\n", 1, "'lr'"),
    ("train:\n  lr: 0.1\ndata: {}\ntrain:\n  epochs: 2\n", 4, "'train'"),
    ("train:\n  lr: 0.1\n  epochs: 1\n  lr: 0.1\n", 4, "'lr'"),
])
def test_duplicate_keys_are_refused(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture, text: str,
                                    line: int, key: str) -> None:
    f = _w(tmp_path / "dup.yaml", text)
    msg = _refused(read_yaml, f)
    assert f"{f}:{line}:" in msg and f"duplicate key {key}" in msg
    err = check_exits_2(tmp_path, tiny_model, capsys, ["--config", f])
    assert f"{f}:{line}:" in err and f"duplicate key {key}" in err


@FUZZ
@given(keys=st.lists(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), min_size=1, max_size=5, unique=True),
       dup=st.data(), nested=st.booleans(), flow=st.booleans())
def test_fuzz_duplicate_keys(tmp_path: Path, keys: list[str], dup: st.DataObject, nested: bool, flow: bool) -> None:
    again = dup.draw(st.sampled_from(keys))
    order = [*keys, again]
    if flow:
        body = "{" + ", ".join(f"{k}: {i}" for i, k in enumerate(order)) + "}"
        text = f"train: {body}\n" if nested else body + "\n"
        line = 1
    else:
        indent = "  " if nested else ""
        text = ("train:\n" if nested else "") + "".join(f"{indent}{k}: {i}\n" for i, k in enumerate(order))
        line = len(order) + (1 if nested else 0)
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    msg = _refused(read_yaml, f)
    assert f"{f}:{line}:" in msg and f"duplicate key '{again}'" in msg


def test_other_yaml_features_are_refused_with_position(tmp_path: Path) -> None:
    for text, needle in [("train: {<<: {lr: 1}}\n", ":1:9: merge keys"),
                         ("train: {seed: " + "1" * 5000 + "}\n", ":1:15: integer of 5000 characters"),
                         ("train: {resume: 2024-02-30}\n", ":1:17: cannot read '2024-02-30'"),
                         ("a: " + "[" * 100000 + "]" * 100000 + "\n", "nested more than 32 levels"),
                         ("? [a]\n: 1\n", ":1:3: invalid YAML: found unhashable key"),
                         ("train: {}\nmodel: {path: a\x00b}\n", ":2: invalid YAML: character #x0000 is not allowed")]:
        f = tmp_path / "c.yaml"
        f.write_text(text)
        with deadline(20):
            assert needle in _refused(load_config, f)


# ------------------------------------------------------------------------------------------------------------
# 3. Bounds on counts, and train.grad_accum against the number of examples.

BOUNDS = {"train.micro_batch_size": (1, 65536), "train.grad_accum": (1, 65536), "train.epochs": (1, 10**6),
          "train.max_steps": (0, 10**9), "train.log_every": (1, 10**9), "train.eval_every": (0, 10**9),
          "train.warmup_steps": (0, 10**9), "train.stop_after_steps": (0, 10**9), "train.threads": (0, 4096),
          "data.max_length": (2, 1 << 20), "data.num_proc": (0, 1024),
          "checkpoint.every": (0, 10**9), "checkpoint.keep": (1, 10**6), "deepspeed.timeout_minutes": (1, 10**5),
          "hardware.nodes": (1, 10**5), "hardware.gpus_per_node": (1, 4096)}


def test_huge_grad_accum_is_refused_at_once(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    err = check_exits_2(tmp_path, tiny_model, capsys, ["train.grad_accum=1000000000000"], seconds=30)
    assert "'train.grad_accum': must be <= 65536, got 1000000000000" in err


@FUZZ
@given(key=st.sampled_from(sorted(BOUNDS)), data=st.data())
def test_fuzz_integer_bounds(key: str, data: st.DataObject) -> None:
    lo, hi = BOUNDS[key]
    section, name = key.split(".")
    good = data.draw(st.sampled_from([lo, hi]) | st.integers(lo, hi))
    # An evaluation schedule needs something to evaluate.
    held_out = {"data": {"eval_ratio": 0.1}} if key == "train.eval_every" else {}
    build_config({section: {name: good}, **held_out})
    bad = data.draw(st.integers(hi + 1, 10**30) | st.integers(-(10**30), lo - 1))
    assert f"'{key}'" in _refused(build_config, {section: {name: bad}})


def test_grad_accum_above_example_count_is_refused_before_planning(tmp_path: Path, tiny_model: Path,
                                                                   capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_planning(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the sampler planned steps before the grad_accum check")

    import ia3_dist.data.sampler as sampler
    import ia3_dist.train.report as report

    for mod in (sampler, report):
        monkeypatch.setattr(mod, "plan_epoch", no_planning)
    monkeypatch.setattr(sampler, "rank_micro_batches", no_planning)
    f = _w(tmp_path / "d.json", json.dumps(GOOD, ensure_ascii=False))
    err = check_exits_2(tmp_path, tiny_model, capsys, [f"data.path={f}", "train.grad_accum=4"])
    assert "'train.grad_accum': 4 is more than the 3 training examples" in err and "at most 3" in err


def test_grad_accum_equal_to_example_count_passes(tmp_path: Path, tiny_model: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    f = _w(tmp_path / "d.json", json.dumps(GOOD, ensure_ascii=False))
    assert main(["check", "--config", TINY, f"data.path={f}", "train.grad_accum=3", f"model.path={tiny_model}",
                 f"output.dir={tmp_path / 'o'}"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# 4. Prompt templates: plain {instruction} and {input} only.

@pytest.mark.parametrize("how", ["override", "file"])
def test_huge_format_width_is_refused(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                      how: str) -> None:
    # Unquoted on the command line the value is a YAML flow mapping; quoted it is the template string.
    if how == "override":
        args = ['data.prompt_template="{instruction:>99999999999}"']
    else:
        args = ["--config", _w(tmp_path / "t.yaml", "data:\n  prompt_template: '{instruction:>99999999999}'\n")]
    err = check_exits_2(tmp_path, tiny_model, capsys, args, seconds=30)
    assert "'data.prompt_template'" in err and "{instruction:>99999999999}" in err


FIELD_NAMES = ["instruction", "input", "output", "0", "", "instruction.__class__", "input[0]", "instruction.x"]


@FUZZ
@given(fields=st.lists(st.tuples(st.sampled_from(FIELD_NAMES), st.sampled_from([None, "r", "s", "a"]),
                                 st.sampled_from(["", ">99999999999", "x", ",", "{input}"])), max_size=4),
       literal=st.text(alphabet="ab \n{}", max_size=6))
def test_fuzz_template_fields(fields: list[tuple[str, str | None, str]], literal: str) -> None:
    lit = literal.replace("{", "{{").replace("}", "}}")
    template = lit + "".join("{" + n + (f"!{c}" if c else "") + (f":{s}" if s else "") + "}" + lit
                             for n, c, s in fields)
    plain = all(n in ("instruction", "input") and c is None and not s for n, c, s in fields)
    if plain:
        t = Template(prompt_template=template, strip_prompt=False, response_prefix="")
        if any(n == "input" for n, _, _ in fields):
            assert t.prompt("I", "N") == template.format(instruction="I", input="N")
        else:  # an input it has no place for is refused, not dropped
            assert t.prompt("I") == template.format(instruction="I", input="")
            with pytest.raises(UsageError, match="has no {input} field, and this record has an input"):
                t.prompt("I", "N")
    else:
        assert "'data.prompt_template'" in _refused(DataSection, prompt_template=template)


@FUZZ
@given(template=st.text(max_size=80))
def test_fuzz_any_accepted_template_formats_in_bounded_size(template: str) -> None:
    try:
        DataSection(prompt_template=template)
    except UsageError as e:
        _one_line(str(e))
        return
    out = template.format(instruction="I" * 10, input="N" * 10)
    assert len(out) <= len(template) * 10


def test_template_length_is_bounded() -> None:
    assert "at most 4096" in _refused(DataSection, prompt_template="{instruction}" + "x" * 5000)
    assert "'data.response_prefix'" in _refused(DataSection, response_prefix="x" * 5000)


# ------------------------------------------------------------------------------------------------------------
# 5. Non-finite floats; 6. seeds.

FLOAT_KEYS = ["train.lr", "train.weight_decay", "train.eps", "train.grad_clip", "train.peak_tflops",
              "data.eval_ratio", "hardware.gpu_mem_gib"]


@pytest.mark.parametrize("override", ["train.eps=nan", "train.weight_decay=nan", "train.grad_clip=inf",
                                      "train.betas=[nan, 0.999]", "train.betas=[0.9, .inf]", "train.lr=.nan",
                                      "train.lr=1e999", "train.seed=-1"])
def test_non_finite_floats_and_bad_seed_exit_2(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                               override: str) -> None:
    key = override.partition("=")[0]
    assert f"'{key}'" in check_exits_2(tmp_path, tiny_model, capsys, [override])


NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "NaN", ".inf", "-Infinity", "1e999", "-1e400"]


@FUZZ
@given(key=st.sampled_from(FLOAT_KEYS + ["train.betas"]),
       x=st.sampled_from(NON_FINITE) | st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_floats_name_the_key(key: str, x: float | str) -> None:
    section, name = key.split(".")
    value: Any = [x, 0.9] if name == "betas" else x
    try:
        cfg = build_config({section: {name: value}})
    except UsageError as e:
        assert f"'{key}" in _one_line(str(e))  # train.betas may be named as train.betas[0]
        return
    got = getattr(getattr(cfg, section), name)
    assert all(math.isfinite(v) for v in (got if isinstance(got, list) else [got])), (key, x)


@FUZZ
@given(seed=st.integers(-(2**70), 2**70))
def test_fuzz_seed_range(seed: int) -> None:
    if 0 <= seed < 2**32:
        assert build_config({"train": {"seed": seed}}).train.seed == seed
    else:
        assert "'train.seed': must be in [0, 2**32)" in _refused(build_config, {"train": {"seed": seed}})


# ------------------------------------------------------------------------------------------------------------
# 7. DeepSpeed JSON with wrong-typed sections.

DS_CASES = {
    "bf16-bool": ({"bf16": True}, "'bf16' must be a JSON object"),
    "offload-string": ({"zero_optimization": {"offload_optimizer": "cpu"}},
                       "zero_optimization.offload_optimizer must be an object"),
    "params-string": ({"optimizer": {"params": "fast"}}, "'optimizer.params' must be a JSON object"),
    "stage-string": ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage is '3'"),
    "stage-bool": ({"zero_optimization": {"stage": True}}, "zero_optimization.stage is True"),
    "nested-100k": ("[" * 100000 + "]" * 100000, "nested too deeply"),
    "nested-object": ('{"a":' * 40 + "1" + "}" * 40, "nested more than 16 levels"),
    "nan": ('{"gradient_clipping": NaN}', "NaN is not a JSON number"),
    "huge-float": ('{"gradient_clipping": 1e999}', "'1e999' is out of range"),
    "huge-int": ('{"train_batch_size": ' + "9" * 400 + "}", "'train_batch_size' is <integer of about"),
    "huge-int-digits": ('{"train_batch_size": ' + "9" * 5000 + "}", "a number too large"),
    "duplicate": ('{"zero_optimization": {"stage": 1, "stage": 3}}', "duplicate key 'stage'"),
    "zero-field-type": ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "lots"}},
                        "'zero_optimization.reduce_bucket_size'"),
    "fp16-field-type": ({"fp16": {"loss_scale": "x"}}, "'fp16.loss_scale'"),
    "top-level-type": ({"steps_per_print": "often"}, "'steps_per_print' must be int"),
    "device-list": ({"zero_optimization": {"stage": 3, "offload_param": {"device": ["cpu"]}}},
                    "zero_optimization.offload_param.device is ['cpu']"),
    "auto-in-list": ({"x": [1, "auto"]}, 'cannot resolve "auto" for x[1]'),
}


def _ds(tmp_path: Path, body: str | dict) -> str:
    return _w(tmp_path / "ds.json", body if isinstance(body, str) else json.dumps(body))


@pytest.mark.parametrize("case", list(DS_CASES))
def test_bad_deepspeed_json_is_a_usage_error(tmp_path: Path, case: str) -> None:
    body, needle = DS_CASES[case]
    f = _ds(tmp_path, body)
    with deadline(30):
        msg = _refused(dsc.resolve, build_config({"deepspeed": {"config": f}}), 1, 64)
    assert msg.startswith(f) and needle in msg, msg


@pytest.mark.parametrize("case", ["bf16-bool", "offload-string", "params-string", "stage-string", "nested-100k"])
def test_bad_deepspeed_json_exits_2(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                   case: str) -> None:
    body, needle = DS_CASES[case]
    err = check_exits_2(tmp_path, tiny_model, capsys, [f"deepspeed.config={_ds(tmp_path, body)}"])
    assert needle in err and "ds.json" in err


def test_ds_helpers_do_not_crash_on_wrong_types() -> None:
    for ds in ({}, {"zero_optimization": "x"}, {"zero_optimization": {"offload_optimizer": "cpu"}},
               {"zero_optimization": {"offload_param": ["cpu"], "offload_optimizer": None}}):
        assert dsc.offloads(ds) is False and dsc.offloads_optimizer(ds) is False
    assert dsc.stage_of({"zero_optimization": None}) == 0
    for stage in ("3", True, 3.0, 7, None):
        assert "zero_optimization.stage" in _refused(dsc.stage_of, {"zero_optimization": {"stage": stage}})


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
DS_PATHS = ["bf16", "bf16.enabled", "fp16", "fp16.loss_scale", "optimizer", "optimizer.params",
            "optimizer.params.lr", "optimizer.type", "zero_optimization", "zero_optimization.stage",
            "zero_optimization.offload_optimizer", "zero_optimization.offload_optimizer.device",
            "zero_optimization.offload_param", "zero_optimization.reduce_bucket_size", "scheduler",
            "gradient_clipping", "train_batch_size", "steps_per_print"]


@FUZZ
@given(shipped=st.sampled_from(dsc.SHIPPED), path=st.sampled_from(DS_PATHS), value=json_values)
def test_fuzz_deepspeed_json_wrong_types(tmp_path: Path, shipped: str, path: str, value: Any) -> None:
    ds = json.loads((dsc.shipped_dir() / f"{shipped}.json").read_text())
    node = ds
    *parents, last = path.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    f = _ds(tmp_path, ds)
    try:
        out = dsc.resolve(build_config({"deepspeed": {"config": f}}), 2, 64)
    except UsageError as e:
        assert _one_line(str(e)).startswith(f)
        return
    assert dsc.stage_of(out) in (0, 1, 2, 3)
    dsc.offloads(out)
    dsc.offloads_optimizer(out)
    json.dumps(out, allow_nan=False)


# ------------------------------------------------------------------------------------------------------------
# 8. Config files that cannot be read.

def test_config_that_is_a_directory(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "conf.yaml"
    d.mkdir()
    assert f"config file {d}: is a directory" in _refused(load_config, d)
    assert f"{d}: is a directory" in check_exits_2(tmp_path, tiny_model, capsys, ["--config", str(d)])


def test_config_without_read_permission(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    f = Path(_w(tmp_path / "secret.yaml", "train: {lr: 0.1}\n"))
    real_open = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # As root chmod 000 still reads, so the refusal the OS would give is simulated.
    monkeypatch.setattr(Path, "open", deny)
    msg = _refused(load_config, f)
    assert f"config file {f}: cannot read it (Permission denied)" in msg
    assert f"{f}: cannot read it" in check_exits_2(tmp_path, tiny_model, capsys, ["--config", str(f)])


def test_config_chmod_000(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    f = tmp_path / "c.yaml"
    f.write_text("train: {}\n")
    f.chmod(0)
    assert "cannot read it" in _refused(load_config, f)


def test_other_unusable_config_paths(tmp_path: Path) -> None:
    assert "not a regular file" in _refused(load_config, "/dev/null")
    assert "cannot read it" in _refused(load_config, tmp_path / ("a" * 5000))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert "larger than" in _refused(load_config, big)
    for text in ("", "# only a comment\n", "{}\n", "---\n"):  # all defaults: the demo, trained in a queued job
        f = _w(tmp_path / "empty.yaml", text)
        assert "holds no settings (empty, or only comments) and no overrides" in _refused(load_config, f)
        assert load_config(f, ["train.lr=0.01"]).train.lr == 0.01  # overrides may set everything


def test_nul_in_a_path_setting(tmp_path: Path) -> None:
    f = _w(tmp_path / "c.yaml", 'output: {dir: "runs/a\\0b"}\n')
    assert "'output.dir': contains a NUL character" in _refused(load_config, f)


# ------------------------------------------------------------------------------------------------------------
# Everything at once: whatever the YAML, only a short one-line UsageError escapes.

yaml_atoms = st.sampled_from(["lr", "train", "data", "seed", "1e999", ".nan", "-.inf", "&a", "*a", "<<", "{", "}",
                              "[", "]", ":", ", ", "\n", "  ", "- ", "!!binary", "!!python/object:os.system", "'",
                              '"', "\\0", "\x00", "\x07", "\t", "\r", "\ufeff", "9" * 50, "2024-02-30",
                              "{instruction:>9}", "?", "#"])


@FUZZ
@given(parts=st.lists(yaml_atoms, max_size=40))
def test_fuzz_hostile_yaml_gives_one_line_usage_errors(tmp_path: Path, parts: list[str]) -> None:
    f = tmp_path / "fuzz.yaml"
    f.write_text("".join(parts), encoding="utf-8")
    with deadline(20):
        try:
            load_config(f)
        except UsageError as e:
            _one_line(str(e))


def test_compile_under_zero3_is_refused(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    f = _w(tmp_path / "d.json", json.dumps(GOOD, ensure_ascii=False))
    err = check_exits_2(tmp_path, tiny_model, capsys, [f"data.path={f}", "train.compile=true",
                                                       "deepspeed.config=zero3"])
    assert "'train.compile'" in err and "ZeRO-3" in err


# ------------------------------------------------------------------------------------------------------------
# 9. The config review: each value below used to crash, pass silently or change on its way in.

@pytest.mark.parametrize("tagged", ['!!bool maybe', '!!bool ""', '!!int ""', '!!int "-"', '!!float ""',
                                    '!!timestamp abc'])
def test_a_tag_on_a_value_it_does_not_fit_is_refused_with_its_line(tmp_path: Path, tagged: str) -> None:
    f = _w(tmp_path / "c.yaml", f"train:\n  lr: {tagged}\n")
    msg = _refused(load_config, f)
    assert f"{f}:2:7:" in msg and "remove the tag" in msg
    # An override keeps what the strict loader refuses as its text, which the key then refuses.
    msg = _refused(load_config, None, [f"train.epochs={tagged}"], base={})
    assert "'train.epochs'" in msg and "override train.epochs=" in msg


@pytest.mark.parametrize("key, written, reading", [
    ("model.revision", "0123", "the number 83"), ("model.revision", "1.10", "the number 1.1"),
    ("output.run_name", "12:30", "the number 750"), ("output.dir", "1_000", "the number 1000"),
    ("output.dir", "0x1F", "the number 31"), ("data.split", "no", "the boolean false"),
    ("output.dir", "2024-01-01", "the date 2024-01-01"), ("data.path", "0123", "the number 83"),
])
def test_a_number_in_a_text_setting_is_refused_with_a_hint_to_quote_it(tmp_path: Path, key: str, written: str,
                                                                         reading: str) -> None:
    section, name = key.split(".")
    f = _w(tmp_path / "c.yaml", f"train:\n  lr: 0.1\n{section}:\n  {name}: {written}\n")
    msg = _refused(load_config, f)
    assert msg.startswith(f"{f}:4: config key '{key}'") and f"reads {written} as {reading}" in msg, msg
    assert f"quote it ('{written}')" in msg
    _w(tmp_path / "c.yaml", f"{section}:\n  {name}: '{written}'\n")
    assert getattr(getattr(load_config(f), section), name) == written


def test_an_override_of_a_text_setting_is_the_text_as_typed() -> None:
    # YAML reads the first ones as a number, a date, a comment (None) and a mapping; the last ones keep their YAML
    # meaning (null, a quoted string, an integer, a list).
    for override, key, value in [
        ("model.revision=0123", "model.revision", "0123"), ("model.revision=1.10", "model.revision", "1.10"),
        ("output.run_name=2024-01-01", "output.run_name", "2024-01-01"),
        ("output.run_name=#42", "output.run_name", "#42"),
        ("data.eval_path=#held.json", "data.eval_path", "#held.json"),
        ("data.prompt_template={instruction}", "data.prompt_template", "{instruction}"),
        ("output.run_name=null", "output.run_name", None), ("model.tokenizer=~", "model.tokenizer", None),
        ("model.revision='0123'", "model.revision", "0123"), ("train.micro_batch_size=4", "train.micro_batch_size", 4),
        ("eval.tasks=[a, b]", "eval.tasks", ["a", "b"]),
    ]:
        section, name = key.split(".")
        assert getattr(getattr(load_config(None, [override], base={}), section), name) == value, override


@pytest.mark.parametrize("raw", ["\ud800x", "a\udcffb"])
def test_a_lone_surrogate_in_a_text_setting_is_refused(tmp_path: Path, raw: str) -> None:
    escaped = raw.encode("unicode_escape").decode("ascii")
    f = _w(tmp_path / "c.yaml", f'output:\n  project: "{escaped}"\n')
    msg = _refused(load_config, f)
    assert f"{f}:2: config key 'output.project': contains \\ud" in msg and "surrogate" in msg
    assert "'data.columns.instruction'" in _refused(build_config, {"data": {"columns": {"instruction": raw}}})
    assert "'output.run_name'" in _refused(load_config, None, [f"output.run_name={raw}"], base={})


def test_a_global_batch_past_the_accumulation_bound_names_global_batch_size() -> None:
    from ia3_dist.train.prepare import with_global_batch

    cfg = load_config(None, ["train.global_batch_size=131072"], base={})
    msg = _refused(with_global_batch, cfg, 1)
    assert msg.startswith("config key 'train.global_batch_size': 131072") and "of 131072 per step" in msg, msg
    assert with_global_batch(cfg, 2).train.grad_accum == 65536


def test_benchmark_metrics_need_lm_evals_filter() -> None:
    bench = ["eval.tasks=[tiny_mc]", "eval.every=10"]
    for key in ("checkpoint.keep_best", "train.early_stopping.metric"):
        for metric, example in (("tiny_mc/acc", "tiny_mc/acc,none"), ("tiny_mc/bogus", "tiny_mc/bogus,none"),
                                ("tiny_mc/acc,", "tiny_mc/acc,none")):
            msg = _refused(load_config, None, [*bench, f"{key}={metric}"], base={})
            assert f"'{key}'" in msg and "<task>/<metric>,<filter>" in msg and example in msg, msg
        assert load_config(None, [*bench, f"{key}=tiny_mc/acc_norm,none"], base={})


def test_an_evaluation_schedule_with_nothing_to_evaluate_is_refused() -> None:
    assert "'train.eval_every'" in _refused(load_config, None, ["train.eval_every=10"], base={})
    assert "'eval.every'" in _refused(load_config, None, ["eval.every=100"], base={})
    for overrides in (["train.eval_every=10", "data.eval_ratio=0.1"], ["train.eval_every=10", "data.eval_path=h.json"],
                      ["train.eval_every=10", "eval.tasks=[tiny_mc]"], ["eval.every=10", "eval.tasks=[tiny_mc]"]):
        load_config(None, overrides, base={})


def test_an_error_an_override_causes_names_the_override_and_a_file_error_its_line(tmp_path: Path) -> None:
    f = _w(tmp_path / "c.yaml", "model:\n  path: m\ntrain:\n  lr: 3.0e-3\n  epochs: 2\n")
    msg = _refused(load_config, f, ["train.lr=abc"])
    assert msg.startswith("override train.lr=abc: config key 'train.lr'") and str(f) not in msg, msg
    assert _refused(load_config, f, ["train.epochs=0"]).startswith("override train.epochs=0: ")
    assert _refused(load_config, f, ["train={lr: -1}"]).startswith("override train={lr: -1}: ")
    _w(tmp_path / "c.yaml", "model:\n  path: m\ntrain:\n  lr: -1\n")
    assert _refused(load_config, f).startswith(f"{f}:4: config key 'train.lr'")
    _w(tmp_path / "c.yaml", "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      weight: 0\n")
    assert _refused(load_config, f).startswith(f"{f}:5: config key 'data.sources[1].weight'")


def test_the_paper_variant_refuses_feedforward_modules_by_name() -> None:
    msg = _refused(load_config, None, ["ia3.variant=paper", "ia3.feedforward_modules=[down_proj]"], base={})
    assert "'ia3.feedforward_modules'" in msg and "paper chooses the feed-forward modules itself" in msg, msg
    assert "set ia3.target_modules too" not in msg


def test_data_path_null_unsets_it_for_a_mixture(tmp_path: Path) -> None:
    shipped = ROOT / "configs" / "bloom-1b4-zh.yaml"
    mix = "data.sources=[{path: a.jsonl, weight: 1}]"
    assert "'data.sources'" in _refused(load_config, shipped, [mix])
    cfg = load_config(shipped, ["data.path=null", mix])
    assert [s.path for s in cfg.data.sources] == ["a.jsonl"]
    assert load_config(_w(tmp_path / "run.yaml", cfg.to_yaml())) == cfg  # run.yaml reloads as it was
    assert "'data.path'" in _refused(load_config, shipped, ["data.path=null"])


def test_generation_seed_past_64_bits_exits_2_before_loading(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    import ia3_dist.tools.inference as inference

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before --seed was checked")

    monkeypatch.setattr(inference, "load_for_inference", no_loading)
    for cmd in (["generate", "hi"], ["chat"]):
        assert main([*cmd, "--adapter", "a", "--seed", str(2**64)]) == 2
        assert "--seed must be in [0, 2**64)" in capsys.readouterr().err


def test_train_takes_overrides_on_both_sides_of_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import ia3_dist.train.run as run

    got = []
    monkeypatch.setattr(run, "run", got.append)
    assert main(["train", "train.lr=1e-3", "--config", TINY, "train.epochs=2"]) == 0
    assert (got[0].train.lr, got[0].train.epochs) == (1e-3, 2)


def test_home_is_expanded_in_path_settings_when_the_config_is_built(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    f = _w(tmp_path / "c.yaml", "model:\n  path: ~/m\n  tokenizer: ~/t\n"
                                "data:\n  path: ~/d.json\n  eval_path: ~/e.json\n"
                                "ia3:\n  init_from: ~/runs/a/adapter\noutput:\n  dir: ~/runs/x\n")
    cfg = load_config(f)
    assert (cfg.model.path, cfg.model.tokenizer, cfg.data.path, cfg.data.eval_path, cfg.ia3.init_from,
            cfg.output.dir) == tuple(str(tmp_path / p) for p in ("m", "t", "d.json", "e.json", "runs/a/adapter",
                                                                  "runs/x"))
    assert load_config(None, ["data.path=[~/a.json, b.json]"], base={}).data.path == [str(tmp_path / "a.json"),
                                                                                         "b.json"]
    assert load_config(None, [], base={}).model.path == "demo:tiny-bloom"


def test_null_feedforward_modules_is_pefts_default() -> None:
    """With ia3.target_modules given, ia3.feedforward_modules: null takes the modules PEFT's own IA3Config takes by
    default (Bloom: mlp.dense_4h_to_h); [] takes none."""
    from peft import IA3Config, get_peft_model
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from transformers import BloomConfig

    from ia3_dist.config import IA3Section
    from ia3_dist.models.ia3 import apply_ia3, ia3_config
    from ia3_dist.models.load import base_on_meta

    shape = BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=64)
    targets = ["query_key_value", "dense_4h_to_h"]

    def feedforward(model: Any) -> set[str]:
        return {n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.is_feedforward}

    ours = feedforward(apply_ia3(base_on_meta(shape), IA3Section(target_modules=targets)))
    pefts = feedforward(get_peft_model(base_on_meta(shape), IA3Config(task_type="CAUSAL_LM", target_modules=targets)))
    assert ours == pefts and len(ours) == 2 and all(n.endswith("dense_4h_to_h") for n in ours)
    assert not feedforward(apply_ia3(base_on_meta(shape), IA3Section(target_modules=targets, feedforward_modules=[])))
    # A model type PEFT has no default for keeps working: none of the named targets is feed-forward.
    assert not ia3_config(IA3Section(target_modules=["qkv_proj"]), "phi3").feedforward_modules


@pytest.mark.parametrize("text, key, shown", [("train:\n  seed: 0123\n", "train.seed", "83"),
                                              ("data:\n  max_length: 0512\n", "data.max_length", "330"),
                                              ("train:\n  max_steps: 1:30\n", "train.max_steps", "90")])
def test_yaml11_octal_and_base60_numbers_are_refused(tmp_path: Path, text: str, key: str, shown: str) -> None:
    """YAML 1.1 reads 0123 as octal 83 and 1:30 as 90: a setting that took them trained with another value than
    written, without a word. In the file and as an override, the message names both spellings."""
    f = _w(tmp_path / "c.yaml", text)
    written = text.split(": ", 1)[1].strip()
    assert f"'{key}': {written} is read by YAML 1.1 as {shown}" in _refused(load_config, f)
    assert f"{written} is read by YAML 1.1 as {shown}" in _refused(load_config, TINY, [f"{key}={written}"])
    assert load_config(TINY, ["train.seed=123", "train.lr=0.003", "train.max_steps=0"]).train.seed == 123


@pytest.mark.parametrize("overrides, needle", [
    (["train.objective=dpo", "train.cpo_alpha=1"], "'train.cpo_alpha': weights the chosen answers' NLL in "
                                                   "train.objective=simpo; dpo does not read it"),
    (["eval.limit=5"], "'eval.limit': limits the documents of eval.tasks, and none is set"),
])
def test_settings_that_would_do_nothing_are_refused(overrides: list[str], needle: str) -> None:
    """Accepted, they changed nothing (label_smoothing and eval.every were already refused so)."""
    assert needle in _refused(load_config, TINY, overrides)


@pytest.mark.parametrize("overrides, needle", [
    (["data.packing=true", "train.micro_batch_size=auto"], "override data.packing=true: config key 'data.packing': "
                                                           "does not combine with train.micro_batch_size=auto"),
    (["train.compile=true", "deepspeed.config=zero3"], "override train.compile=true: config key 'train.compile': is "
                                                       "not supported with ZeRO-3"),
])
def test_combinations_refused_by_the_config_name_where_they_were_set(overrides: list[str], needle: str) -> None:
    assert needle in _refused(load_config, TINY, overrides)


@pytest.mark.parametrize("value, entry", [("[query_key_value,mlp.dense_4h_to_hh]", "mlp.dense_4h_to_hh"),
                                          ("[attn]", "attn"), ("[h.0.mlp.dense_4h_to_h,4h_to_h]", "4h_to_h")])
def test_a_module_name_that_matches_nothing_exits_2(value: str, entry: str, tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """PEFT drops a target entry that matches no module as long as another one matches: a typo trained the rest
    without a word (1,536 trainable parameters instead of 3,584) and the adapter config recorded it. Refused before
    anything starts, naming the key, the entry and the model's linear layers as an entry names them."""
    err = check_exits_2(tmp_path, tiny_model, capsys, [f"ia3.target_modules={value}"])
    assert f"config key 'ia3.target_modules': '{entry}' names no module of the model" in err, err
    assert "mlp.dense_4h_to_h, mlp.dense_h_to_4h, self_attention.dense, self_attention.query_key_value" in err, err


def test_optional_switches_take_auto_as_the_readme_lists_them(tmp_path: Path) -> None:
    """data.group_by_length and train.lean_host_memory default to auto (null: the run decides): `auto`, written as
    the README's table lists it, was refused with "expected true or false"."""
    cfg = load_config(TINY, ["data.group_by_length=auto", "train.lean_host_memory=auto"])
    assert cfg.data.group_by_length is None and cfg.train.lean_host_memory is None
    f = _w(tmp_path / "c.yaml", "data:\n  group_by_length: auto\ntrain:\n  lean_host_memory: true\n")
    assert load_config(f).data.group_by_length is None and load_config(f).train.lean_host_memory is True
    assert "expected true, false or auto (null), got 'maybe'" in _refused(load_config, TINY,
                                                                         ["data.group_by_length=maybe"])


@pytest.mark.parametrize("override, kind", [("ia3.target_modules=[query_key_value", "list"),
                                            ("data.columns={instruction: q", "mapping")])
def test_a_list_or_mapping_override_that_does_not_parse_is_refused(override: str, kind: str, tmp_path: Path) -> None:
    """YAML cannot read an unclosed bracket, so the override came as text: '[query_key_value' was taken as one
    module name (then PEFT's own message). Refused, saying why and how to write it. Settings that take text keep
    bracketed text (a Llama 2 style template; a file name, in an override or quoted in a file)."""
    key = override.split("=", 1)[0]
    msg = _refused(load_config, TINY, [override])
    assert msg.startswith(f"override {override}: config key '{key}'"), msg
    assert f"opens a YAML {kind} that does not parse" in msg, msg
    assert load_config(TINY, ["data.template=[INST] {instruction} [/INST]"]).data.template.startswith("[INST]")
    assert load_config(TINY, ["data.path=[v2]train.jsonl"]).data.path == "[v2]train.jsonl"
    f = _w(tmp_path / "c.yaml", 'data:\n  path: "[v2]train.jsonl"\nia3:\n  target_modules: ["query_key_value"]\n')
    assert load_config(f).data.path == "[v2]train.jsonl"


def test_preflight_errors_name_where_the_key_was_set(tmp_path: Path, tiny_model: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A key refused in the preflight (a check that needs the world, the model or the data) is named with the file
    line or the override that set it, as the loader's own errors are (the README's promise for every bad value)."""
    raw = yaml.safe_load((ROOT / TINY).read_text())
    raw["train"]["global_batch_size"] = 10
    raw["train"].pop("grad_accum", None)
    text = yaml.safe_dump(raw, sort_keys=False)
    f = _w(tmp_path / "c.yaml", text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().startswith("global_batch_size:"))
    # A key the preflight derived from another names the one that was set, not a line that set something else.
    err = check_exits_2(tmp_path, tiny_model, capsys, ["data.limit=3", "train.global_batch_size=64"])
    assert "override train.global_batch_size=64: config key 'train.global_batch_size': 64 makes an accumulation" \
        in err, err
    for args, where in ((["--config", str(f), "--world-size", "2"], f"{f}:{line}: "),
                        (["--config", TINY, "--world-size", "2", "train.global_batch_size=10"],
                         "override train.global_batch_size=10: ")):
        err = check_exits_2(tmp_path, tiny_model, capsys, args)
        assert f"{where}config key 'train.global_batch_size': 10 is not a multiple" in err, err
    err = check_exits_2(tmp_path, tiny_model, capsys, ["train.compile=true", "deepspeed.config=zero3"])
    assert err.startswith("ia3-dist: error: override train.compile=true: config key 'train.compile'"), err


def test_the_names_offered_for_a_wrong_target_are_the_layers_ia3_wraps() -> None:
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: the names a typo is told about must be them."""
    from transformers import GPT2Config

    from ia3_dist.config import IA3Section
    from ia3_dist.models.ia3 import check_module_names
    from ia3_dist.models.load import base_on_meta

    model = base_on_meta(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(UsageError, match=r"'mlp\.c_prj' names no module .*attn\.c_attn.*mlp\.c_proj"):
        check_module_names(model, IA3Section(target_modules=["c_attn", "mlp.c_prj"]))
    check_module_names(model, IA3Section(target_modules=["c_attn", "mlp.c_proj"]))
