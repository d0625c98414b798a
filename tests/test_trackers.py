"""Experiment trackers (``output.report_to``) read back with each library's own reader, offline; grad_norm at
ZeRO-0; the tracker preflight; ``ia3-dist plot`` over several runs.

The slow tests share one 1-process ZeRO-0 run reported to TensorBoard, wandb and MLflow: 3 steps as a Slurm job
with no WANDB_MODE (so wandb goes offline by itself), then resumed to step 6 with WANDB_MODE=offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _util import bin_path, check, free_port, launch, metrics

from ia3_dist.cli import main
from ia3_dist.config import OutputSection, load_config
from ia3_dist.errors import UsageError
from ia3_dist.runtime import dist, manifest
from ia3_dist.train import trackers

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-cpu.yaml"
ALL = "output.report_to=[tensorboard,wandb,mlflow]"


# -- unit tier --------------------------------------------------------------------------------------------------

def test_report_to_config() -> None:
    assert OutputSection().report_to is None
    assert load_config(None, ["output.report_to=[wandb, mlflow]"]).output.report_to == ["wandb", "mlflow"]
    assert load_config(None, ["output.report_to=none"]).output.report_to == []
    assert load_config(None, ["output.report_to=[]"]).output.report_to == []
    with pytest.raises(UsageError, match=r"output.report_to.*unknown tracker.*comet.*tensorboard, wandb, mlflow"):
        load_config(None, ["output.report_to=[wandb, comet]"])
    with pytest.raises(UsageError, match="output.report_to.*twice"):
        load_config(None, ["output.report_to=[wandb, wandb]"])
    with pytest.raises(UsageError, match="output.project"):
        load_config(None, ["output.project=' '"])
    # The run dir owns what the trackers write there (output.overwrite removes it, the guard accepts it on resume).
    assert trackers.IDS_FILE in manifest.RUN_FILES
    assert {"tensorboard", "wandb", "mlflow"} <= manifest.RUN_DIRS


def test_a_tracker_gets_the_numbers_of_a_line() -> None:
    rec = {"step": 7, "epoch": 0, "loss": 1.25, "grad_norm": None, "eval_tokens": 46, "flag": True, "note": "x"}
    assert trackers.scalars(rec) == {"epoch": 0.0, "loss": 1.25, "eval_tokens": 46.0}
    assert trackers.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1], "f": {}}) == \
        {"a.b": 1, "a.c.d": None, "e": [1], "f": {}}


def test_only_rank_0_reports(tmp_path: Path) -> None:
    cfg = load_config(None, [ALL, f"output.dir={tmp_path}"])
    t = trackers.start_trackers(cfg, dist.DistEnv(1, 1, 2, 2), tmp_path, 0, False)
    assert t.live == [] and list(tmp_path.iterdir()) == []


def test_missing_package_is_found_on_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks other than 0 only look for the packages (rank 0 imports them: the subprocess test below)."""
    monkeypatch.setattr(sys, "meta_path", [_Hide("wandb"), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    cfg = load_config(None, ["output.report_to=[tensorboard, wandb]", f"output.dir={tmp_path}"])
    with pytest.raises(UsageError, match=r"names wandb, but wandb cannot be imported.*pip install wandb"):
        trackers.check_installed(cfg, dist.DistEnv(1, 1, 2, 2))
    assert trackers.check_installed(load_config(None, ["output.report_to=[tensorboard]"]),
                                    dist.DistEnv(1, 1, 2, 2)) == ["tensorboard"]


class _Recorder(trackers.Tracker):
    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at, self.got, self.status = name, fail_at, [], None

    def log(self, step: int, values: dict[str, float]) -> None:
        if step == self.fail_at:
            raise ConnectionError("server went away")
        self.got.append((step, values))

    def close(self, status: str) -> None:
        self.status = status


def test_a_tracker_failing_mid_run_is_dropped_and_the_others_go_on() -> None:
    said: list[str] = []
    ok, bad = _Recorder("ok"), _Recorder("bad", fail_at=2)
    t = trackers.Trackers([ok, bad], say=said.append)
    for step in (1, 2, 3):
        t.log({"step": step, "loss": 1.0 / step})
    t.close("finished")
    assert [s for s, _ in ok.got] == [1, 2, 3] and [s for s, _ in bad.got] == [1]
    assert (ok.status, bad.status) == ("finished", "failed") and t.live == [ok]
    assert said == ["bad: stopped reporting at step 2 (ConnectionError: server went away); metrics.jsonl and the "
                    "output dir have everything"]


def test_a_failed_tracker_never_holds_rank_0_and_damaged_ids_start_new_runs(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker dropped mid-run (a server down) is closed on the side: its close waits as long as the call that
    failed, with the other ranks in the next collective. MLflow's HTTP retries are bounded unless the environment
    sets them (its defaults wait ~20 minutes per call, past the hang watchdog's 10). A trackers.json entry that is
    not an object of strings is left out (that tracker starts a new run) instead of failing its start."""
    import time

    class Slow(_Recorder):
        def close(self, status: str) -> None:
            time.sleep(1)
            super().close(status)

    bad = Slow("bad", fail_at=1)
    t = trackers.Trackers([bad], say=lambda _: None)
    t0 = time.monotonic()
    t.log({"step": 1, "loss": 1.0})
    assert time.monotonic() - t0 < 0.5 and t.live == []
    t.close("finished")
    assert bad.status == "failed"
    for k in trackers.MLFLOW_HTTP:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    trackers.bound_mlflow_http()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    (tmp_path / trackers.IDS_FILE).write_text(json.dumps({"tensorboard": 1, "mlflow": "r1",
                                                          "wandb": {"id": "abc"}, "x": {"id": 3}}))
    assert trackers.read_ids(tmp_path) == {"wandb": {"id": "abc"}}


def test_a_broken_tensorboard_nobody_asked_for_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard reports by default because it is installed: an install that cannot start (a protobuf mismatch)
    is a note and the run goes on; named in output.report_to it stays exit 2."""
    class Broken(trackers.Tracker):
        name = "tensorboard"

        def __init__(self, ctx: object) -> None:
            raise TypeError("Descriptors cannot be created directly.")

    monkeypatch.setitem(trackers.CLASSES, "tensorboard", Broken)
    monkeypatch.setattr(trackers, "names", lambda cfg: ["tensorboard"])
    said: list[str] = []
    monkeypatch.setattr(dist, "print0", lambda env, *a: said.append(" ".join(map(str, a))))
    one = dist.DistEnv(0, 0, 1, 1)
    cfg = load_config(None, [f"output.dir={tmp_path}"])
    assert cfg.output.report_to is None
    assert trackers.start_trackers(cfg, one, tmp_path, 0, False).live == []
    assert any("note: tensorboard is installed but could not start (TypeError" in s for s in said), said
    named = load_config(None, [f"output.dir={tmp_path}", "output.report_to=[tensorboard]"])
    with pytest.raises(UsageError, match="tensorboard could not start"):
        trackers.start_trackers(named, one, tmp_path, 0, False)


class _Hide:
    """A meta-path finder that makes a package look uninstalled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == self.name or name.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


def _write_run(d: Path, losses: list[float], evals: dict[int, float], tps: float) -> Path:
    d.mkdir()
    lines = [{"step": s, "loss": v, "tokens_per_s": tps + s} for s, v in enumerate(losses, start=1)]
    lines += [{"step": s, "eval_loss": v} for s, v in evals.items()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


@pytest.mark.slow  # matplotlib's import and one PNG take about a second
def test_plot_overlays_runs_labelled_by_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ia3_dist.train.plots import overlay_figure, read_metrics

    a = _write_run(tmp_path / "a", [3.0, 2.0, 1.5], {3: 1.8}, 100.0)
    b = _write_run(tmp_path / "b", [3.1, 2.5], {}, 50.0)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = overlay_figure([(str(d), read_metrics(d / "metrics.jsonl")) for d in (a, b)])
    loss, evals, tps = fig.axes
    assert [(ln.get_label(), list(ln.get_ydata())) for ln in loss.get_lines()] == [(str(a), [3.0, 2.0, 1.5]),
                                                                                  (str(b), [3.1, 2.5])]
    assert [(ln.get_label(), list(ln.get_xdata())) for ln in evals.get_lines()] == [(str(a), [3])]
    assert [list(ln.get_ydata()) for ln in tps.get_lines()] == [[101.0, 102.0, 103.0], [51.0, 52.0]]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [str(a), str(b)]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert main(["plot", str(a), str(empty), "--out", str(out)]) == 2
    assert "has no logged steps" in capsys.readouterr().err


# -- one real run, read back ------------------------------------------------------------------------------------

def _run(args: list[str], env: dict[str, str], script: str = "launch.py", fresh: bool = False
         ) -> subprocess.CompletedProcess:
    """One process, with no tracker settings of the caller's environment, wandb's own dirs in a temp dir; forked
    from the tests' warm interpreter (the trackers import in it as in a new one) unless ``fresh``: an
    interpreter's start-up (PYTHONPATH, sitecustomize) is what the test changes."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("WANDB_", "MLFLOW_")) and k not in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID")}
    return launch(args, env=env, script=script, timeout=900, fresh=fresh, base_env=base)


def _wandb_home(tmp: Path) -> dict[str, str]:
    return {"WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    base = ["--config", TINY, f"model.path={tiny_model}", "deepspeed.config=zero0", f"output.dir={out}",
            "data.limit=64", "data.eval_ratio=0.1", "train.eval_every=3", "train.max_steps=6", "train.log_every=1", ALL,
            "output.project=ia3-test", "output.run_name=tracked"]
    probe = tmp / "probe.json"
    first = check(_run([*base, "train.stop_after_steps=3"], script="tests/probe_grad_norm.py",
                       env={"SLURM_JOB_ID": "4242", "IA3_TEST_PROBE": str(probe), **_wandb_home(tmp)}))
    ids = json.loads((out / trackers.IDS_FILE).read_text())
    second = check(_run([*base, "train.resume=auto"], env={"WANDB_MODE": "offline", **_wandb_home(tmp)}))
    return {"out": out, "first": first, "second": second, "ids": ids, "probe": json.loads(probe.read_text())}


def _expected(out: Path) -> dict[tuple[str, int], float]:
    """Every number of every metrics.jsonl line, by (metric, step)."""
    want: dict[tuple[str, int], float] = {}
    for rec in metrics(out):
        for k, v in trackers.scalars(rec).items():
            assert (k, rec["step"]) not in want
            want[(k, rec["step"])] = v
    return want


def _assert_same(got: list[tuple[str, int, float]], want: dict[tuple[str, int], float], rel: float) -> None:
    keys = [(k, s) for k, s, _ in got]
    assert len(keys) == len(set(keys)), "a step reported twice"
    assert set(keys) == set(want)
    for k, s, v in got:
        assert v == pytest.approx(want[(k, s)], rel=rel, abs=1e-12), (k, s)




@pytest.mark.slow
def test_metrics_jsonl_is_complete(tracked: dict) -> None:
    recs = metrics(tracked["out"])
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert "resuming from" in tracked["second"].stdout
    # The resumed invocation continued the same tracker runs.
    assert json.loads((tracked["out"] / trackers.IDS_FILE).read_text()) == tracked["ids"]


@pytest.mark.slow
def test_grad_norm_at_zero0_is_the_norm_of_the_ia3_gradient(tracked: dict) -> None:
    """DeepSpeed keeps no norm at ZeRO-0 fp32; the logged one equals step 1's gradient norm computed by hand."""
    train = [r for r in metrics(tracked["out"]) if "loss" in r]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in train)
    assert tracked["probe"]["ia3_tensors"] == 8  # 4 layers x (query_key_value, dense_4h_to_h)
    assert train[0]["grad_norm"] == pytest.approx(tracked["probe"]["grad_norm_step1"], rel=1e-5)


@pytest.mark.slow
def test_tensorboard_events(tracked: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(tracked["out"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    got = [(tag, e.step, e.value) for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)]
    _assert_same(got, _expected(tracked["out"]), rel=1e-6)  # float32 in the event file
    texts = {t.step: t.tensor_proto.string_val[0].decode() for t in ea.Tensors("config/text_summary")}
    assert sorted(texts) == [0, 3] and "lr: 0.03" in texts[0] and "resume: auto" in texts[3]
    start = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hp["train.lr"].number_value == pytest.approx(0.03) and hp["deepspeed.config"].string_value == "zero0"


@pytest.mark.slow
def test_tensorboard_has_a_put_off_evaluation_once_after_a_killed_attempt(tmp_path: Path, tiny_model: Path) -> None:
    """A signal before step 3's evaluation: the checkpoint says it is to do. The next attempt runs it (logging it)
    and is killed at step 5; the one after resumes the same checkpoint and runs it again. metrics.jsonl dropped
    the first attempt's line, TensorBoard kept it (it purged from step 4): two eval_loss events at step 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = ["--config", TINY, f"model.path={tiny_model}", "deepspeed.config=zero0", f"output.dir={out}",
            "data.limit=64", "data.eval_ratio=0.1", "train.eval_every=3", "train.max_steps=6", "train.log_every=1",
            "output.report_to=[tensorboard]"]
    stopped = _run(base, env={"IA3_DIST_FAULT": "eval:3:0:term"})
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    killed = _run([*base, "train.resume=auto"], env={"IA3_DIST_FAULT": "step:5:0:kill"})
    assert killed.returncode != 0 and "step 3: the evaluation a signal put off" in killed.stdout, killed.stdout[-2000:]
    check(_run([*base, "train.resume=auto"], env={}))
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    got = [(tag, e.step, e.value) for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)]
    assert sorted(s for tag, s, _ in got if tag == "eval_loss") == [3, 6], got
    _assert_same(got, _expected(out), rel=1e-6)


@pytest.mark.slow
def test_wandb_offline_run(tracked: dict) -> None:
    out, run_id = tracked["out"], tracked["ids"]["wandb"]["id"]
    log = tracked["first"].stdout
    assert "wandb: offline (WANDB_MODE is not set and this is a Slurm job)" in log
    assert f"wandb sync {out / 'wandb'}/offline-run-*-{run_id}" in log
    dirs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2, "one offline dir per invocation, both of the same run"
    got = []
    for d in dirs:
        # wandb's own reader of its transaction log.
        text = check(subprocess.run([bin_path("wandb"), "leet", "inspect", "--json", str(d / f"run-{run_id}.wandb")],
                                    capture_output=True, text=True, timeout=120)).stdout
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        run = next(r["run"] for r in recs if r["type"] == "run")
        assert run["run_id"] == run_id and run["project"] == "ia3-test" and run["display_name"] == "tracked"
        config = run["config"]["update"]
        assert config["train"]["lr"] == 0.03 and config["output"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
        for r in recs:
            if r["type"] == "history":
                h = r["history"]
                got += [(k, int(h["step"]["num"]), v) for k, v in h["item"].items() if not k.startswith("_")]
    _assert_same(got, _expected(out), rel=1e-9)


@pytest.mark.slow
def test_mlflow_store(tracked: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = tracked["out"]
    c = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("ia3-test")
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [tracked["ids"]["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    got = [(k, m.step, m.value) for k in run.data.metrics for m in c.get_metric_history(run.info.run_id, k)]
    _assert_same(got, _expected(out), rel=1e-12)
    # Params: the flattened run config of the first invocation (MLflow params cannot change on resume).
    cfg = load_config(out / "run.yaml")
    want = {k: str(v) for k, v in trackers.flatten(cfg.to_dict()).items()}
    want["train.resume"], want["train.stop_after_steps"] = "none", "3"
    assert run.data.params == want
    assert run.info.artifact_uri.startswith((out / "mlflow" / "artifacts").as_uri())
    got_adapter = Path(c.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (got_adapter / f).read_bytes() == (out / "adapter" / f).read_bytes()


@pytest.mark.slow
def test_tracker_preflight_exits_2(tmp_path: Path, tiny_model: Path) -> None:
    """Named but not installed (wandb hidden from the interpreter, as if uninstalled), and installed but unable to
    start (an MLflow server that does not answer): exit 2 before the process group starts."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'wandb' or name.startswith('wandb.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    args = ["--config", TINY, f"model.path={tiny_model}", "data.limit=16", "train.max_steps=1"]
    pypath = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    out = tmp_path / "a"
    proc = _run([*args, f"output.dir={out}", ALL], env={"PYTHONPATH": pypath, "WANDB_MODE": "offline"}, fresh=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config key 'output.report_to' names wandb, but wandb cannot be imported" in proc.stderr
    assert "pip install wandb" in proc.stderr and "startup:" not in proc.stdout
    assert not out.exists()
    out = tmp_path / "b"
    # An earlier run there, which output.overwrite=true would replace: the start fails after it was set aside (the
    # trackers start once the run dir is claimed), and it is put back as it was.
    from ia3_dist.runtime import manifest

    out.mkdir()
    manifest.write_manifest(out)
    earlier = {"run.yaml": b"output: {}\n", "metrics.jsonl": b'{"step": 1, "loss": 1.0}\n',
               "adapter/adapter_model.safetensors": b"weights", "tensorboard/events.1": b"ev",
               "checkpoints/step1/meta.json": b'{"step": 1}', "checkpoints/latest": b"step1", "notes.txt": b"mine"}
    for rel, body in earlier.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(body)
    # A tracking server that is not there (a loopback port nobody listens on), asked once.
    proc = _run([*args, f"output.dir={out}", "output.report_to=[tensorboard,mlflow]", "output.overwrite=true"],
                env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config key 'output.report_to': mlflow could not start" in proc.stderr
    assert "startup:" not in proc.stdout and not (out / "rank0.pid").exists()
    files = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert {k: v for k, v in files.items() if k not in (manifest.MANIFEST, "ds_config.json")} == earlier, files


def test_tensorboard_starts_over_where_a_killed_attempt_left_no_checkpoint(tmp_path: Path) -> None:
    """An attempt logged steps 1-6 and was killed before its first checkpoint; the requeue finds none and starts at
    step 0 (metrics.jsonl started over): TensorBoard purges the killed attempt's events too (both attempts'
    values zig-zagged on one curve)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    first = trackers.TensorBoardTracker(trackers.Context(cfg, tmp_path, 0))
    for step in range(1, 7):
        first.log(step, {"loss": 10.0 + step})
    first.close("killed")
    again = trackers.TensorBoardTracker(trackers.Context(cfg, tmp_path, 0))
    for step in range(1, 4):
        again.log(step, {"loss": float(step)})
    again.close("finished")
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_a_linked_mlflow_store_is_not_written_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run dir from elsewhere holding mlflow/mlflow.db -> a file of the user's: SQLite would open the link's
    target as the store and write it. Refused before anything is written there; the target is untouched."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    victim = tmp_path / "notes.db"
    victim.write_bytes(b"the user's file")
    out = tmp_path / "run"
    (out / "mlflow").mkdir(parents=True)
    (out / "mlflow" / "mlflow.db").symlink_to(victim)
    cfg = load_config(None, [f"output.dir={out}", "output.report_to=[mlflow]"])
    with pytest.raises(UsageError, match=r"mlflow could not start .*mlflow\.db is a symlink"):
        trackers.start_trackers(cfg, dist.DistEnv(0, 0, 1, 1), out, 0, False)
    assert victim.read_bytes() == b"the user's file"
