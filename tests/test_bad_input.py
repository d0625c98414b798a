"""Preflight: a table of malformed inputs (config, data, model/tokenizer dirs, DeepSpeed file, output dir), each
exiting 2 from ``ia3-dist check`` with a message naming the problem and leaving the output dir as it was; the
bad-record skip policy; and hypothesis fuzzing of the record reader and the config loader."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia3_dist.cli import main
from ia3_dist.config import DataSection, apply_overrides, build_config, load_config
from ia3_dist.data.records import load_records
from ia3_dist.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
GOOD = [{"instruction": "问题", "input": "", "output": "回答。"}] * 3


def _w(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def _model_copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _small_vocab_model(tmp: Path, tiny_model: Path) -> str:
    from transformers import BloomConfig, BloomForCausalLM

    d = tmp / "small-vocab"
    BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(str(d))
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return str(d)


def _no_eos_tokenizer(tmp: Path, tiny_model: Path) -> str:
    d = _model_copy(tiny_model, tmp / "no-eos")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("eos_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    stm = d / "special_tokens_map.json"
    if stm.exists():
        m = json.loads(stm.read_text())
        m.pop("eos_token", None)
        stm.write_text(json.dumps(m))
    return str(d)


def _sharded_missing(tmp: Path, tiny_model: Path) -> str:
    d = _model_copy(tiny_model, tmp / "sharded", drop=("model.safetensors",))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return str(d)


def _weights_without(tmp: Path, tiny_model: Path, key: str = "transformer.h.0.mlp.dense_4h_to_h.weight") -> str:
    from safetensors.torch import load_file, save_file

    d = _model_copy(tiny_model, tmp / "holey")
    sd = load_file(str(d / "model.safetensors"))
    del sd[key]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def _config_disagrees(tmp: Path, tiny_model: Path) -> str:
    d = _model_copy(tiny_model, tmp / "wider")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _config_edit(**fields: object) -> Callable[[Path, Path], str]:
    """The tiny model with ``fields`` set in its config.json."""
    def make(tmp: Path, tiny_model: Path) -> str:
        d = _model_copy(tiny_model, tmp / "edited")
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)
    return make


def _fake_checkpoint(out: Path) -> None:
    (out / "checkpoints" / "step3").mkdir(parents=True)
    (out / "checkpoints" / "step3" / "meta.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text("step3")


Case = tuple[Callable[[Path, Path], list[str]], str]


def data(name: str, content: str | bytes) -> Callable[[Path, Path], list[str]]:
    return lambda t, m: ["data.path=" + _w(t / name, content)]


def dsfile(content: str | dict) -> Callable[[Path, Path], list[str]]:
    text = content if isinstance(content, str) else json.dumps(content)
    return lambda t, m: ["deepspeed.config=" + _w(t / "ds.json", text)]


def path_arg(key: str, make: Callable[[Path, Path], object]) -> Callable[[Path, Path], list[str]]:
    return lambda t, m: [f"{key}={make(t, m)}"]


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


REC = json.dumps(GOOD[0])
USERS_ONLY = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n{% endif %}{% endfor %}"
# Each case: (build files under tmp -> extra CLI args, substring the error message must contain).
CASES: dict[str, Case] = {
    # config
    # The override is named, not the config file (which does not hold the mistake).
    "unknown-section": (lambda t, m: ["trian.lr=1"], "override trian.lr=1: config key 'trian': unknown key"),
    "override-under-unset-key": (lambda t, m: ["hardware.nodes.x=1"],
                                 "override hardware.nodes.x=1: config key 'hardware.nodes'"),
    "unknown-key": (lambda t, m: ["train.learning_rate=1"], "'train.learning_rate': unknown key"),
    "int-as-text": (lambda t, m: ["train.grad_accum=many"], "'train.grad_accum': expected an integer"),
    "bool-as-int": (lambda t, m: ["data.shuffle=3"], "'data.shuffle': expected true or false"),
    "negative-lr": (lambda t, m: ["train.lr=-0.1"], "'train.lr': must be a positive number"),
    "bad-precision": (lambda t, m: ["train.precision=int8"], "'train.precision': must be one of"),
    "zero-micro-batch": (lambda t, m: ["train.micro_batch_size=0"], "'train.micro_batch_size': must be >= 1"),
    "bad-policy": (lambda t, m: ["data.on_bad_record=ignore"], "'data.on_bad_record'"),
    "bad-template": (lambda t, m: ["data.prompt_template={question}"], "'data.prompt_template'"),
    "template-without-instruction": (lambda t, m: ["data.prompt_template=Q: {input}"],
                                     "'data.prompt_template': has no {instruction} field"),
    "mixture-weight-huge": (lambda t, m: ["data.path=null", "data.sources=[{path: a.json, weight: 1e308}, "
                                          "{path: b.json, weight: 1e308}]"],
                            "'data.sources[0].weight': must be between 1e-09 and 1e+09"),
    "mixture-weight-subnormal": (lambda t, m: ["data.path=null", "data.sources=[{path: a.json, weight: 1e-320}]"],
                                 "'data.sources[0].weight': must be between"),
    "columns-share-one": (lambda t, m: ["data.columns={instruction: output}"],
                          "'data.columns': instruction and output both read column 'output'"),
    "override-no-equals": (lambda t, m: ["train.lr"], "expected key.sub=value"),
    "override-into-value": (lambda t, m: ["train.lr=1", "train.lr.x=2"], "'train.lr' is not a section"),
    "yaml-syntax": (lambda t, m: ["--config", _w(t / "c.yaml", "train:\n  lr: [1,\n")], "invalid YAML"),
    "yaml-not-mapping": (lambda t, m: ["--config", _w(t / "c.yaml", "- a\n- b\n")], "top level must be a mapping"),
    "config-missing": (lambda t, m: ["--config", str(t / "nope.yaml")], "nope.yaml: not found"),
    # data
    "json-syntax": (data("d.json", '[{"instruction": "a",, }]'), "d.json:1:"),
    "json-not-list": (data("d.json", '{"instruction": "a"}'), "expected a JSON list of records"),
    "jsonl-bad-line": (data("d.jsonl", REC + "\n{oops\n"), "d.jsonl:2:2: invalid JSON"),
    # Cut short at the line's end: the column is that end's, not column 1 of a next line.
    "jsonl-cut-line": (data("d.jsonl", REC + '\n{"instruction": "a", "output": "b"\n'), "d.jsonl:2:35: invalid JSON"),
    "missing-output": (data("d.json", json.dumps([{"instruction": "a"}])), "record 0: missing field 'output'"),
    "non-string-field": (data("d.json", json.dumps([GOOD[0], {"instruction": "a", "output": 5}])),
                         "record 1: field 'output' must be a string, got int"),
    "record-not-object": (data("d.json", json.dumps(["just text"])), "record 0: expected an object"),
    "empty-object": (data("d.jsonl", "{}\n"), "d.jsonl:1: missing field"),
    "empty-record": (data("d.json", json.dumps([{"instruction": " ", "output": ""}])), "empty record"),
    "empty-dataset": (data("d.json", "[]"), "no usable records"),
    "empty-jsonl": (data("d.jsonl", ""), "no usable records"),
    "non-utf8-json": (data("d.json", b'[{"instruction": "a", "output": "' + bytes([0xFF, 0xFE]) + b'"}]'),
                      "d.json:1: not UTF-8"),
    "non-utf8-jsonl": (data("d.jsonl", REC.encode() + b"\n" + bytes([0xC3, 0x28]) + b"\n"), "d.jsonl:2: not UTF-8"),
    "dir-not-dataset": (path_arg("data.path", lambda t, m: _mkdir(t / "dd")), "not a datasets save_to_disk dataset"),
    "unknown-format": (data("d.txt", "a,b"), "unknown data format '.txt'"),
    "data-missing": (path_arg("data.path", lambda t, m: t / "none.json"), "file not found"),
    "all-prompt": (data("d.json", json.dumps([{"instruction": "长" * 300, "output": "x"}])),
                   "every record is all prompt"),
    # Nothing cut: raising data.max_length (what the message said) could not help.
    "template-labels-nothing": (lambda t, m: ["data.template=" + _w(t / "users.jinja", USERS_ONLY),
                                              "data.path=" + _w(t / "d.json", json.dumps(GOOD))],
                                "none was cut at data.max_length=256: data.template="),
    # model and tokenizer
    "model-missing": (path_arg("model.path", lambda t, m: t / "no-model"), "no such directory"),
    "model-no-config": (path_arg("model.path", lambda t, m: _model_copy(m, t / "mc", drop=("config.json",))),
                        "no config.json"),
    "model-no-weights": (path_arg("model.path", lambda t, m: _model_copy(m, t / "mw", drop=("model.safetensors",))),
                         "no weights"),
    "model-missing-shard": (path_arg("model.path", _sharded_missing), "weight shards missing"),
    "vocab-too-large": (path_arg("model.path", _small_vocab_model), "embeddings have 100 rows"),
    "weights-missing-tensor": (path_arg("model.path", _weights_without),
                               "no weights for transformer.h.0.mlp.dense_4h_to_h.weight"),
    "weights-config-disagree": (path_arg("model.path", _config_disagrees), "config.json and the weights disagree"),
    # config.json fields transformers validates when it reads the file, when it builds the model, or never (a
    # layer count of 0 built an empty model that failed after the ranks had met)
    "config-field-type": (path_arg("model.path", _config_edit(hidden_size="64")), "'hidden_size' is \"64\""),
    "config-field-null": (path_arg("model.path", _config_edit(n_head=None, num_attention_heads=None)),
                          "cannot read config.json (StrictDataclassFieldValidationError"),
    "config-bool-as-text": (path_arg("model.path", _config_edit(tie_word_embeddings="yes")),
                            "expected bool, got str"),
    "config-no-layers": (path_arg("model.path", _config_edit(n_layer=0)), "'n_layer' is 0"),
    "config-negative-layers": (path_arg("model.path", _config_edit(n_layer=-1)), "'n_layer' is -1"),
    "config-heads-do-not-divide": (path_arg("model.path", _config_edit(n_head=3)),
                                   "transformers cannot build a bloom model from it"),
    "config-unknown-dtype": (path_arg("model.path", _config_edit(dtype="float128")),
                             "has no attribute 'float128'"),
    "tokenizer-no-eos": (path_arg("model.tokenizer", _no_eos_tokenizer), "no eos token"),
    "tokenizer-empty-dir": (path_arg("model.tokenizer", lambda t, m: _mkdir(t / "tk")), "no tokenizer files"),
    # deepspeed
    "ds-unknown-stage": (dsfile({"zero_optimization": {"stage": 5}}), "zero_optimization.stage is 5"),
    "ds-conflict": (dsfile({"train_micro_batch_size_per_gpu": 16}), "'train_micro_batch_size_per_gpu' is 16"),
    "ds-offload-stage": (dsfile({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}),
                         "offload_param needs stage 3"),
    "ds-nvme-params": (dsfile({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
                       "offload_param.device nvme is not supported"),
    "ds-key-typo": (dsfile({"zero_optimisation": {"stage": 3}}),
                    "'zero_optimisation' is not a key DeepSpeed reads; did you mean 'zero_optimization'?"),
    "ds-json-syntax": (dsfile('{"zero_optimization": }'), "ds.json:1:23: invalid JSON"),
    "ds-leftover-auto": (dsfile({"steps_per_print": "auto"}), 'cannot resolve "auto" for steps_per_print'),
    "ds-missing": (lambda t, m: ["deepspeed.config=zero11"], "zero11: no such file"),
    # output dir and resume
    "output-has-checkpoints": (lambda t, m: _fake_checkpoint(t / "out") or ["output.overwrite=false"],
                               "holds another run's checkpoints"),
    "resume-not-checkpoint": (path_arg("train.resume", lambda t, m: _mkdir(t / "rr")), "not a complete checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_exits_2_naming_the_problem(case: str, tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    build, needle = CASES[case]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("user data")
    extra = build(tmp_path, tiny_model)
    if "--config" not in extra:
        model = [] if any(a.startswith("model.path=") for a in extra) else [f"model.path={tiny_model}"]
        extra = ["--config", TINY, *model, *extra]
    args = ["check", *extra, f"output.dir={out}"]
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "user data"


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30


def test_check_passes_and_reports_stats(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_model: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps(GOOD + [{"instruction": "长" * 300, "output": "x"}], ensure_ascii=False))
    assert main(["check", "--config", TINY, f"data.path={f}", "--world-size", "2", f"model.path={tiny_model}",
                 f"output.dir={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "4 records read" in out and "3 examples; 1 dropped" in out and f"first: {f}: record 3" in out
    assert "truncated at 256: 1 (25.0%)" in out and "length p50" in out
    assert "4 micro x 2 accum x 2 ranks = 16 global; 3 optimizer steps" in out and "preflight: OK" in out
    assert not (tmp_path / "o").exists()
    # train.global_batch_size replaces train.grad_accum (2 in tiny-cpu.yaml): the batch line says so.
    assert main(["check", "--config", TINY, f"data.path={f}", "--world-size", "2", f"model.path={tiny_model}",
                 f"output.dir={tmp_path / 'o'}", "train.global_batch_size=24"]) == 0
    out = capsys.readouterr().out
    assert ("4 micro x 3 accum x 2 ranks = 24 global (the accumulation follows train.global_batch_size=24; "
            "train.grad_accum is not used); 3 optimizer steps") in out, out


def test_skip_policy_counts_and_names_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  tiny_model: Path) -> None:
    lines = [json.dumps(GOOD[0]), "{bad json", json.dumps({"instruction": "a"}), json.dumps(GOOD[0]),
             json.dumps({"instruction": "x", "output": ["list"]})]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = load_records(DataSection(path=str(f), on_bad_record="skip"))
    assert len(r) == 2 and len(r.skipped) == 3
    assert [s.split(":")[1] for s in r.skipped] == ["2", "3", "5"]
    assert main(["check", "--config", TINY, f"data.path={f}", "data.on_bad_record=skip", f"model.path={tiny_model}",
                 f"output.dir={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "3 bad records skipped" in out and f"{f}:2:" in out
    with pytest.raises(UsageError, match="d.jsonl:2:2: invalid JSON.*on_bad_record=skip"):
        load_records(DataSection(path=str(f)))


# ------------------------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes or the config, only UsageError may escape.

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
record_like = st.dictionaries(st.sampled_from(["instruction", "input", "output", "extra"]), json_values, max_size=4)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".json", ".jsonl"]),
       policy=st.sampled_from(["error", "skip"]))
def test_fuzz_record_reader_bytes(tmp_path: Path, data: bytes, suffix: str, policy: str) -> None:
    f = tmp_path / f"fuzz{suffix}"
    f.write_bytes(data)
    try:
        load_records(DataSection(path=str(f), on_bad_record=policy))
    except UsageError:
        pass


@FUZZ
@given(recs=st.lists(record_like | json_values, max_size=6), policy=st.sampled_from(["error", "skip"]),
       as_lines=st.booleans())
def test_fuzz_record_reader_structures(tmp_path: Path, recs: list, policy: str, as_lines: bool) -> None:
    f = tmp_path / ("fuzz.jsonl" if as_lines else "fuzz.json")
    f.write_text("\n".join(json.dumps(r) for r in recs) if as_lines else json.dumps(recs))
    try:
        r = load_records(DataSection(path=str(f), on_bad_record=policy))
    except UsageError:
        return
    assert all(isinstance(x, str) for c in r.examples for t in c.turns for x in (t.instruction, t.input, t.output))


SECTIONS = ["model", "data", "ia3", "train", "deepspeed", "checkpoint", "output", "bogus"]
KEYS = ["path", "max_length", "lr", "epochs", "micro_batch_size", "grad_accum", "precision", "betas", "shuffle",
        "target_modules", "feedforward_modules", "config", "every", "keep", "dir", "prompt_template", "limit",
        "on_bad_record", "resume", "warmup_steps", "scheduler", "nope"]


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=5),
                           st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4) | json_values,
                           max_size=4))
def test_fuzz_config_loader_structures(raw: dict) -> None:
    try:
        build_config(raw)
    except UsageError:
        pass


@FUZZ
@given(text=st.text(max_size=300), overrides=st.lists(st.text(max_size=30), max_size=4))
def test_fuzz_config_loader_text_and_overrides(tmp_path: Path, text: str, overrides: list[str]) -> None:
    f = tmp_path / "fuzz.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        load_config(f, overrides)
    except UsageError:
        pass
    try:
        build_config(apply_overrides({}, overrides))
    except UsageError:
        pass


def test_empty_answers_are_counted_in_the_report(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 tiny_model: Path) -> None:
    """Records with an empty output train on their end token alone (the reference recipe keeps them): the data
    report counts them, so a file whose answers went missing in an export is seen before it trains."""
    f = tmp_path / "d.json"
    recs = [{"instruction": "你好", "input": "", "output": out} for out in ("", "很好。", "", "是")]
    f.write_text(json.dumps(recs, ensure_ascii=False))
    args = ["check", "--config", TINY, f"data.path={f}", f"model.path={tiny_model}", f"output.dir={tmp_path / 'o'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 examples; 0 dropped" in out and "2 example(s) train on one label token: an empty answer" in out, out
    assert main([*args, "data.append_eos=false"]) == 0  # no end token: nothing to train on, dropped as unlabeled
    out = capsys.readouterr().out
    assert "2 examples; 2 dropped" in out and "train on one label token" not in out, out
