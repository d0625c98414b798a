"""``train.micro_batch_size: auto`` (unit tier): the schema, the divisor arithmetic and the plan's pick. The probe,
its step-down and the exact continuation run on 2 real ranks in test_resume.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ia3_dist.config import load_config
from ia3_dist.errors import UsageError
from ia3_dist.models import memory
from ia3_dist.models.load import load_model_config
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.train import autobatch


def test_schema_accepts_auto_and_refuses_other_words(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.micro_batch_size=auto", "train.grad_accum=12"])
    assert cfg.train.micro_batch_size == "auto"
    for bad, why in (("big", "positive integer or auto"), ("0", ">= 1"), ("2.5", "positive integer or auto")):
        with pytest.raises(UsageError, match=r"train\.micro_batch_size") as e:
            load_config(None, [f"train.micro_batch_size={bad}"])
        assert why in str(e.value)


def test_with_micro_keeps_the_examples_per_step() -> None:
    cfg = load_config(None, ["train.micro_batch_size=auto", "train.grad_accum=12"])
    assert autobatch.divisors_desc(12) == [12, 6, 4, 3, 2, 1]
    for m in autobatch.divisors_desc(12):
        t = autobatch.with_micro(cfg, m, 12).train
        assert (t.micro_batch_size, t.micro_batch_size * t.grad_accum) == (m, 12)


def test_plan_pick_is_the_largest_divisor_the_memory_model_fits(tiny_model: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_model}", "train.grad_accum=12", "data.max_length=64"])
    mc = load_model_config(str(tiny_model), cfg.model)
    env = DistEnv(0, 0, 2, 2)
    ds = {"zero_optimization": {"stage": 2}}
    ample = autobatch.plan_pick(cfg, mc, env, ds, 64)
    assert ample.planned == 12 and ample.samples_per_rank == 12
    # A budget between the model's needs at micro-batch 5 and 6 (CPU ranks: the framework's RSS counts too):
    # 5 does not divide 12, so the pick is 4.
    s = memory.shape_of(mc, cfg.ia3)
    need = [memory.rank_memory(s, "", 2, False, 2, 64, m, 4, False, memory.framework_rss()).gpu_total
            for m in (5, 6)]
    picked = autobatch.plan_pick(cfg, mc, env, ds, 64, budget=(need[0] + need[1]) / 2)
    assert picked.planned == 4
    assert "plan picked 4" in autobatch.AutoBatch(12, 4, 1.0, micro=4, probe_peak_gib=0.5, source="probe").line()


def test_zero3_optimizer_offload_alone_keeps_the_weights_on_the_gpu(tiny_model: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (stood in for: this machine has none) ZeRO-3's pick counted an optimizer-only offload as if the
    weight shards had left the GPU too, and picked a micro-batch whose weights do not fit (a 70B model: 8 instead
    of 4). Only offload_param moves the weights."""
    monkeypatch.setattr(autobatch.torch.cuda, "is_available", lambda: True)
    cfg = load_config(None, [f"model.path={tiny_model}", "train.grad_accum=12", "data.max_length=64"])
    mc = load_model_config(str(tiny_model), cfg.model)
    env = DistEnv(0, 0, 1, 1)
    s = memory.shape_of(mc, cfg.ia3)
    # Between the needs at micro-batch 4 with the weights on the GPU and without them.
    on_gpu = memory.rank_memory(s, "", 3, False, 1, 64, 4, 4, False).gpu_total
    off = memory.rank_memory(s, "", 3, True, 1, 64, 4, 4, False).gpu_total
    assert off < on_gpu
    budget = (on_gpu + off) / 2

    def pick(zero: dict) -> int:
        return autobatch.plan_pick(cfg, mc, env, {"zero_optimization": {"stage": 3, **zero}}, 64, budget).planned

    cpu = {"device": "cpu"}
    assert pick({"offload_optimizer": cpu}) == pick({}) < 4 <= pick({"offload_optimizer": cpu, "offload_param": cpu})


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


GIB = 1 << 30


@pytest.mark.parametrize("files, proc, env, want", [
    ({}, "", {}, None),
    # cgroup v2: the container's own limit (its namespace shows "/"), "max" is none
    ({"memory.max": f"{8 * GIB}\n"}, "0::/\n", {}, 8 * GIB),
    ({"memory.max": "max\n"}, "0::/\n", {}, None),
    # v2 without a namespace: this process's cgroup and its ancestors, the smallest
    ({"job/memory.max": f"{6 * GIB}\n", "job/step/memory.max": "max\n"}, "0::/job/step\n", {}, 6 * GIB),
    # cgroup v1: the memory controller's hierarchy; its "no limit" is a huge page-aligned number
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "4:memory:/\n", {}, None),
    ({"memory/a/memory.limit_in_bytes": f"{3 * GIB}\n"}, "4:memory:/a\n0::/\n", {}, 3 * GIB),
    # Slurm's allocation on the node (MiB): per node, or per CPU times the node's CPUs; the smallest of all
    ({"memory.max": f"{8 * GIB}\n"}, "0::/\n", {"SLURM_MEM_PER_NODE": "4096"}, 4 * GIB),
    ({}, "", {"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "3"}, 3 * GIB),
    ({}, "", {"SLURM_MEM_PER_NODE": "0"}, None),
])
def test_host_memory_limit_is_the_smallest_of_cgroup_and_slurm(tmp_path: Path, files: dict, proc: str, env: dict,
                                                               want: int | None) -> None:
    root = _cgroup(tmp_path / "cg", files)
    (tmp_path / "cgroup").write_text(proc)
    assert autobatch.host_memory_limit(root, env, tmp_path / "cgroup") == want


def test_cpu_budget_is_the_limit_split_between_the_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container (or Slurm job) allowed 4 GiB on a big host: each of 2 local ranks plans within 0.9 x 2 GiB."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(autobatch, "host_memory_limit", lambda: 4 * GIB)
    assert autobatch.memory_budget(2, 0) == pytest.approx(4 * GIB * autobatch.BUDGET_FRACTION / 2)


def test_probe_labels_every_real_position(tiny_model: Path, tiny_tokenizer, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head runs only at label rows, so the probe labels every real position (an upper bound for any
    micro-batch of these lengths), not the examples' own few answer tokens."""
    import json
    from types import SimpleNamespace

    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.config import DataSection
    from ia3_dist.data.records import load_records
    from ia3_dist.data.tokenize import IGNORE_INDEX, tokenize
    from ia3_dist.models.loss import TokenSumLM

    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "长的问题" * (5 + i), "output": "是"} for i in range(6)],
                            ensure_ascii=False))
    cfg = DataSection(path=str(f), max_length=64)
    data = tokenize(load_records(cfg), tiny_tokenizer, cfg)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM"))
    engine = SimpleNamespace(module=TokenSumLM(peft), device=torch.device("cpu"))
    seen = []
    measure = autobatch._measure
    monkeypatch.setattr(autobatch, "_measure", lambda e, b, *a: seen.append(b) or measure(e, b, *a))
    p = SimpleNamespace(data=data, tokenizer=tiny_tokenizer, env=DistEnv(0, 0, 1, 1))

    def saved_bytes(fn: Callable[[], object]) -> int:
        """What autograd keeps for the backward while ``fn`` runs (the activations a step holds)."""
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]

    box = []
    probed = saved_bytes(lambda: box.append(autobatch.probe(engine, p, autobatch.AutoBatch(4, 4, 1024.0, micro=4))))
    out = box[0]
    assert out.micro == 4 and out.probe_peak_gib is not None
    [b] = seen
    # The probe keeps what a training step keeps, and a little more (the embeddings' output is its leaf); with the
    # IA3 vectors frozen it kept a quarter less. It accumulates no gradient.
    trained = saved_bytes(lambda: engine.module(**b))
    assert trained <= probed <= 1.05 * trained, (probed, trained)
    ia3 = [q for n, q in peft.named_parameters() if "ia3_l" in n]
    assert ia3 and all(q.requires_grad and q.grad is None for q in ia3)
    real = b["attention_mask"] == 1
    assert torch.equal(b["labels"][real], b["input_ids"][real]) and bool((b["labels"][~real] == IGNORE_INDEX).all())
    own = sum(sum(v != IGNORE_INDEX for v in data.example(i)[2]) for i in range(len(data)))
    assert int(real.sum()) > own  # the examples' own labels: the answers alone


@pytest.mark.parametrize("error, fits", [
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), None),
])
def test_a_library_allocation_failure_is_out_of_memory(error: RuntimeError, fits: bool | None) -> None:
    """On a full GPU, cuBLAS's or cuDNN's own allocation fails as a RuntimeError naming it, not torch's
    OutOfMemoryError: the probe reads it as does-not-fit (a smaller micro-batch), and any other error still
    stops the run."""
    from types import SimpleNamespace

    import torch

    def module(**_: object) -> None:
        raise error

    engine = SimpleNamespace(device=torch.device("cpu"), module=module)
    batch = {"input_ids": torch.zeros((2, 3), dtype=torch.long)}
    if fits is None:
        with pytest.raises(RuntimeError, match="is invalid for input"):
            autobatch._measure(engine, batch, {}, 0)
    else:
        assert autobatch._measure(engine, batch, {}, 0) is None


@pytest.mark.parametrize("body, key", [({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
                                       ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps")])
def test_auto_refuses_a_deepspeed_file_that_fixes_the_batch(tmp_path: Path, tiny_model: Path, body: dict,
                                                           key: str, capsys: pytest.CaptureFixture) -> None:
    """auto chooses micro-batch and accumulation: a file fixing either was compared with the provisional
    micro-batch 1 (its value refused as if the user had written 1, or silently overwritten once auto chose)."""
    import json

    from ia3_dist.cli import main

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, **body}))
    args = ["check", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"),
            f"model.path={tiny_model}", "train.micro_batch_size=auto", f"deepspeed.config={ds}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"auto chooses the micro-batch and the accumulation, and {ds} sets '{key}'" in err, err
    # With train.global_batch_size, a fixed accumulation names the key that decides it.
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}))
    assert main([*args[:-2], f"deepspeed.config={ds}", "train.global_batch_size=16"]) == 2
    assert "but the run config gives 4 (train.global_batch_size)" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["smaller", "other-world", "same", "unrecorded", "no-state", "fp16"])
def test_a_resume_on_less_memory_chooses_afresh_what_no_longer_fits(tiny_model: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    case: str) -> None:
    """A checkpoint written at micro-batch 12 with ample memory, resumed with a budget plan fits 4 in. On less
    memory than the checkpoint's run sized for (its meta's auto_budget_mib), or on another number of ranks (whose
    resume is layout-independent anyway), from a checkpoint with layout-independent state, auto chooses afresh
    (and says why); on the same budget (the same allocation: a plan
    that estimates otherwise from one start to the next must not break an exact continuation), without the record
    (an earlier ia3-dist), without that state, or in fp16 (whose loss scale that state lacks), the checkpoint's
    micro-batch stays, and the last two say why."""
    import json

    from ia3_dist.runtime import portable

    overrides = [f"model.path={tiny_model}", "train.grad_accum=12", "data.max_length=64"]
    if case == "fp16":
        overrides.append("train.precision=fp16")
    cfg = autobatch.with_micro(load_config(None, [*overrides, "train.micro_batch_size=auto"]), 1, 12)
    mc = load_model_config(str(tiny_model), cfg.model)
    env = DistEnv(0, 0, 2, 2)
    ds = {"zero_optimization": {"stage": 2}}
    s = memory.shape_of(mc, cfg.ia3)
    need = [memory.rank_memory(s, "", 2, False, 2, 64, m, 4, False, memory.framework_rss()).gpu_total
            for m in (5, 6)]
    budget = (need[0] + need[1]) / 2
    monkeypatch.setattr(autobatch, "memory_budget", lambda *_: budget)
    ckpt = tmp_path / "step3"
    ckpt.mkdir()
    meta = {"step": 3, "total_steps": 10, "world_size": 4 if case == "other-world" else 2, "micro_batch_size": 12,
            "grad_accum": 1,
            "precision": "fp16" if case == "fp16" else "fp32", "objective": "sft"}
    if case not in ("unrecorded", "other-world"):
        meta["auto_budget_mib"] = int(budget / 2**20) if case == "same" else int(budget / 2**20) * 4
    (ckpt / "meta.json").write_text(json.dumps(meta))
    if case != "no-state":
        (ckpt / portable.STATE).write_bytes(b"")
        (ckpt / portable.INFO).write_text("{}")
    got = autobatch.choose(cfg, mc, env, ds, 64, ckpt)
    if case in ("smaller", "other-world"):
        assert (got.micro, got.source) == (4, "plan"), got
        assert "the checkpoint's micro-batch 12 does not fit the" in got.line() and "plan picked 4" in got.line()
        assert ("it was sized for" in got.line()) is (case == "smaller")
    else:
        assert (got.micro, got.source) == (12, "checkpoint"), got
        line = got.line()
        assert "from the checkpoint it resumes" in line
        said = "kept, as this checkpoint resumes only at its own micro-batch" if case in ("no-state", "fp16") else None
        assert (said in line) if said else ("does not fit" not in line), line
