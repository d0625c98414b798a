"""Optimizer steps that never make the host wait for the device (the GPU step issue).

Unit tier: the launcher's replacements for DeepSpeed's gradient-norm functions (``runtime/ds_syncs.py``) give
DeepSpeed's own results, bit for bit, on finite, infinite, NaN and negative (DeepSpeed's sentinel) norms, with and
without clipping and loss scale. Slow tier: real training steps (``tests/probe_syncs.py``: the launcher's path
under torch.profiler over steps 3-6, no log step among them) read nothing back and never wait for the whole device
(DeepSpeed's ``synchronize()`` calls, counted as a GPU would take them), except where DeepSpeed itself decides on
the host whether to skip a step (fp32 ZeRO-1/2, once per step); and in bf16 they train as DeepSpeed's own
functions do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _util import ROOT, adapter_tensors, check, free_port, launch, metrics

from ia3_dist.runtime import ds_syncs

TINY = "configs/tiny-cpu.yaml"
NORMS = [0.5, 3.0, 1e-9, 0.0, float("inf"), float("-inf"), float("nan"), -1.0]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_deepspeed_functions_are_replaced() -> None:
    assert ds_syncs.install() is True, "DeepSpeed's gradient-norm code changed: re-check ds_syncs against it"
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    assert stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads is ds_syncs.unscale_and_clip_grads
    for mod in (ds_utils, stage_1_and_2, stage3):
        assert mod.mask_nan_or_inf_with_val_inplace is ds_syncs.mask_invalid_norm, mod.__name__
    assert FP16_UnfusedOptimizer.step is ds_syncs.unfused_step


def test_another_deepspeed_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose source differs from the one checked (here: a fingerprint that no source has), or whose
    source cannot be read, leaves every DeepSpeed function as it is."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero import stage_1_and_2

    before = (stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads, FP16_UnfusedOptimizer.step,
              stage_1_and_2.mask_nan_or_inf_with_val_inplace)
    monkeypatch.setattr(ds_syncs, "_state", {})
    monkeypatch.setitem(ds_syncs._FINGERPRINTS, "deepspeed.runtime.zero.stage3", "0" * 64)
    assert ds_syncs.install() is False
    assert (stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads, FP16_UnfusedOptimizer.step,
            stage_1_and_2.mask_nan_or_inf_with_val_inplace) == before
    assert ds_syncs.fingerprint(len) is None  # a builtin: no source


@pytest.mark.parametrize("norm", NORMS)
def test_mask_invalid_norm_is_deepspeeds(norm: float) -> None:
    ours, theirs = torch.tensor(norm), torch.tensor(norm)
    ds_syncs.mask_invalid_norm(ours, device="cpu")
    ds_syncs.originals()["mask_nan_or_inf_with_val_inplace"](theirs, device="cpu")
    _same(ours, theirs)


# DeepSpeed passes the norm as a tensor; a float only reaches the clip as its invalid-norm fallback (its own code
# fails on a finite float: torch.clamp of a float).
CLIP_CASES = [(norm, clip, scale, as_tensor) for norm in NORMS for clip, scale in [(1.0, 1.0), (0.5, 1024.0),
                                                                                   (0.0, 8.0), (0.0, 1.0)]
              for as_tensor in (True, False) if as_tensor or not (clip > 0 and 0 <= norm < float("inf"))]


@pytest.mark.parametrize("norm,clip_grad,loss_scale,as_tensor", CLIP_CASES)
def test_unscale_and_clip_is_deepspeeds(norm: float, clip_grad: float, loss_scale: float, as_tensor: bool) -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(37, generator=g) * 5
    parts = [torch.randn(5, generator=g), torch.randn(3, generator=g)]
    results = []
    for fn in (ds_syncs.unscale_and_clip_grads, ds_syncs.originals()["unscale_and_clip_grads"]):
        opt = SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device="cpu")
        grads = [flat.clone(), [p.clone() for p in parts]]
        fn(opt, grads, torch.tensor(norm) if as_tensor else norm)
        results.append(torch.cat([grads[0], *grads[1]]))
    _same(*results)


def _unfused(**change: object) -> SimpleNamespace:
    """The attributes of an ``FP16_UnfusedOptimizer`` that decide whose step runs: bf16, no overflow check, no
    loss scaling, no model or expert parallelism (what :func:`ds_syncs.unfused_step` covers), then ``change``."""
    engine = SimpleNamespace(_config=SimpleNamespace(bfloat16_config=SimpleNamespace(check_grad_overflow=False)))
    opt = SimpleNamespace(low_precision_dtype=torch.bfloat16, fused_lamb_legacy=False, custom_loss_scaler=False,
                          loss_scale_config=SimpleNamespace(dynamic_loss_scale=False, cur_scale=1.0), mpu=None,
                          overflow_checker=SimpleNamespace(deepspeed=engine, has_moe_params=False))
    for k, v in change.items():
        if k == "check_grad_overflow":
            engine._config.bfloat16_config.check_grad_overflow = v
        elif k in ("dynamic_loss_scale", "cur_scale"):
            setattr(opt.loss_scale_config, k, v)
        elif k == "has_moe_params":
            opt.overflow_checker.has_moe_params = v
        else:
            setattr(opt, k, v)
    return opt


@pytest.mark.parametrize("change", [{}, {"check_grad_overflow": True}, {"low_precision_dtype": torch.float16},
                                    {"dynamic_loss_scale": True}, {"cur_scale": 1024.0}, {"mpu": object()},
                                    {"has_moe_params": True}, {"fused_lamb_legacy": True},
                                    {"custom_loss_scaler": True}], ids=lambda c: ",".join(c) or "covered")
def test_only_the_covered_bf16_zero0_case_leaves_deepspeeds_step(change: dict) -> None:
    """Anything unfused_step does not reproduce (the overflow check asked for, fp16, loss scaling, model or expert
    parallelism, LAMB) runs DeepSpeed's own step."""
    assert ds_syncs._unfused_on_device(_unfused(**change)) is (change == {})


@pytest.mark.slow
def test_unfused_step_is_deepspeeds_on_a_built_optimizer(tmp_path: Path) -> None:
    """``unfused_step`` against DeepSpeed's own ``FP16_UnfusedOptimizer.step`` on optimizers DeepSpeed built
    (``tests/probe_unfused.py``): neither skips a finite step; the same bf16 parameters bit for bit after every step,
    clipping off, active and not reached, a missing gradient included; the fp32 masters and the gradient norm within
    1e-6 (DeepSpeed sums the squares in float64 on the host, ``unfused_step`` in fp32 on the device)."""
    out = tmp_path / "unfused.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "probe_unfused.py"), str(out), str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = torch.load(out)
    assert {(r["clip"], r["step"]) for r in rows} == {(c, s) for c in (0.0, 1e-3, 100.0) for s in range(4)}
    for r in rows:
        ours, theirs = r["ours"], r["theirs"]
        assert ours["returned"] is theirs["returned"] is False, r
        assert ours["masters_grads_cleared"] and theirs["masters_grads_cleared"]
        assert ours["norm"] == pytest.approx(theirs["norm"], rel=1e-6), r
        for a, b in zip(ours["params"], theirs["params"], strict=True):
            _same(a, b)
        for a, b in zip(ours["masters"], theirs["masters"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # The clip really acted where asked: at 1e-3 the updates differ from those without clipping.
    last = {r["clip"]: r["theirs"]["masters"] for r in rows if r["step"] == 3}
    assert any(not torch.equal(a, b) for a, b in zip(last[0.0], last[1e-3]))


def _run(tmp: Path, tiny_model: Path, name: str, *overrides: str, originals: bool = False,
         count: bool = True) -> tuple[Path, dict[str, float]]:
    """A run of 8 steps through tests/probe_syncs.py; with ``count``, the host syncs per step of steps 3-6 (no log
    step among them) by site. ``originals``: DeepSpeed's own functions instead of runtime/ds_syncs's."""
    probe, out = tmp / f"{name}.json", tmp / name
    env = {"IA3_TEST_DS_ORIGINALS": "1" if originals else "0"}
    if count:
        env.update(IA3_TEST_PROBE=str(probe), IA3_TEST_SYNC_FROM="3", IA3_TEST_SYNC_TO="6")
    check(launch(["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "data.limit=96",
                  "train.max_steps=8", "train.log_every=1000", "train.micro_batch_size=4", "train.grad_accum=2",
                  *overrides], script="tests/probe_syncs.py", env=env))
    if not count:
        return out, {}
    res = json.loads(probe.read_text())
    return out, {site: n / res["steps"] for site, n in res["sites"].items()}


def _assert_no_syncs_but_deepspeeds_skip(sites: dict[str, float], ds: str, precision: str) -> None:
    """Left in fp32 ZeRO-1/2: DeepSpeed's skip of a step whose gradient norm is not finite (its host decision,
    ``is_invalid_grad_norm`` in ``step``), once per step."""
    allowed = {s: n for s, n in sites.items()
               if [f.split("): ")[-1] for f in s.split("  ")[-1].split(" <- ")[:2]] == ["is_invalid_grad_norm", "step"]
               and "zero/stage_1_and_2.py" in s}
    others = {s: n for s, n in sites.items() if s not in allowed}
    assert others == {}, f"host syncs per step outside DeepSpeed's skip decision: {others}"
    if precision == "fp32" and ds != "zero0":
        assert sum(allowed.values()) == 1.0, sites
    else:
        assert allowed == {}, sites


DPO = ("train.objective=dpo", "data.path=demo:zh-pairs", "data.eval_ratio=0", "train.eval_every=0",
       "data.group_by_length=false")


@pytest.mark.slow
@pytest.mark.parametrize("ds,precision,extra,family", [("zero0", "fp32", (), "bloom"), ("zero2", "fp32", (), "bloom"),
                                                       ("zero2", "fp32", DPO, "bloom"), ("zero2", "fp32", (), "llama")],
                         ids=["zero0-fp32", "zero2-fp32", "zero2-fp32-dpo", "zero2-fp32-llama"])
def test_steps_read_nothing_back(tmp_path: Path, tiny_model: Path, family_models: dict, ds: str, precision: str,
                                 extra: tuple[str, ...], family: str) -> None:
    """zero2 fp32 is the default config (ZeRO-2 runs ZeRO-1's optimizer code); bf16 below. DPO too: its pairs'
    reference log-probs go to the device with the batch (looked up from the device copy of the pair indices,
    they cost two reads per micro-step). Llama: the rotary families' masks are built on the device (transformers'
    own mask code reads the padding mask back, once or twice per micro-step)."""
    model = tiny_model if family == "bloom" else family_models[family]
    _, sites = _run(tmp_path, model, "run", f"deepspeed.config={ds}", f"train.precision={precision}", *extra)
    _assert_no_syncs_but_deepspeeds_skip(sites, ds, precision)


@pytest.mark.slow
def test_deepspeeds_device_wide_waits_are_counted(tmp_path: Path, tiny_model: Path) -> None:
    """What every resolved config turns off unless the file asks: DeepSpeed's throughput timer waits for the whole
    device at every forward pass and step, and the probe counts each wait (as a GPU would take them)."""
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["timers"]["throughput"]["enabled"] = True
    f = tmp_path / "zero2-timed.json"
    f.write_text(json.dumps(ds))
    _, sites = _run(tmp_path, tiny_model, "timed", f"deepspeed.config={f}")
    waits = {s: n for s, n in sites.items() if s.startswith("synchronize  ")}
    assert sum(waits.values()) >= 3, sites  # a forward per micro-step (accumulation 2) and the step
    assert all("deepspeed/utils/timer.py" in s for s in waits), waits


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero0", "zero1"])
def test_bf16_steps_read_nothing_back_and_train_as_deepspeeds_own(tmp_path: Path, tiny_model: Path, ds: str) -> None:
    """bf16 (zero1: what deepspeed.config=auto picks) reads nothing back; the same run with DeepSpeed's own
    functions ends with the same IA3 vectors, the clip active at every step (train.grad_clip below every gradient
    norm): ZeRO-1/2 compute the clip factor with the same tensor operations (exact); ZeRO-0's norm sums in fp32 on
    the device where DeepSpeed sums in float64 on the host (the last bits of the clip factor)."""
    run = (f"deepspeed.config={ds}", "train.precision=bf16", "train.grad_clip=0.001")
    ours, sites = _run(tmp_path, tiny_model, "ours", *run)
    _assert_no_syncs_but_deepspeeds_skip(sites, ds, "bf16")
    theirs, _ = _run(tmp_path, tiny_model, "theirs", *run, originals=True, count=False)
    rows = {k: [r for r in metrics(d) if "loss" in r] for k, d in (("ours", ours), ("theirs", theirs))}
    # Logged: the first and the last step (train.log_every=1000).
    assert [r["step"] for r in rows["ours"]] == [1, 8] and min(r["grad_norm"] for r in rows["theirs"]) > 0.001
    tol = 0 if ds != "zero0" else 1e-6
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows["ours"]]),
                                   torch.tensor([r[key] for r in rows["theirs"]]),
                                   rtol=max(tol, 1e-6) if key == "grad_norm" else tol, atol=0)
    a, b = adapter_tensors(ours / "adapter"), adapter_tensors(theirs / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)
    # The adapter holds the fp32 masters, not the bf16 module parameters (ZeRO-0's masters live in DeepSpeed's
    # FP16 optimizer, where safe_get_full_fp32_param does not look: its adapters were rounded to bf16).
    rounded = [bool(torch.equal(t, t.bfloat16().float())) for t in a.values()]
    assert not all(rounded), "every adapter vector is exactly a bf16 value: the bf16 copy was saved"
