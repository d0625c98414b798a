"""Resuming never runs code from a checkpoint: a tampered ``.pt`` is refused (exit 2 naming it) and its payload
never executes; DeepSpeed's own state types still load."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from _util import check, launch

from ia3_dist.errors import UsageError
from ia3_dist.runtime.safe_load import check_checkpoint_dir, safe_torch_load

TINY = "configs/tiny-cpu.yaml"


class Payload:
    """Unpickling this creates ``marker``: what an attacker's ``__reduce__`` would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, path)
    return path


def test_malicious_pickle_is_refused_before_and_at_load(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    d = tmp_path / "step3"
    d.mkdir()
    f = _evil(d / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UsageError, match=f"{f}: holds objects of types .*pathlib"):
        check_checkpoint_dir(d)
    with pytest.raises(Exception, match="Unsupported global|not an allowed global|weights_only"):
        safe_torch_load(str(f))
    assert not marker.exists()


def test_deepspeed_state_types_load(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    d = tmp_path / "step1"
    d.mkdir()
    state = {"loss_scaler": LossScaler(4.0), "dyn": DynamicLossScaler(2.0**16, 1000, 1.0, 2, True),
             "zero_stage": ZeroStageEnum.gradients, "frag": fragment_address(numel=3, start=1),
             "rng": {"python": (3, tuple(range(625)), None), "numpy": ["MT19937", [1, 2], 0, 0, 0.0],
                     "torch": torch.get_rng_state()}}
    torch.save(state, d / "optim_states.pt")
    check_checkpoint_dir(d)
    back = safe_torch_load(str(d / "optim_states.pt"))
    assert back["loss_scaler"].cur_scale == 4.0 and back["zero_stage"] is ZeroStageEnum.gradients
    assert back["frag"] == fragment_address(numel=3, start=1) and back["dyn"].scale_window == 1000


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "step1"
    d.mkdir()
    (d / "model_states.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UsageError, match="model_states.pt: unreadable"):
        check_checkpoint_dir(d)


@pytest.mark.slow
def test_resume_from_tampered_checkpoint_exits_2_and_runs_nothing(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "run"
    check(launch(["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "train.max_steps=4",
                  "train.stop_after_steps=2", "output.overwrite=false"]))
    ckpt = out / "checkpoints" / "step2"
    victim = sorted(ckpt.glob("*model_states.pt"))[0]
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    marker = tmp_path / "PWNED"
    _evil(victim, marker)
    proc = launch(["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "train.max_steps=4",
                   "train.resume=auto"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"checkpoint file {victim}: holds objects of types" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    # Restore the good file: the same checkpoint resumes and finishes.
    shutil.copy(pristine / victim.name, victim)
    check(launch(["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "train.max_steps=4",
                  "train.resume=auto"]))
    assert (out / "checkpoints" / "step4").is_dir()
