"""``ia3-dist eval`` (issue 33): a run's checkpoints on a local multiple-choice task with the base loaded once and
each checkpoint's vectors swapped in, data-parallel on 2 ranks, equal to lm-eval's own CLI on that checkpoint
exported as a merged model and to one process loading it afresh; the held-out loss per checkpoint; refusals before
anything loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _util import check, launch, lm_eval_registry_indexed_once

from ia3_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-cpu.yaml"
TASKS = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def registry_indexed_once() -> Iterator[None]:
    with lm_eval_registry_indexed_once():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """10 steps of the demo with checkpoints at 5 and 10 and a held-out split."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    check(launch(["--config", TINY, f"model.path={demo_model}", "train.max_steps=10", "checkpoint.every=5",
                  "checkpoint.keep=2", "data.eval_ratio=0.05", "train.eval_every=5", f"output.dir={out}"]))
    return out


def _adapter_of(run: Path, ckpt: str, dest: Path) -> Path:
    """The checkpoint's vectors as a PEFT adapter dir (the run's adapter files, its vectors replaced)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run / "adapter", dest)
    state = load_file(str(run / "checkpoints" / ckpt / "ia3_state.safetensors"))
    vec = {k[len("param/peft."):].replace(".default", ""): v for k, v in state.items() if k.startswith("param/")}
    assert set(vec) == set(load_file(str(dest / "adapter_model.safetensors")))
    save_file(vec, str(dest / "adapter_model.safetensors"))
    return dest


def _lm_eval_cli(model_dir: Path, out: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model_dir},dtype=float32", "--tasks", "tiny_mc", "--include_path",
                           str(TASKS), "--batch_size", "8", "--device", "cpu", "--output_path", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [res] = list(out.rglob("results*.json"))
    return json.loads(res.read_text())["results"]["tiny_mc"]


@pytest.mark.slow
def test_checkpoints_equal_lm_eval_on_their_merged_exports(run: Path, tmp_path: Path, monkeypatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    # Data-parallel on 2 ranks (each task's documents and the held-out data split between them); the single-process
    # path is the fresh adapter's below, and the two must agree exactly.
    proc = check(launch(["eval", str(run), "--tasks", "tiny_mc", "--include", str(TASKS)], nproc=2))
    text = proc.stdout
    assert "evaluated step5 (step 5) on 2 ranks" in text
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    got = {(r["checkpoint"], r["task"], r["metric"]): r["value"] for r in rows}
    assert {c for c, _, _ in got} == {"step5", "final"}  # step10 is the final adapter's step
    assert {("heldout", "loss")} <= {(t, m) for _, t, m in got}
    assert "tiny_mc acc,none" in text and (run / "eval" / "tiny_mc-acc_none.png").is_file()
    # The held-out loss at each checkpoint is the one training logged at that step.
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    assert got[("step5", "heldout", "loss")] == pytest.approx(logged[5], rel=1e-5)
    assert got[("final", "heldout", "loss")] == pytest.approx(logged[10], rel=1e-5)
    # lm-eval's own CLI on each checkpoint exported as a merged model.
    # (The final adapter matched as well; one checkpoint through the CLI keeps the suite short.)
    for name, adapter in (("step5", _adapter_of(run, "step5", tmp_path / "a5")),):
        merged = tmp_path / f"merged-{name}"
        assert main(["export", "--adapter", str(adapter), "--out", str(merged)]) == 0
        ref = _lm_eval_cli(merged, tmp_path / f"out-{name}")
        for metric in ("acc,none", "acc_norm,none"):
            assert got[(name, "tiny_mc", metric)] == pytest.approx(ref[metric], abs=1e-6), (name, metric)
    # Swapping vectors in place equals loading the checkpoint's adapter afresh.
    assert main(["eval", str(tmp_path / "a5"), "--tasks", "tiny_mc", "--include", str(TASKS), "--out",
                 str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())["rows"]
    for r in fresh:
        assert r["value"] == got[("step5", r["task"], r["metric"])], r
    # Each row says what it was measured with: the base, its dtype, the limit, lm-eval's version, the local tasks.
    from ia3_dist.models.files import weights_fingerprint
    from ia3_dist.train.benchmarks import include_digest

    base = json.loads((tmp_path / "a5" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert {(r["base"], r["base_weights"], r["dtype"], r["limit"], r["include_digest"]) for r in fresh} == \
        {(base, weights_fingerprint(Path(base)), "fp32", None, include_digest(TASKS)[:16])}
    assert all(isinstance(r["lm_eval"], str) for r in fresh)
    # The run's final adapter given alone: its results go to the run's eval/ (never into the adapter dir, which
    # the next adapter replaces whole), beside the earlier rows; its own rows replace the final point's.
    assert main(["eval", str(run / "adapter"), "--tasks", "tiny_mc", "--include", str(TASKS), "--limit", "3"]) == 0
    said = capsys.readouterr().out
    assert "measured otherwise (limit None)" in said and not (run / "adapter" / "eval").exists(), said
    after = {(r["checkpoint"], r["task"], r["metric"]): r["value"]
             for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}
    assert set(after) == set(got)
    assert all(after[k] == v for k, v in got.items() if k[0] == "step5" or k[1] == "heldout")


@pytest.mark.slow
def test_benchmarks_during_training_follow_the_best_on_zero2_and_zero3(tmp_path: Path, demo_model: Path, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """eval.tasks at eval.every on 2 ranks: data-parallel under ZeRO-2, every rank the whole task under ZeRO-3 (its
    forward passes gather parameters collectively); both log the same scores, equal to ia3-dist eval on the
    checkpoints afterwards, and checkpoint.keep_best follows a benchmark metric."""
    monkeypatch.chdir(ROOT)
    metric = "tiny_mc/acc_norm,none"
    common = ["--config", TINY, f"model.path={demo_model}", "train.max_steps=6", "checkpoint.every=3",
              "checkpoint.keep=3", "eval.tasks=[tiny_mc]", f"eval.include={TASKS}", "eval.every=3",
              f"checkpoint.keep_best={metric}", "train.lr=3e-2"]
    logged = {}
    for ds in ("zero2", "zero3"):
        out = tmp_path / ds
        proc = check(launch([*common, f"deepspeed.config={ds}", f"output.dir={out}"], nproc=2))
        assert "benchmarks: tiny_mc/acc,none" in proc.stdout, proc.stdout[-1500:]
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logged[ds] = {r["step"]: r for r in recs if metric in r}
        assert sorted(logged[ds]) == [3, 6]
    for step in (3, 6):
        for m in ("tiny_mc/acc,none", metric):
            assert logged["zero3"][step][m] == pytest.approx(logged["zero2"][step][m], abs=1e-6), (step, m)
    # The same scores from ia3-dist eval on the checkpoints afterwards (one process, vectors swapped in).
    run = tmp_path / "zero2"
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include", str(TASKS), "--checkpoints", "step3,final"]) == 0
    capsys.readouterr()
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    after = {(r["step"], f"{r['task']}/{r['metric']}"): r["value"] for r in rows}
    for step in (3, 6):
        for m in ("tiny_mc/acc,none", metric):
            assert after[(step, m)] == pytest.approx(logged["zero2"][step][m], abs=1e-6), (step, m)
    # checkpoint.keep_best: the first step with the highest acc_norm.
    best = max((3, 6), key=lambda s: (logged["zero2"][s][metric], -s))
    assert (run / "checkpoints" / "best").read_text().strip() == f"step{best}"


def _one_doc_task(d: Path) -> Path:
    """tiny_mc's first document alone, as task tiny_one in ``d``: fewer documents than 2 ranks."""
    d.mkdir(parents=True, exist_ok=True)
    data = d / "one.jsonl"
    data.write_text((TASKS / "tiny_mc.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    (d / "tiny_one.yaml").write_text((TASKS / "tiny_mc.yaml").read_text(encoding="utf-8")
                                     .replace("task: tiny_mc", "task: tiny_one")
                                     .replace("tests/data/tiny_mc.jsonl", str(data)), encoding="utf-8")
    return d


def _adapter(tiny_model: Path, dest: Path) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM")) \
        .save_pretrained(str(dest))
    return dest


@pytest.mark.slow
def test_a_task_with_fewer_documents_than_ranks_runs_on_every_rank(tmp_path: Path, tiny_model: Path, monkeypatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """lm-eval deals documents rank, rank + world, ...: a rank with none raised on that rank alone and failed the
    job. A task with 1 document on 2 ranks (no --limit, so the old eval.limit < world guard cannot see it) is
    evaluated whole by every rank, by ia3-dist eval and during training, with one process's scores."""
    monkeypatch.chdir(ROOT)
    tasks = _one_doc_task(tmp_path / "tasks")
    adapter = _adapter(tiny_model, tmp_path / "adapter")
    common = ["eval", str(adapter), "--tasks", "tiny_one", "--include", str(tasks)]
    proc = check(launch([*common, "--out", str(tmp_path / "two")], nproc=2))
    assert "fewer documents than the 2 ranks in tiny_one (1): every rank evaluates every document" in proc.stdout
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two, one = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("two", "one"))
    assert two == one and {r["metric"] for r in one} >= {"acc,none", "acc_norm,none"}, (two, one)
    out = tmp_path / "train"
    proc = check(launch(["--config", TINY, f"model.path={tiny_model}", "train.max_steps=2", "eval.tasks=[tiny_one]",
                         f"eval.include={tasks}", "eval.every=2", f"output.dir={out}"], nproc=2))
    assert "benchmarks: tiny_one/acc,none" in proc.stdout, proc.stdout[-1500:]


def test_few_shot_prompts_do_not_depend_on_the_number_of_ranks(tmp_path: Path, monkeypatch) -> None:
    """lm-eval draws each document's few-shot examples from one seeded generator in the order a rank meets its
    documents: split between 2 ranks first, most of tiny_mc's 24 documents got other examples than in one process,
    and the scores depended on the allocation. Under run_tasks' patch each rank builds the prompts as one process
    would and keeps its own documents (lm-eval's split, doc_id % world == rank): every document's 2-shot prompt on
    either of 2 ranks is the one a single process builds."""
    from lm_eval.tasks import TaskManager

    from ia3_dist.train.benchmarks import _prompts_as_one_process

    monkeypatch.chdir(ROOT)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc2.yaml").write_text((TASKS / "tiny_mc.yaml").read_text(encoding="utf-8")
                                         .replace("task: tiny_mc", "task: tiny_mc2")
                                         .replace("tests/data/tiny_mc.jsonl", str(TASKS / "tiny_mc.jsonl"))
                                         + "num_fewshot: 2\nfewshot_split: test\n", encoding="utf-8")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)

    def prompts(rank: int, world: int, patched: bool) -> dict[int, str]:
        task = tm.load(["tiny_mc2"])["tasks"]["tiny_mc2"]
        task.set_fewshot_seed(seed=1234)  # as simple_evaluate seeds every task before it builds the requests
        if patched:
            with _prompts_as_one_process():
                task.build_all_requests(rank=rank, world_size=world)
        else:
            task.build_all_requests(rank=rank, world_size=world)
        return {inst.doc_id: inst.args[0] for inst in task.instances}

    one = prompts(0, 1, False)
    assert len(one) == 24
    split = {**prompts(0, 2, False), **prompts(1, 2, False)}
    assert sorted(split) == sorted(one) and sum(split[d] != one[d] for d in one) > 12  # lm-eval's own: differ
    ranks = [prompts(r, 2, True) for r in (0, 1)]
    assert sorted(ranks[0]) == list(range(0, 24, 2)) and sorted(ranks[1]) == list(range(1, 24, 2))
    assert {**ranks[0], **ranks[1]} == one


def test_task_data_preflight_follows_lm_evals_include_path(tmp_path: Path) -> None:
    """lm-eval indexes an include dir recursively and datasets takes data_files as one path, a list or a mapping:
    a missing local file is refused in each shape, a task file in lm-eval's own layout (!function tags) and a
    glob that matches are not."""
    from ia3_dist.errors import UsageError
    from ia3_dist.train.benchmarks import _local_task_files

    here = tmp_path / "here.jsonl"
    here.write_text("{}\n")
    head = "task: t\ndataset_path: json\noutput_type: multiple_choice\n"
    for name, files in (("sub/a.yaml", "/nowhere/a.jsonl"), ("b.yaml", f"[{here}, /nowhere/b.jsonl]"),
                        ("c.yaml", "{test: [/nowhere/c.jsonl]}")):
        d = tmp_path / name.replace("/", "-")
        (d / name).parent.mkdir(parents=True)
        (d / name).write_text(f"{head}dataset_kwargs:\n  data_files: {files}\n")
        with pytest.raises(UsageError, match=f"names data file /nowhere/{name[-6]}.jsonl .*not on this machine"):
            _local_task_files(d)
    ok = tmp_path / "ok"
    (ok / "deep" / "er").mkdir(parents=True)
    (ok / "deep" / "er" / "t.yaml").write_text(f"{head}process_docs: !function utils.process_docs\n"
                                               f"dataset_kwargs:\n  data_files: {tmp_path}/*.jsonl\n")
    _local_task_files(ok)


def test_task_data_preflight_resolves_files_as_datasets_does(tmp_path: Path, monkeypatch) -> None:
    """datasets resolves relative data_files in dataset_path where that is a local dir (and its data_dir), in
    data_dir for a packaged builder (json): such tasks pass the preflight, as datasets loads them from anywhere,
    and a missing file there is still refused."""
    from datasets import load_dataset

    from ia3_dist.errors import UsageError
    from ia3_dist.train.benchmarks import _local_task_files

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "test.jsonl").write_text('{"q": 1}\n')
    monkeypatch.chdir(tmp_path)  # not where the files are named from
    layouts = {"local": (str(data), {"data_dir": "sub"}), "json": ("json", {"data_dir": str(data / "sub")})}
    for name, (path, extra) in layouts.items():
        d = tmp_path / f"tasks-{name}"
        d.mkdir()
        kw = {**extra, "data_files": {"test": "test.jsonl"}}
        (d / "t.yaml").write_text(json.dumps({"task": "t", "dataset_path": path, "dataset_kwargs": kw}))
        _local_task_files(d)
        assert len(load_dataset(path, **kw)["test"]) == 1, name  # what lm-eval calls
        (d / "t.yaml").write_text(json.dumps({"task": "t", "dataset_path": path,
                                              "dataset_kwargs": {**kw, "data_files": {"test": "none.jsonl"}}}))
        with pytest.raises(UsageError, match="names data file none.jsonl .*not on this machine"):
            _local_task_files(d)


@pytest.mark.usefixtures("registry_indexed_once")
@pytest.mark.slow
def test_refusals_before_anything_loads(run: Path, tmp_path: Path, monkeypatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["eval", str(run), "--tasks", "no_such_task", "--include", str(TASKS)]) == 2
    assert "unknown task(s) ['no_such_task']" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text("task: [unclosed\n")
    assert main(["eval", str(run), "--tasks", "t", "--include", str(bad)]) == 2
    assert "not a valid task YAML" in capsys.readouterr().err
    far = tmp_path / "far"
    far.mkdir()
    (far / "t.yaml").write_text((TASKS / "tiny_mc.yaml").read_text().replace("tests/data/tiny_mc.jsonl",
                                                                             "/nowhere/x.jsonl"))
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include", str(far)]) == 2
    assert "not on this machine" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include", str(TASKS), "--checkpoints", "step7"]) == 2
    assert "no checkpoint ['step7']" in capsys.readouterr().err
    # Where the results cannot go: refused first, not found once every checkpoint was evaluated.
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, why in ((afile, "is a file, not a directory"), (afile / "sub", "is not a directory, so it cannot")):
        assert main(["eval", str(run), "--tasks", "tiny_mc", "--include", str(TASKS), "--out", str(out)]) == 2
        assert f"--out {out}" in (err := capsys.readouterr().err) and why in err, err
    # A damaged checkpoint (a NaN vector; training saves none): refused before any point is evaluated, where it
    # scored chance level as a result.
    import torch
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    shutil.copytree(run, nan, ignore=shutil.ignore_patterns("eval"))
    f = nan / "checkpoints" / "step5" / "ia3_state.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.startswith("param/"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(f))
    assert main(["eval", str(nan), "--tasks", "tiny_mc", "--include", str(TASKS), "--checkpoints", "all"]) == 2
    assert "step5: " in (err := capsys.readouterr().err) and "holds non-finite values" in err, err
    assert not (nan / "eval").exists()
    # eval.tasks during training: the same checks in the run's preflight, nothing written.
    out = tmp_path / "train"
    assert main(["check", "--config", TINY, f"output.dir={out}", "eval.tasks=[tiny_mc, nope]",
                 f"eval.include={TASKS}"]) == 2
    assert "eval.tasks: unknown task(s) ['nope']" in capsys.readouterr().err and not out.exists()
    assert main(["check", "--config", TINY, f"output.dir={out}", "eval.tasks=[tiny_mc]", f"eval.include={far}"]) == 2
    assert "not on this machine" in capsys.readouterr().err
    assert main(["check", "--config", TINY, f"output.dir={out}", "checkpoint.keep_best=tiny_mc/acc,none"]) == 2
    assert "or <task>/<metric> of eval.tasks" not in capsys.readouterr().err  # no tasks: not offered
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", str(run), "--tasks", "tiny_mc"]) == 2
    assert "pip install 'ia3-dist[eval]'" in capsys.readouterr().err
    assert main(["check", "--config", TINY, f"output.dir={out}", "eval.tasks=[tiny_mc]"]) == 2
    assert "pip install 'ia3-dist[eval]'" in capsys.readouterr().err and not out.exists()


def test_a_run_with_nothing_to_evaluate_or_a_linked_eval_dir_is_refused_first(tmp_path: Path, tiny_model: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    """No tasks and no held-out data: exit 2 naming why, before any model loads, and an earlier results.json stays
    (it was replaced by an empty one, then the table crashed). A run dir's eval/ that is a link is not written
    through."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM")) \
        .save_pretrained(str(run / "adapter"))
    shutil.copy2(ROOT / TINY, run / "run.yaml")
    earlier = '{"tasks": ["tiny_mc"], "rows": []}\n'
    (run / "eval" / "results.json").write_text(earlier)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no held-out loss to evaluate (it sets no data.eval_ratio" in err and "name lm-eval tasks" in err \
        and "Traceback" not in err, err
    shutil.copy2(ROOT / "configs" / "tiny-dpo-cpu.yaml", run / "run.yaml")  # held-out pairs: not a loss eval takes
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "for train.objective sft only; this run's is dpo" in err, err
    assert (run / "eval" / "results.json").read_text() == earlier
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy2(ROOT / TINY, linked / "run.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (linked / "eval").symlink_to(elsewhere)
    assert main(["eval", str(linked), "--tasks", "tiny_mc", "--include", str(TASKS)]) == 2
    assert "a link; evaluation results go into a real directory" in capsys.readouterr().err
    assert not list(elsewhere.iterdir())


@pytest.mark.slow
def test_summary_ranks_a_local_sweep_by_a_benchmark_metric(tmp_path: Path, tiny_model: Path, monkeypatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """3 tasks of a sweep, each trained with its task's command, evaluated (`ia3-dist eval --checkpoints latest`),
    then `summary --metric`: a column with each task's value and the tasks ranked by it (held-out loss ascending,
    accuracy descending). (The sweep's own runner, --local, is test_sweep's; here the tasks run as the array would
    run them, with one rank, through the tests' warm interpreter.)"""
    d = tmp_path / "sw"
    assert main(["sweep", "--no-submit", "--gpus-per-node", "0", "--cpus-per-node", "1", "--config",
                 str(ROOT / TINY), "--grid", "train.lr=3e-3,3e-2,1e-1", "--dir", str(d), f"model.path={tiny_model}",
                 "train.max_steps=2", "data.eval_ratio=0.1", "checkpoint.at_end=false"]) == 0
    rec = json.loads((d / "sweep.json").read_text())
    for task in rec["tasks"]:
        check(launch(["--config", rec["config"], *rec["overrides"], *task["overrides"]]))
    monkeypatch.chdir(ROOT)
    tasks = sorted(p for p in d.iterdir() if (p / "adapter").is_dir())
    assert len(tasks) == 3
    for t in tasks:
        assert main(["eval", str(t), "--tasks", "tiny_mc", "--include", str(TASKS), "--checkpoints", "latest",
                     "--limit", "4"]) == 0
    capsys.readouterr()
    for metric, lower in (("heldout/loss", True), ("tiny_mc/acc,none", False)):
        assert main(["summary", str(d), "--metric", metric, "--json", "--no-plot"]) == 0
        got = json.loads(capsys.readouterr().out)
        rows = got["rows"]
        assert got["keys"][0] == "rank" and got["keys"][-1] == metric
        values = [r[metric] for r in rows]
        assert all(v is not None for v in values) and [r["rank"] for r in rows] == [1, 2, 3]
        assert values == sorted(values, reverse=not lower), values
        for r in rows:  # each value is the task's own results.json row
            res = json.loads((Path(r["dir"]) / "eval" / "results.json").read_text())["rows"]
            task, name = metric.split("/")
            assert r[metric] == next(x["value"] for x in res if (x["task"], x["metric"]) == (task, name))
        if lower:
            assert len(set(values)) == 3, values  # three learning rates, three held-out losses: a real ordering
    assert main(["summary", str(d), "--metric", "tiny_mc"]) == 2
    assert "expected TASK/METRIC" in capsys.readouterr().err


def test_summary_names_the_scores_a_metric_without_its_filter_missed(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """`summary --metric tiny_mc/acc`: lm-eval names the score acc,none, so no run matched and each showed "-"
    without a word. A note now names what the runs' results hold for the task."""
    for i, v in enumerate((0.5, 0.75)):
        d = tmp_path / f"run{i}"
        (d / "eval").mkdir(parents=True)
        shutil.copy2(ROOT / TINY, d / "run.yaml")
        (d / "eval" / "results.json").write_text(json.dumps({"rows": [
            {"task": "tiny_mc", "metric": "acc,none", "checkpoint": "final", "step": 2, "value": v},
            {"task": "tiny_mc", "metric": "acc_stderr,none", "checkpoint": "final", "step": 2, "value": 0.1}]}))
    assert main(["summary", str(tmp_path / "run0"), str(tmp_path / "run1"), "--metric", "tiny_mc/acc",
                 "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "--metric tiny_mc/acc: no run has it; their eval/results.json hold tiny_mc/acc,none" in err, err
    assert main(["summary", str(tmp_path / "run0"), str(tmp_path / "run1"), "--metric", "tiny_mc/acc,none",
                 "--no-plot"]) == 0
    assert "no run has it" not in capsys.readouterr().err


def test_results_go_to_the_run_never_into_an_adapter_dir_and_keep_earlier_rows(tmp_path: Path) -> None:
    """Without --out: <run>/eval for a run dir and for the run's own adapter dir (written into the adapter dir,
    they were removed with it when the run wrote its next adapter); an adapter dir outside a run needs --out.
    eval/ is the run's: output.overwrite sets it aside with the rest, so the rows kept are always this run's."""
    from ia3_dist.errors import UsageError
    from ia3_dist.runtime import manifest
    from ia3_dist.tools.benchmark import default_out, earlier_rows

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / manifest.MANIFEST).write_text("{}")
    assert default_out(run, run) == run / "eval" and default_out(run / "adapter", None) == run / "eval"
    (tmp_path / "loose").mkdir()
    with pytest.raises(UsageError, match="an adapter dir outside a run; give --out"):
        default_out(tmp_path / "loose", None)
    assert "eval" in manifest.RUN_DIRS
    # The base loads in the run's precision (what its own evaluations ran in; half fp32's memory in bf16).
    from ia3_dist.config import load_config
    from ia3_dist.tools.benchmark import run_precision

    assert run_precision(run) == "fp32"  # no run.yaml
    (run / "run.yaml").write_text(load_config(ROOT / TINY, ["train.precision=bf16"]).to_yaml())
    assert run_precision(run) == "bf16"
    f = run / "eval" / "results.json"
    f.parent.mkdir()
    good = {"checkpoint": "step5", "step": 5, "task": "t", "metric": "acc,none", "value": 0.5}
    f.write_text(json.dumps({"rows": [good, {**good, "step": "5"}, {**good, "value": None}, "x"]}))
    assert earlier_rows(f) == [good]
    f.write_text("{not json")
    assert earlier_rows(f) == [] and earlier_rows(run / "none.json") == []
    # A run written in chunks (train.stop_after_steps) has a final point per chunk evaluated: summary takes the
    # latest.
    from ia3_dist.tools.summary import eval_value

    finals = [{**good, "checkpoint": "final", "step": s, "value": v} for s, v in ((20, 0.75), (10, 0.25))]
    f.write_text(json.dumps({"rows": [good, *finals]}))
    assert eval_value(run, "t/acc,none") == 0.75


def test_the_final_steps_checkpoint_name_picks_the_final_point(tmp_path: Path) -> None:
    from ia3_dist.tools.benchmark import points_of

    r = tmp_path / "run"
    (r / "adapter").mkdir(parents=True)
    (r / "adapter/adapter_config.json").write_text("{}")
    for s in (5, 10):
        (r / f"checkpoints/step{s}").mkdir(parents=True)
        (r / f"checkpoints/step{s}/ia3_state.safetensors").write_bytes(b"x")
    (r / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 11)))
    pick = {w: [(p.name, p.step) for p in points_of(r, w)[1]] for w in ("step5", "step10", "step10,final")}
    assert pick == {"step5": [("step5", 5)], "step10": [("final", 10)], "step10,final": [("final", 10)]}
    # The step the adapter records wins over the run's logs: early stopping's best vectors (step 5) written as
    # the final adapter, or (final=best with no best carried over a resume) the last step's after all.
    from ia3_dist.runtime.adapter import STEP_FILE

    (r / "adapter" / STEP_FILE).write_text('{"step": 5}')
    assert [(p.name, p.step) for p in points_of(r, "all")[1]] == [("final", 5), ("step10", 10)]
    assert [(p.name, p.step) for p in points_of(r, "step5")[1]] == [("final", 5)]
    (r / "adapter" / STEP_FILE).write_text('{"step": "5"}')  # damaged: the logs say
    assert [(p.name, p.step) for p in points_of(r, "all")[1]] == [("step5", 5), ("final", 10)]
    # An adapter dir given alone is one point, at the step it records (not 0).
    (r / "adapter" / STEP_FILE).write_text('{"step": 10}')
    assert [(p.name, p.step) for p in points_of(r / "adapter", "final")[1]] == [("final", 10)]
    # --checkpoints best by held-out loss: an evaluation that diverged (NaN) is never the best.
    from ia3_dist.tools.benchmark import _best

    (r / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (
        {"step": 5, "eval_loss": float("nan")}, {"step": 10, "eval_loss": 1.2})))
    assert _best(r, points_of(r, "all")[1]).step == 10


@pytest.mark.parametrize("save", ["bin", "links"])
def test_eval_takes_the_adapters_generate_accepts(save: str, tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    # The final point's vectors are the loaded adapter's: a .bin save or a hub snapshot's links load as for
    # generate and export, instead of being refused after the base loaded.
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.tools.benchmark import Point, evaluate_points

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, q in pm.named_parameters():
            if "ia3_l" in n:
                q.fill_(0.5)
    ad = tmp_path / "adapter"
    if save == "bin":
        pm.save_pretrained(str(ad), safe_serialization=False)
    else:  # the hub cache's layout: a snapshot's files link into the repo's blobs/
        repo = tmp_path / "models--someone--adapter"
        blob = repo / "blobs"
        pm.save_pretrained(str(blob))
        ad = repo / "snapshots" / "0123abcd"
        ad.mkdir(parents=True)
        for f in blob.iterdir():
            os.symlink(os.path.relpath(f, ad), ad / f.name)
    seen = []
    from ia3_dist.tools import benchmark

    real = benchmark.swap_in

    def spy(model, vectors, where):
        seen.append(vectors)
        return real(model, vectors, where)

    monkeypatch.setattr(benchmark, "swap_in", spy)
    assert evaluate_points(ad, [Point("final", 0, ad)], [], None, 8, None, None) == []
    assert seen and all(float(v.min()) == float(v.max()) == 0.5 for v in seen[0].values())


GEN_QUESTIONS = ("熊猫怎么样？", "太阳怎么样？", "大海怎么样？")


def _gen_task(d: Path, name: str, targets: list[str], generation: str) -> Path:
    """A generate_until task ``name`` over :data:`GEN_QUESTIONS` and their ``targets`` (exact match), with local
    data in ``d``; ``generation``: its generation_kwargs besides ``until: ["。"]``, as YAML lines."""
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}, ensure_ascii=False) + "\n"
                            for q, a in zip(GEN_QUESTIONS, targets, strict=True)), encoding="utf-8")
    (d / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["。"]
{generation}metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return d


def _sampling_task(d: Path) -> Path:
    """tiny_gen: a generate_until task that samples (do_sample)."""
    return _gen_task(d, "tiny_gen", ["很好"] * 3, "  do_sample: true\n  temperature: 1.0\n  max_gen_toks: 4\n")


@pytest.mark.slow
def test_a_sampling_benchmark_leaves_training_as_it_was(tmp_path: Path, demo_model: Path) -> None:
    """A benchmark that samples draws from the run's random generator: with dropout on, every later step trained
    on other masks than a run without the benchmark. The run's random state comes back after it (and lm-eval's
    fixed seeds make the score what `ia3-dist eval` gives): the losses equal a run without eval.tasks."""
    model = tmp_path / "dropout-model"
    shutil.copytree(demo_model, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_dropout": 0.2, "attention_dropout": 0.2}))
    tasks = _sampling_task(tmp_path / "tasks")
    common = ["--config", TINY, f"model.path={model}", "train.max_steps=4", "train.log_every=1",
              "checkpoint.at_end=false"]
    plain = tmp_path / "plain"
    check(launch([*common, f"output.dir={plain}"]))
    evald = tmp_path / "evald"
    proc = check(launch([*common, f"output.dir={evald}", "eval.tasks=[tiny_gen]", f"eval.include={tasks}",
                         "eval.every=1"]))
    assert "benchmarks: tiny_gen/exact_match" in proc.stdout, proc.stdout[-2000:]
    want = [r["loss"] for r in [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
            if "loss" in r]
    got = [r["loss"] for r in [json.loads(x) for x in (evald / "metrics.jsonl").read_text().splitlines()]
           if "loss" in r]
    assert len(want) == 4 and got == want


def test_tasks_whose_names_differ_only_in_non_ascii_get_a_plot_each(tmp_path: Path) -> None:
    """C-Eval-style task names in Chinese became the same file name (every character outside ASCII an '_'): the
    second plot replaced the first. Names that collide get a digest of the task and metric; the rest stay."""
    from ia3_dist.tools.benchmark import plot

    rows = [{"task": t, "metric": "acc,none", "step": s, "value": 0.5} for t in ("高中数学", "高中物理", "tiny_mc")
            for s in (1, 2)]
    files = plot(rows, tmp_path)
    assert len({f.name for f in files}) == 3 and all(f.is_file() for f in files)
    assert (tmp_path / "tiny_mc-acc_none.png") in files


def test_a_task_that_lm_eval_cannot_build_is_refused_in_the_preflight(tmp_path: Path, monkeypatch) -> None:
    """A typo in doc_to_text passed the preflight; lm-eval renders a first document in each task's constructor, so
    the run trained until its first evaluation and died there (no checkpoint of that interval). The local tasks
    are built in the preflight: exit 2 naming them, before anything loads."""
    from ia3_dist.errors import UsageError
    from ia3_dist.train.benchmarks import check_tasks

    monkeypatch.chdir(ROOT)
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "typo.yaml").write_text((TASKS / "tiny_mc.yaml").read_text(encoding="utf-8")
                                 .replace("task: tiny_mc", "task: typo").replace("{{question}}", "{{questoin}}"),
                                 encoding="utf-8")
    with pytest.raises(UsageError, match=r"--tasks typo: lm-eval cannot build them from .*questoin"):
        check_tasks(["typo"], d)
    assert "tiny_mc" in check_tasks(["tiny_mc"], TASKS).all_tasks


@pytest.mark.usefixtures("registry_indexed_once")
@pytest.mark.slow
def test_a_local_group_of_registry_tasks_is_read_with_the_registry(tmp_path: Path) -> None:
    """A local group listing a registry task was read with the local index alone, which cannot load that member:
    a TypeError at the first evaluation. Groups and tags go through the whole registry."""
    from ia3_dist.train.benchmarks import check_tasks

    d = tmp_path / "tasks"
    d.mkdir()
    (d / "suite.yaml").write_text("group: my_suite\ntask:\n  - arc_easy\n", encoding="utf-8")
    tm = check_tasks(["my_suite"], d)
    assert "arc_easy" in tm.all_tasks and "my_suite" in tm.all_tasks


def test_task_data_preflight_reads_included_yaml(tmp_path: Path) -> None:
    """lm-eval's usual layout: a shared _base_yml gives dataset_path (or data_files) and each task includes it.
    The preflight read the task file's own keys alone: a file found by lm-eval was refused, and a missing one that
    only the included file names went unchecked."""
    from ia3_dist.errors import UsageError
    from ia3_dist.train.benchmarks import _local_task_files

    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("{}\n")
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "_base_yml").write_text(f"dataset_path: {data}\noutput_type: multiple_choice\n")
    (ok / "t.yaml").write_text("include: _base_yml\ntask: t\ndataset_kwargs:\n  data_files:\n    test: test.jsonl\n")
    _local_task_files(ok)  # test.jsonl resolves in the included dataset_path, as datasets finds it
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "_base_yml").write_text("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nowhere/x.jsonl\n")
    (bad / "t.yaml").write_text("include: _base_yml\ntask: t\n")
    with pytest.raises(UsageError, match="names data file /nowhere/x.jsonl"):
        _local_task_files(bad)


def test_rows_measured_otherwise_are_told_apart(tmp_path: Path) -> None:
    """An earlier row kept beside new ones is compared with what this evaluation writes for the same row: held-out
    rows on the base and dtype; benchmark rows on the limit and lm-eval's version too, and on the digest of the
    --include dir for a task that dir defines and that is evaluated now (a registry task's rows carry None; another
    task may come from another dir). A setting an earlier ia3-dist did not record is unknown ("?"), not assumed
    equal."""
    from ia3_dist.tools.benchmark import Settings, measured_otherwise, measured_with
    from ia3_dist.train.benchmarks import include_digest

    got = measured_with("bf16", None, "/m", TASKS)
    assert got.local == {"tiny_mc"} and got.digest == include_digest(TASKS)[:16]
    assert got.of({"task": "tiny_mc"})["include_digest"] == got.digest
    assert got.of({"task": "hellaswag"})["include_digest"] is None
    assert got.of({"task": "heldout"}) == {"dtype": "bf16", "base": "/m", "base_weights": None}

    held = {"dtype": "bf16", "base": "/m", "base_weights": "v1-aa"}  # held-out: every example, no limit
    bench = {**held, "limit": None, "lm_eval": "0.4.13", "include_digest": None}
    settings = Settings(held, bench, "abc", frozenset({"t", "u"}))
    row = {"checkpoint": "step5", "step": 5, "value": 1.0}
    assert measured_otherwise({**row, "task": "heldout", **held}, settings, ["t"]) == ""
    assert measured_otherwise({**row, "task": "heldout", **held, "limit": 3}, settings, ["t"]) == ""
    assert measured_otherwise({**row, "task": "t", **bench, "include_digest": "abc"}, settings, ["t"]) == ""
    assert measured_otherwise({**row, "task": "t", **bench, "include_digest": "def"}, settings, ["t"]) == \
        "include digest def"
    assert measured_otherwise({**row, "task": "u", **bench, "include_digest": "def"}, settings, ["t"]) == ""
    assert measured_otherwise({**row, "task": "reg", **bench}, settings, ["reg"]) == ""  # registry: None both
    assert measured_otherwise({**row, "task": "t", **bench, "include_digest": "abc", "lm_eval": "0.4.9", "limit": 3},
                              settings, ["t"]) == "limit 3, lm eval 0.4.9"
    # The same base dir holding other weights (replaced, retrained) since; a fingerprint of another version is
    # not compared.
    assert measured_otherwise({**row, "task": "heldout", **held, "base_weights": "v1-bb"}, settings, []) == \
        "base weights v1-bb"
    assert measured_otherwise({**row, "task": "heldout", **held, "base_weights": "v2-bb"}, settings, []) == ""
    # Written before ia3-dist recorded them: dtype was fp32 then, the rest is unknown.
    assert measured_otherwise({**row, "task": "heldout"}, settings, []) == "dtype fp32, base ?, base weights ?"


def test_the_base_weights_an_adapter_is_evaluated_on_are_fingerprinted(tmp_path: Path, tiny_model: Path) -> None:
    """Each row records the fingerprint of the weights the adapter was loaded onto: its adapter_config.json's base,
    or --base; none where there are no local weights (a hub base not cached: the load says what is wrong)."""
    from ia3_dist.models.files import weights_fingerprint
    from ia3_dist.tools.inference import base_weights_of

    ad = tmp_path / "adapter"
    ad.mkdir()
    conf = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tiny_model),
            "target_modules": ["query_key_value"], "feedforward_modules": []}
    (ad / "adapter_config.json").write_text(json.dumps(conf))
    assert base_weights_of(ad) == weights_fingerprint(tiny_model)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] + 1
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert base_weights_of(ad, str(other)) == weights_fingerprint(other) != weights_fingerprint(tiny_model)
    (ad / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "org/not-cached"}))
    assert base_weights_of(ad) is None
    (other / "model.safetensors").unlink()
    assert base_weights_of(ad, str(other)) is None


def _greedy_task(d: Path, targets: list[str]) -> Path:
    """tiny_greedy: a greedy generate_until task (lm-eval's default decoding)."""
    return _gen_task(d, "tiny_greedy", targets, "  do_sample: false\n  max_gen_toks: 8\n")


@pytest.mark.slow
def test_generate_until_decodes_with_the_models_repetition_penalty_as_the_lm_eval_cli(tmp_path: Path,
                                                                                       tiny_model: Path) -> None:
    """A model whose generation_config.json sets a repetition penalty (Qwen2's instruct models: 1.05-1.1): lm-eval's
    CLI decodes generate_until tasks with it. `ia3-dist eval` kept only the eos ids of that file, so its greedy
    answers were other ones. The targets here are the CLI's own answers: exact match 1.0 through ia3-dist's
    evaluation; without the penalty the answers differ (the random tiny model repeats itself)."""
    from ia3_dist.tools.inference import load_for_inference
    from ia3_dist.train.benchmarks import check_tasks, run_tasks

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"repetition_penalty": 5.0}))
    tasks = _greedy_task(tmp_path / "tasks", ["x", "x", "x"])
    out = tmp_path / "cli"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model_dir},dtype=float32", "--tasks", "tiny_greedy", "--include_path",
                           str(tasks), "--batch_size", "1", "--device", "cpu", "--output_path", str(out),
                           "--log_samples"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [samples] = list(out.rglob("samples_tiny_greedy*.jsonl"))
    answers = {json.loads(ln)["doc"]["q"]: json.loads(ln)["filtered_resps"][0]
               for ln in samples.read_text(encoding="utf-8").splitlines()}
    assert all(answers[q] for q in GEN_QUESTIONS), answers
    tasks = _greedy_task(tmp_path / "tasks", [answers[q] for q in GEN_QUESTIONS])

    model, tok, _, _ = load_for_inference(str(model_dir))
    assert model.generation_config.repetition_penalty == 5.0
    tm = check_tasks(["tiny_greedy"], tasks)
    assert run_tasks(model, tok, ["tiny_greedy"], tm, 1, None)["tiny_greedy"]["exact_match,none"] == 1.0
    model.generation_config.repetition_penalty = 1.0  # what ia3-dist decoded with before
    assert run_tasks(model, tok, ["tiny_greedy"], tm, 1, None)["tiny_greedy"]["exact_match,none"] < 1.0


@pytest.mark.parametrize(("value", "kept"), [(1.1, 1.1), (1, None), (1.0, None), (0, None), (-1.0, None),
                                             (11.0, None), (float("nan"), None), (True, None), ("1.1", None)])
def test_only_a_plausible_repetition_penalty_is_kept(value, kept) -> None:
    from ia3_dist.tools.inference import _generation_penalty

    assert _generation_penalty({"repetition_penalty": value}) == kept
    assert _generation_penalty({}) is None
