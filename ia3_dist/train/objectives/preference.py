"""Preference objectives on chosen/rejected pairs, as TRL defines them (same formulas, hyperparameter names and
metric names): ``dpo`` (``DPOTrainer``: ``sigmoid``, ``ipo``, ``robust``, ``hinge``), ``orpo`` (``ORPOTrainer``)
and ``simpo`` (``CPOTrainer(loss_type="simpo")``).

A micro-batch holds m pairs as 2m rows (chosen rows, then rejected: :func:`..data.collate.collate_pairs`). Its
loss term is TRL's loss of that micro-batch (a mean over its pairs, plus ORPO's NLL, a token mean over its chosen
rows); the step's loss is the mean of its micro-batches' terms over all ranks, which is what HF Trainer's gradient
accumulation makes of TRL's per-micro-batch losses. Metrics are TRL's too: per micro-batch means, averaged over
the micro-batches of the logging window.

Held-out metrics (:meth:`Preference.evaluate`) must not depend on the eval batching (micro-batch size, world
size), so they are means over the whole held-out set: over its pairs, and for the NLL (``eval_nll_loss`` and the
NLL part of ``eval_loss``, ORPO's and SimPO's with ``cpo_alpha``) over its NLL tokens, summed over all batches and
ranks. A per-batch token mean, TRL's definition and still the training one, would weight a token by the size of
the batch it fell in.

DPO's reference is the model the run starts from (the base with a fresh, identity IA3 adapter, or the adapter of
``ia3.init_from``): its log-probabilities of every pair are computed once before step 1 (:mod:`.reference`), so no
second model is held and the reference costs one forward pass over the data instead of one per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...data.collate import pair_batch, to_device
from ...data.sampler import rank_slice, strided_batches
from ...models.families import disable_dropout
from ...models.loss import TokenLogpLM, row_sums
from ...runtime import dist
from ..evaluate import eval_mode
from ..metrics import executed_flops, model_flops
from ..stats import StepStats

COMMON = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")
EXTRA = {"dpo": (), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "simpo": ("nll_loss",)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's ``log1mexp``). Each branch sees its input
    clamped to its own side: ``torch.where`` differentiates both, and the unused one's infinite derivative (exp(x)
    rounding to 1, or x = 0) times a zero gradient is NaN. The used branch's values are TRL's wherever those are
    finite; at x = 0 (an answer of probability 1) it is log(1e-30), not -inf, with a zero gradient."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x.clamp(max=t))),
                       torch.log(-torch.expm1(x.clamp(min=t, max=-1e-30))))


def nll_parts(lp: torch.Tensor, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the NLL tokens' negative log-probs, how many there are) in the micro-batch ``b``; zeros where it
    has none (DPO, SimPO without ``cpo_alpha``)."""
    sel = b["is_nll"]
    # A mask, not a selection: lp[sel] has a data-dependent size (a host sync on the GPU, and one in its backward).
    return -torch.where(sel, lp, 0.0).sum(), sel.sum()


class Preference:
    """``dpo``, ``orpo`` or ``simpo`` (see the module doc)."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self.name = t.objective
        self.nll = {"orpo": "all", "simpo": "answer" if t.cpo_alpha else ""}.get(self.name, "")
        self.nll_weight = {"orpo": 1.0, "simpo": t.cpo_alpha}.get(self.name, 0.0)
        """What the loss multiplies its NLL term by."""
        self.keys = (*COMMON, *EXTRA[self.name])
        self.acc: torch.Tensor | None = None
        self.device = torch.device("cpu")
        """The engine's: a rank with no pair in a logging window all-reduces zeros there (NCCL takes no CPU
        tensor)."""
        self.ref: dict[str, torch.Tensor] = {}
        """``train``/``eval`` -> (pairs, 2) reference log-probs (dpo), indexed by the pair's index."""

    # -- the loop's hooks -------------------------------------------------------------------------------------

    def module(self, peft_model: Any, rows: Any, chunk_bytes: int, inputs: Any) -> torch.nn.Module:
        # Before the reference pass and step 1: TRL's preference configs default to disable_dropout=True. Train
        # mode still, as HF Trainer's model.train() (gradient checkpointing only recomputes in train mode).
        disable_dropout(peft_model.get_base_model())
        return TokenLogpLM(peft_model, rows, chunk_bytes, inputs).train()

    def batches(self, tr: Any, step_mbs: list[list[int]]) -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
        p = tr.p
        mbs = rank_slice(step_mbs, p.env.rank, p.cfg.train.grad_accum)
        filler = next(mb for mb in step_mbs if mb)[:1]
        out = [self._with_reference(pair_batch(p.data, mb if mb else filler, tr.pad_id, self.nll), "train")
               for mb in mbs]
        return out, [bool(mb) for mb in mbs]

    def _with_reference(self, b: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """DPO: the batch's pairs' reference log-probs looked up on the host, so they go to the device with the
        batch (a lookup from the device copy of the indices would stop the host every micro-step)."""
        if self.name == "dpo":
            b["ref"] = self.ref[split][b["pair_index"]]
        return b

    def stats(self, tr: Any, batches: list[dict[str, torch.Tensor]], real: list[bool]) -> Any:
        s = StepStats(stop_requested=float(tr.stop.requested))
        sh = tr.shape
        for b, r in zip(batches, real, strict=True):
            if r:
                mask = b["attention_mask"].numpy()
                rows, seq = mask.shape
                lengths = mask.sum(1)
                labels = float(b["is_label"].numpy().sum())  # numpy: the host copy, no tensor op to count
                computed = float(len(b["pos"]))
                s += StepStats(label_tokens=labels, real_tokens=float(mask.sum()), padded_tokens=float(rows * seq),
                               samples=float(rows // 2), rows=float(rows), micro_batches=1.0,
                               flops=model_flops(lengths, sh.n_params, sh.n_layer, sh.hidden),
                               executed_flops=executed_flops(seq, rows, computed, sh, tr.recompute, 0.0))
        return s

    def normaliser(self, glob: Any) -> float:
        return glob.micro_batches

    def term(self, engine: Any, batch: dict[str, torch.Tensor], real: bool) -> torch.Tensor:
        lp = engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), pos=batch["pos"],
                    target=batch["target"])
        loss, metrics = self.loss(lp, batch, self.reference_of(batch))
        if real:
            self.acc = metrics if self.acc is None else self.acc + metrics
        return loss

    def setup(self, tr: Any) -> None:
        self.device = tr.device
        if self.name != "dpo":
            return
        from .reference import reference_logps

        self.ref["train"] = torch.from_numpy(reference_logps(tr, tr.p.data, "train"))
        if tr.p.eval_data is not None:
            self.ref["eval"] = torch.from_numpy(reference_logps(tr, tr.p.eval_data, "eval"))

    def window_metrics(self, micro_batches: float, reset: bool = True) -> dict[str, float]:
        """Every rank calls it (it reduces); ``reset=False`` keeps the window's sums (a checkpoint records them)."""
        acc = self.acc.double() if self.acc is not None else torch.zeros(len(self.keys), dtype=torch.float64,
                                                                           device=self.device)
        if reset:
            self.acc = None
        total = dist.all_reduce_sum(acc.clone()).tolist()
        return {k: v / max(micro_batches, 1.0) for k, v in zip(self.keys, total, strict=True)}

    def evaluate(self, tr: Any, on_batch: Any) -> dict[str, float]:
        """Rank r takes pairs r, r+world, ...; every rank runs the same number of forward passes. Pair-weighted
        means of the metrics (``eval_rewards/accuracies``: the held-out pair accuracy) and of the micro-batches'
        losses without their NLL (each weighted by its pairs, as HF Trainer's evaluation weights a batch by its
        size); the NLL a token mean over all held-out NLL tokens (see the module doc). All the same on any number
        of ranks and micro-batch size."""
        p, engine = tr.p, tr.engine
        data = p.eval_data
        world, micro = p.env.world_size, p.cfg.train.micro_batch_size
        k = len(self.keys)
        # The keys' metrics and the loss less its NLL term (each times its batch's pairs), the pairs, then the NLL
        # tokens' sum and count: everything the means over the whole set need, in one all-reduce.
        acc = torch.zeros(k + 4, dtype=torch.float64, device=engine.device)
        with eval_mode(engine.module), torch.no_grad():
            for idx in strided_batches(len(data), p.env.rank, world, micro):
                b = self._with_reference(pair_batch(data, idx or [0], tr.pad_id, self.nll), "eval")
                b = to_device(b, engine.device)
                lp = engine(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), pos=b["pos"],
                            target=b["target"])
                loss, metrics = self.loss(lp, b, self.reference_of(b))
                if idx:
                    nll_sum, nll_n = nll_parts(lp, b)
                    rest = loss.double() - self.nll_weight * (nll_sum / nll_n.clamp(min=1)).double()
                    acc[:k + 2] += torch.cat([metrics.double(), rest.reshape(1), acc.new_ones(1)]) * len(idx)
                    acc[k + 2:] += torch.stack([nll_sum.double(), nll_n.double()])
                if on_batch is not None:
                    on_batch()
        total = dist.all_reduce_sum(acc).tolist()
        pairs = max(total[k + 1], 1.0)
        nll = total[k + 2] / max(total[k + 3], 1.0)
        out = {"eval_loss": total[k] / pairs + self.nll_weight * nll, "eval_pairs": total[k + 1]}
        out.update({f"eval_{key}": v / pairs for key, v in zip(self.keys, total[:k], strict=True)})
        if "nll_loss" in self.keys:
            out["eval_nll_loss"] = nll
        return out

    # -- the formulas -----------------------------------------------------------------------------------------

    def reference_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """DPO: the pairs' reference log-probs (:meth:`_with_reference` put them in the batch)."""
        return batch["ref"] if self.name == "dpo" else None

    def loss(self, lp: torch.Tensor, b: dict[str, torch.Tensor], ref: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's loss of one micro-batch and its metrics (detached, in :attr:`keys` order) from the per-token
        log-probs ``lp`` at ``b["pos"]``."""
        t = self.t
        rows = len(b["n_answer"])
        m = rows // 2
        lab = b["is_label"]
        sums = row_sums(torch.where(lab, lp, 0.0), b["row_gather"])
        n_answer = b["n_answer"].to(lp.dtype)
        if self.name == "dpo":
            chosen, rejected = sums[:m], sums[m:]
            ref = ref.to(lp.dtype)
            c_ratio, r_ratio = chosen - ref[:, 0], rejected - ref[:, 1]
            delta = c_ratio - r_ratio
            if t.loss_type == "sigmoid":
                losses = -F.logsigmoid(t.beta * delta)
            elif t.loss_type == "hinge":
                losses = torch.relu(1 - t.beta * delta)
            elif t.loss_type == "ipo":
                ipo = c_ratio / n_answer[:m].clamp(min=1.0) - r_ratio / n_answer[m:].clamp(min=1.0)
                losses = (ipo - 1 / (2 * t.beta)) ** 2
            else:  # robust
                eps = t.label_smoothing
                losses = (-(1 - eps) * F.logsigmoid(t.beta * delta) + eps * F.logsigmoid(-t.beta * delta)) / (
                    1 - 2 * eps)
            loss = losses.mean()
            c_reward, r_reward = t.beta * c_ratio.detach(), t.beta * r_ratio.detach()
            extra: list[torch.Tensor] = []
        else:
            avg = sums / n_answer
            chosen, rejected = avg[:m], avg[m:]
            nll = lp.new_zeros(())
            if self.nll:
                nll_sum, nll_n = nll_parts(lp, b)
                nll = nll_sum / nll_n.clamp(min=1)  # TRL's: a token mean over this micro-batch's chosen rows
            if self.name == "orpo":
                log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
                ratio = F.logsigmoid(log_odds)
                loss = nll - (t.beta * ratio).mean()
                extra = [nll.detach(), ratio.detach().mean(), log_odds.detach().mean()]
            else:  # simpo
                logits = chosen - rejected - t.simpo_gamma / t.beta
                eps = t.label_smoothing
                losses = -F.logsigmoid(t.beta * logits) * (1 - eps) - F.logsigmoid(-t.beta * logits) * eps
                loss = losses.mean() + t.cpo_alpha * nll
                extra = [nll.detach()]
            c_reward, r_reward = t.beta * chosen.detach(), t.beta * rejected.detach()
        metrics = torch.stack([c_reward.mean(), r_reward.mean(), (c_reward > r_reward).to(lp.dtype).mean(),
                               (c_reward - r_reward).mean(), chosen.detach().mean(), rejected.detach().mean(),
                               *extra])
        return loss, metrics
