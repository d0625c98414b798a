"""The run config's schema: one dataclass per YAML section, each field documented, checks in ``__post_init__``.

Loading (YAML, overrides, type coercion, unknown keys) is in :mod:`ia3_dist.config.load`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import UsageError
from .archs import ARCHS

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")


def fail(key: str, msg: str) -> typing.NoReturn:
    raise UsageError(f"config key '{key}': {msg}")


@dataclass
class ModelSection:
    path: str = "demo:tiny-bloom"
    """Local model dir or hub name for ``AutoModelForCausalLM.from_pretrained``; ``demo:tiny-bloom`` builds the
    embedded tiny Bloom once and caches it."""
    tokenizer: str | None = None
    """Tokenizer dir or hub name; defaults to ``model.path``."""
    arch: str | None = None
    """Bloom family architecture (bloom-560m, bloom-1b1, bloom-1b7, bloom-3b, bloom-7b1, bloom, bloom-1b4-zh), so
    ``ia3-dist plan`` works without weights or network."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for model and tokenizer."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repo. Off unless set: it runs code from the repo."""
    fused_gelu: bool = True
    """Run Bloom's tanh GeLU as one fused kernel (same formula; last-bit rounding differs, max 5e-7)."""
    last_mlp_at_labels: bool = True
    """Run the last layer's MLP only at positions that predict a label token (no other position reaches the
    loss). Off by itself under gradient checkpointing, whose recomputation would see all positions."""

    def __post_init__(self) -> None:
        if not self.path:
            fail("model.path", "must be a model directory or hub name")
        if self.arch is not None and self.arch not in ARCHS:
            fail("model.arch", f"unknown {self.arch!r}; known: {', '.join(ARCHS)}")


@dataclass
class DataSection:
    path: str = "demo:zh-styles"
    """``save_to_disk`` dir, ``.json`` (list of records), ``.jsonl``, a hub dataset name, or ``demo:zh-styles``."""
    split: str = "train"
    """Split to use for hub datasets and ``DatasetDict`` dirs."""
    max_length: int = 256
    """Truncate ids, attention mask and labels to this many tokens (the reference recipe uses 256)."""
    prompt_template: str = "Human: {instruction}\n{input}"
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
    goes to padding. null (auto): on when micro_batch_size > 1 and shuffle is on; off keeps the plain order."""
    limit: int | None = None
    """Use only the first N records (after loading, before tokenizing)."""
    eval_ratio: float = 0.0
    """Hold out this fraction of the examples (chosen from ``train.seed``) for eval loss and perplexity."""
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

    def __post_init__(self) -> None:
        if self.max_length < 2:
            fail("data.max_length", f"must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_ratio < 1.0:
            fail("data.eval_ratio", f"must be in [0, 1), got {self.eval_ratio}")
        if self.eval_ratio and self.eval_path:
            fail("data.eval_ratio", "set either data.eval_ratio or data.eval_path, not both")
        if self.num_proc < 0:
            fail("data.num_proc", f"must be >= 0, got {self.num_proc}")
        if self.on_bad_record not in ("error", "skip"):
            fail("data.on_bad_record", f"must be error or skip, got {self.on_bad_record!r}")
        if self.limit is not None and self.limit < 1:
            fail("data.limit", f"must be >= 1 or null, got {self.limit}")
        try:
            self.prompt_template.format(instruction="", input="")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            fail("data.prompt_template", f"bad template ({e!r}); only {{instruction}} and {{input}} are allowed")


@dataclass
class IA3Section:
    target_modules: list[str] | None = None
    """Modules whose activations IA3 scales; null uses PEFT's default for the architecture
    (Bloom: ``query_key_value``, ``mlp.dense_4h_to_h``)."""
    feedforward_modules: list[str] | None = None
    """Subset of target modules scaled on their input; null uses PEFT's default (Bloom: ``mlp.dense_4h_to_h``)."""

    def __post_init__(self) -> None:
        if (self.feedforward_modules is not None) and self.target_modules is None:
            fail("ia3.feedforward_modules", "set ia3.target_modules too (feedforward modules must be a subset)")
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                fail("ia3.feedforward_modules", f"{sorted(extra)} not in ia3.target_modules")


@dataclass
class TrainSection:
    micro_batch_size: int = 1
    """Examples per rank per forward pass."""
    grad_accum: int = 8
    """Micro-batches per rank per optimizer step. Global batch = micro_batch_size x grad_accum x world size."""
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
    data.eval_path."""
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

    def __post_init__(self) -> None:
        if self.eval_every < 0:
            fail("train.eval_every", f"must be >= 0, got {self.eval_every}")
        for key in ("micro_batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, key) < 1:
                fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps < 0:
            fail("train.max_steps", f"must be >= 0, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("train.lr", f"must be a positive number, got {self.lr}")
        if self.precision not in PRECISIONS:
            fail("train.precision", f"must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")
        if self.scheduler not in SCHEDULERS:
            fail("train.scheduler", f"must be one of {'|'.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.warmup_steps < 0:
            fail("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("train.betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            fail("train", "weight_decay and grad_clip must be >= 0 and eps > 0")
        if self.peak_tflops < 0:
            fail("train.peak_tflops", f"must be >= 0, got {self.peak_tflops}")
        if self.threads < 0:
            fail("train.threads", f"must be >= 0, got {self.threads}")
        if self.stop_after_steps < 0:
            fail("train.stop_after_steps", f"must be >= 0, got {self.stop_after_steps}")
        if not self.resume:
            fail("train.resume", "must be auto, none or a checkpoint path")


@dataclass
class DeepSpeedSection:
    config: str = "zero2"
    """A shipped config name (``zero0`` .. ``zero3``, ``zero3_offload``) or a path to a DeepSpeed JSON file.
    Batch sizes, precision, optimizer and scheduler are filled from this run config."""
    timeout_minutes: int = 30
    """Collective timeout for the process group."""

    def __post_init__(self) -> None:
        if self.timeout_minutes < 1:
            fail("deepspeed.timeout_minutes", f"must be >= 1, got {self.timeout_minutes}")


@dataclass
class CheckpointSection:
    every: int = 0
    """Save a DeepSpeed checkpoint (trainable params and optimizer only) every N optimizer steps; 0: only at the
    end."""
    keep: int = 2
    """How many checkpoints to keep."""
    at_end: bool = True
    """Save a checkpoint after the last step."""

    def __post_init__(self) -> None:
        if self.every < 0:
            fail("checkpoint.every", f"must be >= 0, got {self.every}")
        if self.keep < 1:
            fail("checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class OutputSection:
    dir: str = "runs/demo"
    """Run directory: run.yaml, ds_config.json, metrics.jsonl, adapter/, checkpoints/."""
    overwrite: bool = False
    """Start over in an output dir that holds another run's checkpoints (they are deleted)."""

    def __post_init__(self) -> None:
        if not self.dir:
            fail("output.dir", "must be a directory path")


@dataclass
class HardwareSection:
    nodes: int = 1
    """Nodes the run is meant for (``ia3-dist plan`` defaults; the launcher uses what it is given)."""
    gpus_per_node: int = 1
    """GPUs per node the run is meant for."""
    gpu_mem_gib: float = 80.0
    """Memory of one GPU, GiB."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or self.gpu_mem_gib <= 0:
            fail("hardware", "nodes and gpus_per_node must be >= 1 and gpu_mem_gib > 0")


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


