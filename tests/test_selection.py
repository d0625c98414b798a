"""train.early_stopping and checkpoint.keep_best (issue 33): the trackers and the config checks (unit), and a real
2-rank ZeRO-3 run whose held-out loss stops improving: it stops after ``patience`` evaluations, keeps the best
checkpoint outside the rotation, writes the best vectors as its adapter, and a resume of it changes nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics

from ia3_dist.config import load_config
from ia3_dist.config.schema import lower_is_better
from ia3_dist.errors import EXIT_PREEMPTED, UsageError
from ia3_dist.runtime import checkpoint as ckpt
from ia3_dist.runtime.adapter import STEP_FILE
from ia3_dist.train.selection import Selection, Tracker, check_measured, measured_keys, stopped_early

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
HELD_OUT = ["data.eval_ratio=0.1", "train.eval_every=2"]


def test_tracker_follows_the_direction_and_min_delta() -> None:
    t = Tracker("eval_loss", lower=True, min_delta=0.05)
    assert t.update(2, 1.0) and t.best_step == 2
    # Better, but not by more than min_delta: the best (the vectors final=best writes), counted as no improvement
    # (HF Trainer: best_metric moves on any gain, its EarlyStoppingCallback's patience only on one past the threshold).
    assert t.update(4, 0.97) and (t.best, t.best_step, t.bad) == (0.97, 4, 1)
    assert not t.update(5, 0.98) and (t.best_step, t.bad) == (4, 2)
    assert t.update(6, 0.9) and (t.best, t.best_step, t.bad) == (0.9, 6, 0)
    assert not t.update(8, math.nan) and t.bad == 1  # a non-finite evaluation is never the best
    up = Tracker("eval_rewards/accuracies", lower=False)
    assert up.update(2, 0.5) and not up.update(4, 0.5) and up.update(6, 0.75)
    assert lower_is_better("eval_loss") and lower_is_better("eval_ppl") and lower_is_better("eval_nll_loss")
    assert not lower_is_better("eval_rewards/accuracies") and not lower_is_better("eval_rewards/margins")
    assert not lower_is_better("eval_loss", "max") and lower_is_better("eval_rewards/accuracies", "min")
    # Benchmarks (<task>/<metric>,<filter>) by the metric's own name; per-source losses by their head.
    assert not lower_is_better("tiny_mc/acc,none") and not lower_is_better("ceval/acc_norm,none")
    assert lower_is_better("wikitext/word_perplexity,none") and lower_is_better("wikitext/bits_per_byte,none")
    assert lower_is_better("eval_loss/instruct") and lower_is_better("heldout/loss")
    # Every metric lm-eval registers as lower-is-better, and every higher one, judged as lm-eval does.
    hib = pytest.importorskip("lm_eval.api.registry").HIGHER_IS_BETTER_REGISTRY
    pytest.importorskip("lm_eval.api.metrics")  # registers them
    assert len(hib) > 10
    for m, higher in hib.items():
        assert lower_is_better(f"some_task/{m},none") is not higher, m
    # Preference evals: the rejected side goes down, the chosen up; a task's own name decides nothing.
    assert lower_is_better("eval_rewards/rejected") and lower_is_better("eval_logps/rejected")
    assert not lower_is_better("eval_rewards/chosen") and not lower_is_better("eval_logps/chosen")
    assert not lower_is_better("eval_log_odds_ratio") and not lower_is_better("eval_log_odds_chosen")
    assert not lower_is_better("foo_ppl/acc,none") and not lower_is_better("my_loss_task/acc_norm,none")


def _cfg(*extra: str):
    return load_config(TINY, [*HELD_OUT, *extra])


def test_selection_stops_after_patience_and_round_trips_through_meta() -> None:
    sel = Selection.of(_cfg("train.early_stopping.metric=eval_loss", "train.early_stopping.patience=2",
                            "checkpoint.keep_best=eval_ppl"))
    assert sel.after_eval(2, {"eval_loss": 1.0, "eval_ppl": 2.7}) == (True, True, False)
    assert sel.after_eval(4, {"eval_loss": 1.1, "eval_ppl": 2.5}) == (True, False, False)
    assert sel.after_eval(6, {"eval_loss": 1.2, "eval_ppl": 3.3}) == (False, False, True)
    assert "eval_loss has not improved" in sel.stopped_early and "best 1 at step 2, stopped at step 6" in \
        sel.stopped_early
    meta = sel.meta()
    assert stopped_early(meta) == sel.stopped_early and stopped_early({}) == ""
    again = Selection.of(_cfg("train.early_stopping.metric=eval_loss", "train.early_stopping.patience=2",
                              "checkpoint.keep_best=eval_ppl"))
    again.restore(meta, "meta.json")
    assert again.stopper == sel.stopper and again.keeper == sel.keeper
    # Another metric followed before: counting starts afresh; a damaged state is refused naming the file.
    other = Selection.of(_cfg("train.early_stopping.metric=eval_ppl"))
    other.restore(meta, "meta.json")
    assert other.stopper.best is None and other.stopper.bad == 0
    bad = {"selection": {"early_stopping": {"metric": "eval_loss", "best": "x", "best_step": 1, "bad": 0}}}
    with pytest.raises(UsageError, match="meta.json: 'selection' holds"):
        Selection.of(_cfg("train.early_stopping.metric=eval_loss")).restore(bad, "meta.json")
    with pytest.raises(UsageError, match="not an object"):
        Selection.of(_cfg("train.early_stopping.metric=eval_loss")).restore({"selection": [1]}, "meta.json")
    assert not Selection.of(_cfg()).active
    # A restored stopped run says so (its resume only writes the adapter); non-finite evaluations before any finite
    # one count against patience and the reason says no value was finite.
    assert again.stopped_early == sel.stopped_early
    nan = Selection.of(_cfg("train.early_stopping.metric=eval_loss", "train.early_stopping.patience=1"))
    assert nan.after_eval(2, {"eval_loss": math.inf}) == (False, False, True)
    assert "no finite value yet, stopped at step 2" in nan.stopped_early


class _Held:
    def __init__(self, n: int, cache_file: str = "") -> None:
        self.n, self.cache_file = n, cache_file

    def __len__(self) -> int:
        return self.n


def test_a_resume_on_other_held_out_data_or_benchmarks_is_refused_where_a_tracker_carries_over() -> None:
    """What the evaluations measured rides in meta.json; a resume that measures something else keeps no best value
    measured on the old data (refused, naming the key), and otherwise says that the earlier evaluations differ."""
    follow = ("train.early_stopping.metric=eval_loss", "checkpoint.keep_best=eval_ppl")
    a = _cfg(*follow, "data.eval_ratio=0", "data.eval_path=a.jsonl")
    keys = measured_keys(a, _Held(9, "/c/tokenized/0123456789abcdef0123"))
    assert keys == {"eval_key": "data.eval_path tokens 0123456789abcdef", "bench_key": "none"}
    assert measured_keys(_cfg(), _Held(7))["eval_key"] == "7 examples held out of the training data"
    assert measured_keys(load_config(TINY, []), None)["eval_key"] == "none"
    sel = Selection.of(a)
    sel.after_eval(2, {"eval_loss": 1.5, "eval_ppl": 4.5})
    saved = {**keys, **sel.meta()}
    assert check_measured(a, saved, keys, "m.json") == ""
    other = measured_keys(a, _Held(9, "/c/tokenized/fedcba9876543210fedc"))
    with pytest.raises(UsageError, match=r"m.json: train.early_stopping.metric follows eval_loss, and the held-out "
                                         r"data changed since this checkpoint was saved \(data.eval_path tokens "
                                         r"0123456789abcdef; now data.eval_path tokens fedcba9876543210\): its best "
                                         r"so far \(1.5 at step 2\)"):
        check_measured(a, saved, other, "m.json")
    keep_only = _cfg("checkpoint.keep_best=eval_ppl", "data.eval_ratio=0", "data.eval_path=b.jsonl")
    with pytest.raises(UsageError, match=r"checkpoint.keep_best follows eval_ppl.*resume without "
                                         r"checkpoint.keep_best \(set it to ''\)"):
        check_measured(keep_only, saved, other, "m.json")
    # Nothing carried over (no tracker now, or one that follows a benchmark): the resume line says what changed.
    plain = _cfg("data.eval_ratio=0", "data.eval_path=b.jsonl")
    assert check_measured(plain, saved, other, "m.json") == \
        ("; the held-out data changed since the save (data.eval_path tokens 0123456789abcdef; now data.eval_path "
         "tokens fedcba9876543210): the earlier evaluations in metrics.jsonl measured the saved run's")
    # Benchmarks: a tracker of a task's metric is refused when eval.tasks changes, not when the held-out data does.
    tasks = ("eval.tasks=[tiny_mc]", "eval.every=2", "checkpoint.keep_best=tiny_mc/acc,none")
    b = _cfg(*tasks)
    bsel = Selection.of(b)
    bsel.after_eval(2, {"tiny_mc/acc,none": 0.5})
    bkeys = measured_keys(b, _Held(7))
    assert bkeys["bench_key"].startswith("tasks+files ")
    bsaved = {**bkeys, **bsel.meta()}
    more = measured_keys(_cfg(*tasks[1:], "eval.tasks=[tiny_mc,other]"), _Held(7))
    with pytest.raises(UsageError, match="follows tiny_mc/acc,none, and the benchmarks changed"):
        check_measured(b, bsaved, more, "m.json")
    assert "the held-out data changed" in check_measured(b, bsaved, {**bkeys, "eval_key": "8 examples"}, "m.json")
    # A checkpoint from before these keys resumes unchecked (and one whose benchmark key digested eval.include's
    # path, not its files); a tracker that measured nothing yet carries nothing.
    assert check_measured(a, sel.meta(), other, "m.json") == ""
    assert check_measured(b, {**bsaved, "bench_key": "tasks 0123456789abcdef"}, more, "m.json") == ""
    fresh = {**keys, **Selection.of(a).meta()}
    assert check_measured(a, fresh, other, "m.json").startswith("; the held-out data changed")


@pytest.mark.parametrize("overrides, key, says", [
    (["train.early_stopping.metric=eval_acc"], "train.early_stopping.metric", "not a held-out metric"),
    (["checkpoint.keep_best=eval_rewards/accuracies"], "checkpoint.keep_best", "one of eval_loss, eval_ppl"),
    (["train.early_stopping.patience=0"], "train.early_stopping.patience", ""),
    (["train.early_stopping.mode=up"], "train.early_stopping.mode", "min|max"),
    (["train.early_stopping.final=first"], "train.early_stopping.final", "best or last"),
    (["train.early_stopping.min_delta=-1"], "train.early_stopping.min_delta", ""),
])
def test_bad_settings_name_the_key(overrides: list[str], key: str, says: str) -> None:
    with pytest.raises(UsageError, match=key.replace(".", r"\.")) as e:
        _cfg(*overrides)
    assert says in str(e.value)


@pytest.mark.parametrize("missing", ["data.eval_ratio=0", "train.eval_every=0"])
def test_following_a_metric_needs_held_out_evaluations(missing: str) -> None:
    for key in ("train.early_stopping.metric", "checkpoint.keep_best"):
        with pytest.raises(UsageError, match="set data.eval_ratio"):
            _cfg(f"{key}=eval_loss", missing)


def test_pair_objectives_follow_pair_metrics() -> None:
    cfg = load_config(ROOT / "configs" / "tiny-dpo-cpu.yaml",
                      ["data.eval_ratio=0.1", "train.eval_every=2",
                       "train.early_stopping.metric=eval_rewards/accuracies"])
    assert not Selection.of(cfg).stopper.lower


def _vectors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "ia3_state.safetensors"))
    return {k[len("param/peft."):].replace(".default", ""): v for k, v in state.items() if k.startswith("param/")}


@pytest.mark.slow
def test_early_stopping_keeps_the_best_and_a_resume_is_a_no_op(tmp_path: Path, demo_model: Path) -> None:
    """lr 1.0 makes the held-out loss wander up after a few steps; patience 2 of evaluations every 2 steps."""
    out = tmp_path / "run"
    args = ["--config", str(TINY), f"model.path={demo_model}", "train.max_steps=40", "train.lr=1.0", *HELD_OUT,
            "train.log_every=50", "checkpoint.every=4", "checkpoint.keep=1", "checkpoint.keep_best=eval_loss",
            "train.early_stopping.metric=eval_loss", "train.early_stopping.patience=2", "deepspeed.config=zero3",
            f"output.dir={out}"]
    proc = check(launch(args, nproc=2))
    lines = metrics(out)
    evals = [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]
    best, best_step, bad, stop = math.inf, 0, 0, None
    for step, value in evals:  # the rule, replayed on the logged evaluations
        if value < best:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
        if bad >= 2:
            stop = step
            break
    assert stop is not None and stop < 40, evals
    assert evals[-1][0] == stop and max(r["step"] for r in lines) == stop, evals
    # The steps since the last training line get theirs at the stop, as a run's end does (lines every 50 steps:
    # the first step's and the stop's, wherever the wandering loss stops the run).
    trained = [r["step"] for r in lines if "loss" in r]
    assert trained == [1, stop], (trained, stop)
    assert "early stopping: eval_loss has not improved by more than 0 for 2 evaluation(s)" in proc.stdout
    assert f"best {best:.6g} at step {best_step}, stopped at step {stop}" in proc.stdout
    assert f"stopped early after step {stop} of 40" in proc.stdout
    # keep=1 keeps the last checkpoint; the best one stays beside it, named by checkpoints/best.
    root = out / "checkpoints"
    assert (root / "best").read_text() == f"step{best_step}"
    assert {d.name for d in root.glob("step*")} == {f"step{best_step}", f"step{stop}"}
    # The adapter holds the best evaluation's vectors (train.early_stopping.final=best), not the last step's.
    ad = adapter_tensors(out / "adapter")
    kept, last = _vectors(root / f"step{best_step}"), _vectors(root / f"step{stop}")
    assert set(kept) == set(ad)
    assert all(torch.equal(kept[k], ad[k].float()) for k in ad)
    assert any(not torch.equal(last[k], ad[k].float()) for k in ad)
    # Where eval places it; the run has ended (summary: done, not a chunk); the base it was trained on.
    from ia3_dist.models.files import weights_fingerprint

    fingerprint = weights_fingerprint(demo_model)
    assert json.loads((out / "adapter" / STEP_FILE).read_text()) == {"step": best_step, "final": True,
                                                                      "base_weights": fingerprint}
    # Resuming it (a requeue, a chunked job's next chunk) is a no-op that says so and leaves every file as it was.
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    again = check(launch([*args, "train.resume=auto"], nproc=2))
    assert "ended by early stopping" in again.stdout and "nothing to do" in again.stdout, again.stdout[-2000:]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
    # Killed between its last checkpoint and its adapter: the resume trains nothing and writes that adapter.
    shutil.rmtree(out / "adapter")
    again = check(launch([*args, "train.resume=auto"], nproc=2))
    assert "its adapter was not written after it: writing it" in again.stdout, again.stdout[-2000:]
    assert f"step {stop} is the run's last: nothing to train" in again.stdout, again.stdout[-2000:]
    rewritten = adapter_tensors(out / "adapter")
    assert rewritten.keys() == ad.keys() and all(torch.equal(rewritten[k], ad[k]) for k in ad)
    assert json.loads((out / "adapter" / STEP_FILE).read_text()) == {"step": best_step, "final": True,
                                                                      "base_weights": fingerprint}
    assert metrics(out) == lines
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")} == \
        {p: v for p, v in before.items() if root in p.parents}
    # The same, resumed with early stopping turned off since: the last step's vectors (there is no stopper to say
    # which was best), on every rank alike (it failed with an AttributeError on each).
    shutil.rmtree(out / "adapter")
    check(launch([*args, "train.resume=auto", "train.early_stopping.metric="], nproc=2))
    off = adapter_tensors(out / "adapter")
    assert all(torch.equal(last[k], off[k].float()) for k in off)
    assert json.loads((out / "adapter" / STEP_FILE).read_text())["step"] == stop

    # The same run in chunks (train.stop_after_steps, as a time-limited job array would run it) of 3, 3, then the
    # rest: the first ends off the evaluation grid (step 3: nothing is evaluated there, as in the uninterrupted run),
    # the second on it (step 6), where the next chunk starts past that evaluation, so the chunk that ran it follows
    # it; the best vectors travel in the checkpoints (the best step's own checkpoint may be gone). Same evaluations,
    # same stop, same best, the same adapter.
    assert stop > 6, evals  # past the chunks that end early
    chunked = tmp_path / "chunked"
    cargs = [*[a for a in args if not a.startswith("output.dir=")], f"output.dir={chunked}", "train.resume=auto"]
    for chunk in (["train.stop_after_steps=3"], ["train.stop_after_steps=3"], []):
        last = check(launch([*cargs, *chunk], nproc=2))
    assert f"stopped early after step {stop} of 40" in last.stdout, last.stdout[-3000:]
    got = [(r["step"], r["eval_loss"]) for r in metrics(chunked) if "eval_loss" in r]
    assert [s for s, _ in got] == [s for s, _ in evals] and got[-1][0] == stop, (got, evals)
    for (_, a), (_, b) in zip(got, evals, strict=False):
        assert a == pytest.approx(b, rel=1e-5)
    assert (chunked / "checkpoints" / "best").read_text() == f"step{best_step}"
    assert (chunked / "checkpoints" / f"step{stop}" / "meta.json").is_file()
    ad2 = adapter_tensors(chunked / "adapter")
    assert set(ad2) == set(ad)
    for k in ad:
        torch.testing.assert_close(ad2[k].float(), ad[k].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resuming_a_finished_run_evaluates_nothing_again(tmp_path: Path, demo_model: Path) -> None:
    """A run that reached its last step without stopping early, resumed (a requeue after it ended): its last
    evaluation is not run, logged or counted again. Here it would have been the one evaluation too many:
    min_delta 100 makes every evaluation after the first one without improvement, the run ends at step 6 with 2
    of its patience of 3, and a third would stop it early and write the step-2 vectors as its adapter."""
    out = tmp_path / "run"
    args = ["--config", str(TINY), f"model.path={demo_model}", "train.max_steps=6", *HELD_OUT,
            "train.early_stopping.metric=eval_loss", "train.early_stopping.patience=3",
            "train.early_stopping.min_delta=100", f"output.dir={out}"]
    first = check(launch(args))
    assert "early stopping" not in first.stdout
    lines = metrics(out)
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4, 6], lines
    ad = adapter_tensors(out / "adapter")
    again = check(launch([*args, "train.resume=auto"]))
    assert "step 6 is the run's last: nothing to train" in again.stdout, again.stdout[-2000:]
    assert "early stopping" not in again.stdout and "stopped early" not in again.stdout, again.stdout[-2000:]
    assert metrics(out) == lines
    rewritten = adapter_tensors(out / "adapter")
    assert rewritten.keys() == ad.keys() and all(torch.equal(rewritten[k], ad[k]) for k in ad)

    # A signal after step 4, before its evaluation (which could outlast the scheduler's grace time): the run saves
    # step 4 saying its evaluation is to do and stops (exit 75); the resume runs that evaluation first, counting it
    # once. Signalled again before the last evaluation, then resumed: the same evaluations, the same adapter.
    sig = tmp_path / "signalled"
    sargs = [*[a for a in args if not a.startswith("output.dir=")], f"output.dir={sig}"]
    # Signalled again while the resume loads, before the evaluation it puts first: it stops there (that evaluation
    # could outlast the grace time too; it ran regardless), its checkpoint as it was.
    for i, fault in enumerate(("eval:4:0:term", "eval:4:0:term", "eval:6:0:term")):
        stopped = launch([*sargs, "train.resume=auto"], env={"IA3_DIST_FAULT": fault})
        assert stopped.returncode == EXIT_PREEMPTED, (stopped.stdout + stopped.stderr)[-3000:]
        at = int(fault.split(":")[1])
        assert "(its evaluation runs first when resumed)" in stopped.stdout + stopped.stderr
        meta = sig / "checkpoints" / f"step{at}" / "meta.json"
        assert ckpt.read_meta(meta.parent)["eval_pending"] is True
        assert not (sig / "adapter").exists()
        if i == 0:
            first_save = meta.stat().st_mtime_ns
        elif i == 1:
            assert meta.stat().st_mtime_ns == first_save
            assert [r["step"] for r in metrics(sig) if "eval_loss" in r] == [2]
    assert [r["step"] for r in metrics(sig) if "eval_loss" in r] == [2, 4]
    # The resume evaluates step 6 and saves it again (its evaluation done); killed between setting the old step6
    # aside and putting the new one in place, the next resume reads the new one and trains nothing.
    root = sig / "checkpoints"
    killed = launch([*sargs, "train.resume=auto"], env={"IA3_DIST_FAULT": "save-in-place:6:0:kill"})
    assert killed.returncode != 0 and not (root / "step6").exists(), (killed.stdout + killed.stderr)[-3000:]
    assert ckpt.read_meta(root / "step6.old")["eval_pending"] is True
    assert "eval_pending" not in ckpt.read_meta(root / "step6.new")
    done = check(launch([*sargs, "train.resume=auto"]))
    assert "step 6 is the run's last: nothing to train" in done.stdout, done.stdout[-2000:]
    assert "early stopping" not in done.stdout, done.stdout[-2000:]
    got = metrics(sig)
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4, 6]
    # (Training-loss lines are per log window, and a resumed run starts a window at its first step.)
    want = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    assert {r["step"]: r["eval_loss"] for r in got if "eval_loss" in r} == pytest.approx(want, rel=1e-6)
    resumed = adapter_tensors(sig / "adapter")
    assert resumed.keys() == ad.keys() and all(torch.allclose(resumed[k], ad[k], rtol=1e-6) for k in ad)


@pytest.mark.slow
def test_a_stop_before_an_evaluation_logs_the_steps_since_the_last_line(tmp_path: Path, demo_model: Path) -> None:
    """log_every 5, an evaluation due at step 3 and a signal before it: the run stops there, and steps 2-3 get
    their training line as at any stop (they had none: the resume's first window starts at step 4, so they were
    never logged)."""
    out = tmp_path / "run"
    args = ["--config", str(TINY), f"model.path={demo_model}", "train.max_steps=6", "data.eval_ratio=0.1",
            "train.eval_every=3", "train.log_every=5", f"output.dir={out}"]
    stopped = launch(args, env={"IA3_DIST_FAULT": "eval:3:0:term"})
    assert stopped.returncode == EXIT_PREEMPTED, (stopped.stdout + stopped.stderr)[-3000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 3]
    check(launch([*args, "train.resume=auto"]))
    got = metrics(out)
    assert [r["step"] for r in got if "loss" in r] == [1, 3, 4, 5, 6]
    assert [r["step"] for r in got if "eval_loss" in r] == [3, 6]


@pytest.mark.slow
def test_a_resume_on_a_changed_held_out_file(tmp_path: Path, demo_model: Path) -> None:
    """A real run evaluates on data.eval_path and keeps its best eval_loss; the file changes before the resume: the
    resume exits 2 naming checkpoint.keep_best and the change, before anything is written; without keep_best it
    trains on and its resume line says the earlier evaluations measured the other file."""
    import json

    from ia3_dist.train.demo import make_records

    held = tmp_path / "held.jsonl"

    def write(seed: int) -> None:
        held.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records(6, seed, 0)),
                        encoding="utf-8")

    write(1)
    out = tmp_path / "run"
    args = ["--config", str(TINY), f"model.path={demo_model}", "train.max_steps=4", "train.eval_every=2",
            f"data.eval_path={held}", "checkpoint.every=2", "checkpoint.keep_best=eval_loss", f"output.dir={out}"]
    check(launch([*args, "train.stop_after_steps=2"]))
    write(2)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    refused = launch([*args, "train.resume=auto"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "checkpoint.keep_best follows eval_loss, and the held-out data changed since this checkpoint was saved " \
           "(data.eval_path tokens " in refused.stderr, refused.stderr[-2000:]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
    resumed = check(launch([*args, "train.resume=auto", "checkpoint.keep_best="]))
    assert "resuming step 2" in resumed.stdout and "the held-out data changed since the save (data.eval_path " \
           "tokens" in resumed.stdout, resumed.stdout[-2000:]
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [2, 4]


def test_the_benchmark_key_follows_the_local_task_files_and_their_data(tmp_path: Path, monkeypatch) -> None:
    """``eval.include``'s tasks are keyed by content: an edited task file, a changed data file it names (inside
    the dir or elsewhere) or a new task file is other benchmarks; the same files copied elsewhere are not."""
    monkeypatch.chdir(tmp_path)
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    outside = tmp_path / "data" / "qa.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"q": "a", "a": "b"}\n')
    (tasks / "inside.jsonl").write_text('{"q": "c", "a": "d"}\n')
    spec = ("task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n"
            "output_type: multiple_choice\n")
    (tasks / "sub" / "tiny.yaml").write_text(spec.format("data/qa.jsonl"))

    def key(include: Path = tasks) -> str:
        return measured_keys(_cfg("eval.tasks=[tiny_mc]", "eval.every=2", f"eval.include={include}"),
                             _Held(7))["bench_key"]

    first = key()
    assert first.startswith("tasks+files ") and key() == first
    outside.write_text('{"q": "a", "a": "B"}\n')
    second = key()
    assert second != first
    (tasks / "inside.jsonl").write_text('{"q": "c", "a": "D"}\n')
    third = key()
    assert third != second
    (tasks / "sub" / "tiny.yaml").write_text(spec.format("data/qa.jsonl") + "num_fewshot: 1\n")
    fourth = key()
    assert fourth != third
    (tasks / "more.yaml").write_text(spec.format("data/qa.jsonl").replace("tiny_mc", "tiny_mc2"))
    assert key() != fourth
    # Moved, not edited: the same benchmarks.
    shutil.copytree(tasks, tmp_path / "moved")
    assert key(tmp_path / "moved") == key()


@pytest.mark.slow
def test_evaluations_are_not_counted_as_training_time(tmp_path: Path, demo_model: Path) -> None:
    """The window after an evaluation started its clock before it: the next training line's step time, tokens/s
    and MFU included the evaluation (and a checkpoint save). An evaluation held 3 s (the fault hook waits there):
    the training lines' step times stay those of a tiny step."""
    out = tmp_path / "run"
    check(launch(["--config", str(TINY), f"model.path={demo_model}", "train.max_steps=8", "train.log_every=2",
                  *HELD_OUT, "checkpoint.every=2", f"output.dir={out}"],
                 env={"IA3_DIST_FAULT": "eval:4:0:hold", "IA3_DIST_FAULT_HOLD_S": "3"}))
    lines = [r for r in metrics(out) if "step_time_s" in r]
    assert [r["step"] for r in lines] == [1, 2, 4, 6, 8], lines
    assert all(r["step_time_s"] < 1.0 for r in lines), [(r["step"], r["step_time_s"]) for r in lines]
