"""Which examples each rank sees in each optimizer step: the held-out split, the epoch order, length-grouped
micro-batches and the per-rank slices. A pure function of (seed, epoch, step), so a resume needs no replay."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .tokenize import TokenizedData

EVAL_SALT = 7919
"""Mixed into the eval hold-out's seed; a mixture adds the source's index, and since numpy's seed sequences ignore
trailing zeros, a one-source mixture holds out what ``data.path`` would."""


def held_out(n: int, ratio: float, key: Sequence[int]) -> np.ndarray | None:
    """Sorted indices of a seeded ``ratio`` of ``n`` examples (at least one), drawn by ``default_rng(key)``; None
    when that would leave no training example (the caller names the data in its error)."""
    n_eval = max(1, round(n * ratio))
    if n_eval >= n:
        return None
    return np.sort(np.random.default_rng(list(key)).permutation(n)[:n_eval])


def copies_of(data: TokenizedData, held: np.ndarray, upto: int | None = None) -> np.ndarray:
    """The examples of ``data`` (of its first ``upto``) outside ``held`` whose tokens equal a held-out example's:
    a file with repeated records (the built-in demo:zh-styles repeats 104 of its 400), one file listed twice in a
    mixture. Trained on, they would be scored by the eval as unseen. A cheap key (length and token sum) first,
    then the bytes of the candidates; pairs compare both sides."""
    if not len(held):
        return np.zeros(0, dtype=np.int64)
    n = len(data) if upto is None else upto
    offsets = np.asarray(data.offsets, dtype=np.int64)
    seq_lengths = np.diff(offsets)
    # Per sequence, without an int64 copy of every token (GBs for a large cache): reduceat casts in buffers.
    seq_sums = np.zeros(len(seq_lengths), dtype=np.int64)
    filled = seq_lengths > 0
    if filled.any():
        seq_sums[filled] = np.add.reduceat(data.ids, offsets[:-1][filled], dtype=np.int64)
    seqs = data.sequence_rows(np.arange(n))
    if data.rows is not None:
        seqs = data.rows[seqs]
    lengths = seq_lengths[seqs].reshape(n, data.group).sum(1)
    sums = seq_sums[seqs].reshape(n, data.group).sum(1)
    keys = lengths * np.int64(1 << 40) + sums % np.int64(1 << 40)
    is_held = np.zeros(n, dtype=bool)
    is_held[held] = True
    candidates = np.flatnonzero(np.isin(keys, keys[held]) & ~is_held)
    if not len(candidates):
        return candidates.astype(np.int64)

    def tokens(i: int) -> bytes:
        rows = seqs.reshape(n, data.group)[i]
        return b"\0".join(np.asarray(data.ids[offsets[r]:offsets[r + 1]]).tobytes() for r in rows)

    shared = set(keys[candidates].tolist())
    exact = {tokens(int(i)) for i in held if int(keys[i]) in shared}
    return np.asarray([i for i in candidates if tokens(int(i)) in exact], dtype=np.int64)


def split_eval(data: TokenizedData, ratio: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(train, eval): a seeded random ``ratio`` of the examples is held out, and the copies of held-out examples
    left out of training (:func:`copies_of`); train keeps file order."""
    held = held_out(len(data), ratio, [seed, EVAL_SALT])
    if held is None:
        raise UsageError(f"data.eval_ratio={ratio} leaves no training examples out of {len(data)}")
    copies = copies_of(data, held)
    keep = np.setdiff1d(np.arange(len(data)), np.concatenate([held, copies]))
    if not len(keep):
        raise UsageError(f"data.eval_ratio={ratio}: every training example of {len(data)} is a copy of a held-out "
                         f"one; give the run distinct records or use data.eval_path")
    # The training part reports everything read (records, drops, truncation), not only what it kept.
    train = data.subset(keep).with_report_of(data)
    train.held_copies = len(copies)
    return train, data.subset(held)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    return -(-n // global_batch)


def epochs_done(steps: int, n: int, lay: Layout) -> float:
    """HF Trainer's logged ``epoch`` after ``steps`` optimizer steps: ``epoch + micro-batches done / micro-batches
    per epoch`` of one rank's dataloader (``ceil(ceil(n / world) / micro)`` of them, ``accum`` per step): 80/674
    after 10 steps of 8 one-example micro-batches over 674 examples, not 10/85; 1.0 at the first epoch's end
    (an epoch's last step may be short)."""
    spe = steps_per_epoch(n, lay.global_batch)
    epoch, k = divmod(steps, spe)
    per_rank = -(-n // lay.world)  # ceil: DistributedSampler pads the ranks to equal counts
    per_epoch = max(1, -(-per_rank // lay.micro))
    return epoch + min(k * lay.accum, per_epoch) / per_epoch


def examples_consumed(steps: int, n: int, lay: Layout) -> int:
    """Examples trained in the first ``steps`` steps, exactly: length grouping shuffles an epoch's short step among
    its last group's steps (:func:`step_sizes`)."""
    epoch, k = divmod(steps, steps_per_epoch(n, lay.global_batch))
    return epoch * n + sum(step_sizes(n, lay, epoch)[:k])


ORDER_VERSION = 2
"""Bumped whenever plan_epoch orders examples differently: a checkpoint of another order is not resumed."""


@dataclass(frozen=True)
class Layout:
    """How examples are cut into optimizer steps: global batch = micro x accum x world."""

    micro: int
    accum: int
    world: int
    seed: int
    shuffle: bool
    group_by_length: bool
    group_steps: int = 64
    """Steps per length group (grouped mode): large enough to sort well, small enough to keep order random."""
    pack_length: int = 0
    """Tokens per packed row with ``data.packing`` (0: not packed). Packing changes where a step's examples sit
    in its micro-steps, never which examples form the step."""
    consecutive: bool = False
    """Micro-batches are runs of consecutive examples of the step's order, dealt to the ranks in turn (plain mode),
    instead of every world-th example per rank: the preference objectives, whose per-micro-batch terms (ORPO's
    NLL, TRL's means) then see the micro-batches a one-process TRL run sees, on any number of ranks."""

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def rank_micro_batches(batch: Sequence[int], rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
    """Split one global batch (<= micro*accum*world example indices) into this rank's ``accum`` micro-batches.

    Rank r takes every world-th example, so a short last batch stays spread over the ranks. Empty micro-batches
    are kept as empty lists: every rank must still run ``accum`` micro-steps so collectives line up.
    """
    mine = list(batch[rank::world])
    out = [mine[i * micro:(i + 1) * micro] for i in range(accum)]
    if sum(len(m) for m in out) != len(mine):
        raise ValueError(f"global batch of {len(batch)} does not fit micro={micro} x accum={accum} x world={world}")
    return out


def rank_runs(batch: Sequence[int], rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
    """Like :func:`rank_micro_batches`, but micro-batch c of the step is examples ``[c*micro, (c+1)*micro)`` of
    ``batch`` and goes to rank ``c % world`` (a short last batch stays spread over the ranks)."""
    runs = [list(batch[i:i + micro]) for i in range(0, len(batch), micro)]
    out = runs[rank::world][:accum]
    return out + [[] for _ in range(accum - len(out))]


def plan_epoch(lengths: np.ndarray, lay: Layout, epoch: int) -> list[list[list[int]]]:
    """Every step of one epoch as ``world x accum`` micro-batches (rank r's are ``[r*accum:(r+1)*accum]``).

    Plain mode: consecutive global batches of the epoch order. Length-grouped mode: the epoch order is cut into
    groups of ``group_steps`` global batches; inside a group examples are sorted by length and cut into
    micro-batches of similar lengths (little padding); runs of one step's worth of neighbouring micro-batches
    are shuffled within the group and dealt round-robin to the ranks. Either way each example appears exactly
    once per epoch and the plan is a pure function of (seed, epoch).
    """
    n = len(lengths)
    order = epoch_order(n, lay.seed, epoch, lay.shuffle)
    per_step = lay.world * lay.accum
    steps: list[list[list[int]]] = []
    if not lay.group_by_length:
        for k in range(steps_per_epoch(n, lay.global_batch)):
            batch = order[k * lay.global_batch:(k + 1) * lay.global_batch].tolist()
            deal = rank_runs if lay.consecutive else rank_micro_batches
            steps.append([mb for r in range(lay.world) for mb in deal(batch, r, lay.world, lay.micro, lay.accum)])
        return steps
    for g, size, block_order in _group_blocks(n, lay, epoch):
        idx = order[g:g + size]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        chunk = [idx[i:i + lay.micro].tolist() for i in range(0, len(idx), lay.micro)]
        # Whole steps of neighbouring micro-batches are shuffled, not single micro-batches, and a step's
        # micro-batches are dealt round-robin to the ranks: every rank of a step gets about the same number of
        # tokens, so none waits for another at the gradient all-reduce.
        blocks = [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
        for j in block_order:
            b = blocks[j] + [[] for _ in range(per_step - len(blocks[j]))]
            steps.append([b[a * lay.world + r] for r in range(lay.world) for a in range(lay.accum)])
    return steps


def _group_blocks(n: int, lay: Layout, epoch: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Length-grouped mode: ``(start, size, block order)`` of each group of the epoch order, where a group's
    blocks are its runs of one step's worth of micro-batches (the last one short where the group is) and the
    order is the group's shuffle of them. The sizes alone fix it, not the lengths: :func:`step_sizes` needs none."""
    rng = np.random.default_rng([lay.seed, epoch, 2])
    group = lay.global_batch * lay.group_steps
    for g in range(0, n, group):
        size = min(group, n - g)
        yield g, size, rng.permutation(-(-size // (lay.micro * lay.world * lay.accum)))


def step_sizes(n: int, lay: Layout, epoch: int) -> list[int]:
    """Examples in each step of ``epoch``'s plan (:func:`plan_epoch`), without the lengths: in length-grouped
    mode the last group's short step lands wherever that group's shuffle puts it."""
    gb = lay.global_batch
    if not lay.group_by_length:
        return [min(gb, n - k * gb) for k in range(steps_per_epoch(n, gb))]
    return [min(size, (j + 1) * gb) - j * gb for _, size, block_order in _group_blocks(n, lay, epoch)
            for j in block_order.tolist()]


def iter_steps(lengths: np.ndarray, lay: Layout, total_steps: int,
               start_step: int = 0) -> Iterator[tuple[int, int, list[list[int]]]]:
    """Yield ``(step, epoch, micro_batches)`` for steps ``start_step .. total_steps-1``; positions are computed,
    never replayed, so starting at step k costs nothing."""
    spe = steps_per_epoch(len(lengths), lay.global_batch)
    plan_of, plan = -1, []
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, spe)
        if epoch != plan_of:
            plan, plan_of = plan_epoch(lengths, lay, epoch), epoch
            if len(plan) != spe:
                raise AssertionError(f"epoch plan has {len(plan)} steps, expected {spe}")
        yield step, epoch, plan[k]


def strided_batches(n: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Evaluation batches of ``n`` examples: rank r takes r, r+world, ... in runs of ``micro``, and every rank as
    many runs (the last ones empty where it has fewer examples), so all ranks run the same number of forward
    passes."""
    own = list(range(rank, n, world))
    per_rank = -(-n // world)  # the most examples any rank has
    n_batches = -(-per_rank // micro)
    return [own[j * micro:(j + 1) * micro] for j in range(n_batches)]


def rank_slice(step: list[list[int]], rank: int, accum: int) -> list[list[int]]:
    return step[rank * accum:(rank + 1) * accum]
