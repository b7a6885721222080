"""Batching stage: deterministic epoch order -> optimizer steps -> micro-batches -> tensors.

A micro-batch is always `micro_batch_size` rows, packed or not, so step counts (and later the
checkpoint schedule) depend only on the number of rows. Packing changes only the tensor layout:
the rows are concatenated into a few long rows with `position_ids` restarting at 0 for each
sample and no attention mask, which transformers turns into a block-diagonal causal mask.
Targets are shifted per sample *before* concatenation, so no token learns to predict the first
token of the next sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .data import Example

IGNORE = -100
DEFAULT_ATTN_TOKENS = 4096  # used when the model does not say its hidden size (see _pack)


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Row indices for one epoch; the same (seed, epoch) always gives the same order."""
    return list(_epoch_order(num_rows, seed, epoch, shuffle))


@functools.lru_cache(maxsize=2)  # every step of an epoch slices the same order: permute once per epoch
def _epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(num_rows))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(num_rows, generator=g).tolist())


def step_rows(num_rows: int, rows_per_step: int, seed: int, step: int, shuffle: bool) -> tuple[int, list[int]]:
    """(epoch, row indices) of optimizer step `step` (0-based). Trailing rows of an epoch that do not fill a step are skipped."""
    steps_per_epoch = num_rows // rows_per_step
    epoch, k = divmod(step, steps_per_epoch)
    order = _epoch_order(num_rows, seed, epoch, shuffle)
    return epoch, list(order[k * rows_per_step : (k + 1) * rows_per_step])


@dataclass
class Batch:
    """Model inputs for one micro-batch plus the counts the loop normalizes by."""

    inputs: dict[str, torch.Tensor]  # input_ids (B, T) and either position_ids or attention_mask
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE where no loss
    num_tokens: int  # real (non-pad) tokens
    num_target_tokens: int  # tokens that carry loss
    # Where hidden states are read (regression, contrastive): pool[n] averages the states of the input's flattened
    # positions it weighs; values[n] is the regression target there. A triplet batch lays out anchors, positives,
    # negatives, so pool rows [0, B) are anchors, [B, 2B) positives, [2B, 3B) negatives.
    pool: torch.Tensor | None = None  # (N, B * T)
    values: torch.Tensor | None = None  # (N,)
    num_rows: int = 0  # data rows (a triplet is one row)
    num_triplets: int = 0
    # A mixture (data.sources): the source of every element of each unit, in the order the objective sums that unit
    # (tokens: the loss-carrying positions in row-major order, i.e. targets[targets != IGNORE]), for per-source loss.
    channels: dict[str, torch.Tensor] | None = None
    num_channels: int = 1

    @property
    def units(self) -> dict[str, int]:
        """What objective terms are normalized by, known before the forward: the loop sums them over every
        micro-batch and process of an optimizer step first (objectives.py)."""
        units = {"tokens": self.num_target_tokens, "rows": self.num_rows}
        if self.values is not None:
            units["targets"] = len(self.values)
        if self.num_triplets:
            units["triplets"] = self.num_triplets
        return units

    def channel_units(self) -> dict[str, torch.Tensor]:
        """Each unit counted per source (a (num_channels,) tensor per unit); {} with one source."""
        if self.channels is None:
            return {}
        return {unit: torch.bincount(c.cpu(), minlength=self.num_channels) for unit, c in self.channels.items()}

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            targets=self.targets.to(device),
            pool=None if self.pool is None else self.pool.to(device),
            values=None if self.values is None else self.values.to(device),
            channels=None if self.channels is None else {k: v.to(device) for k, v in self.channels.items()},
        )


def _shifted(ex: Example) -> list[int]:
    # target at position t is the label of token t+1
    return ex.labels[1:] + [IGNORE]


def collate(
    examples: list[Example],
    pad_id: int,
    pack: bool,
    pack_row_tokens: int | None,
    attn_tokens: int = DEFAULT_ATTN_TOKENS,
    num_channels: int = 1,
) -> Batch:
    """Tensors for a micro-batch: packed rows (padding only where rows differ in length), or right-padded
    rows with an attention mask. attn_tokens: see _pack. Triplet rows run as three sequences each (anchors first).
    num_channels > 1 (a mixture): each unit's sources are recorded too (Batch.channels)."""
    num_rows = len(examples)
    num_triplets = sum(1 for e in examples if e.pair)
    if num_triplets:
        examples = [e for e in examples] + [e.pair[0] for e in examples] + [e.pair[1] for e in examples]  # type: ignore[index]
    num_tokens = sum(len(e.input_ids) for e in examples)
    if pack:
        rows, placed = _pack(examples, pack_row_tokens, attn_tokens)
        width = max(len(r[0]) for r in rows)
        ids, pos, tgt = [], [], []
        for r_ids, r_pos, r_tgt in rows:
            pad = width - len(r_ids)
            ids.append(r_ids + [pad_id] * pad)
            pos.append(r_pos + list(range(pad)))  # the padding is its own short sequence
            tgt.append(r_tgt + [IGNORE] * pad)
        inputs = {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos)}
    else:
        width = max(len(e.input_ids) for e in examples)
        ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
        mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
        tgt = [_shifted(e) + [IGNORE] * (width - len(e.input_ids)) for e in examples]
        inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        placed = [(i, 0) for i in range(len(examples))]
    targets = torch.tensor(tgt)
    pool, values = _pool(examples, placed, len(ids) * width, width)
    channels = _channels(examples, placed, targets, num_rows, num_triplets) if num_channels > 1 else None
    return Batch(inputs, targets, num_tokens, int((targets != IGNORE).sum()), pool, values, num_rows, num_triplets, channels, num_channels)


def _channels(
    examples: list[Example], placed: list[tuple[int, int]], targets: torch.Tensor, num_rows: int, num_triplets: int
) -> dict[str, torch.Tensor]:
    """The source of every loss-carrying token, row, regression target and triplet, in the order objectives sum them."""
    grid = torch.full(targets.shape, -1, dtype=torch.long)
    for e, (row, offset) in zip(examples, placed):
        grid[row, offset : offset + len(e.input_ids)] = e.channel
    rows = [e.channel for e in examples[:num_rows]]
    channels = {"tokens": grid[targets != IGNORE], "rows": torch.tensor(rows, dtype=torch.long)}
    channels["targets"] = torch.tensor([e.channel for e in examples for _ in e.values], dtype=torch.long)
    if num_triplets:
        channels["triplets"] = torch.tensor(rows, dtype=torch.long)
    return channels


def _pool(examples: list[Example], placed: list[tuple[int, int]], size: int, width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (N, size) averaging weights of every pool of every example at its (row, offset) in the batch, and the
    regression targets (None when no example has one)."""
    pools = [(i, p) for i, e in enumerate(examples) for p in e.pools]
    if not pools:
        return None, None
    weights = torch.zeros(len(pools), size)
    for n, (i, positions) in enumerate(pools):
        row, offset = placed[i]
        weights[n, [row * width + offset + p for p in positions]] = 1.0 / len(positions)
    values = [v for e in examples for v in e.values]
    return weights, (torch.tensor(values, dtype=torch.float32) if values else None)


def _pack(
    examples: list[Example], row_tokens: int | None, attn_tokens: int
) -> tuple[list[tuple[list[int], list[int], list[int]]], list[tuple[int, int]]]:
    """(ids, position ids, targets) of each packed row, and the (row, offset) each example landed at."""
    out, placed = [], [(0, 0)] * len(examples)
    for r, members in enumerate(pack_rows([len(e.input_ids) for e in examples], row_tokens, attn_tokens)):
        ids, pos, tgt = [], [], []
        for i in members:
            placed[i] = (r, len(ids))
            ids.extend(examples[i].input_ids)
            pos.extend(range(len(examples[i].input_ids)))
            tgt.extend(_shifted(examples[i]))
        out.append((ids, pos, tgt))
    return out, placed


def pack_rows(lengths: list[int], row_tokens: int | None, attn_tokens: int = DEFAULT_ATTN_TOKENS) -> list[list[int]]:
    """Place samples of these lengths into rows (first-fit decreasing) of the width that computes least;
    returns the sample indices of each row, in their original order.

    A batch of R rows of width W costs about R * W * (1 + W / attn_tokens): the linear layers grow
    with W, attention with W^2 (SDPA applies the block-diagonal mask to a dense score matrix), and
    attn_tokens (~6 x hidden size) is the width at which both cost the same. Candidate widths are
    multiples of the longest sample, or exactly row_tokens when the user set it.
    """
    longest = max(lengths)
    widths = [row_tokens] if row_tokens else sorted({min(int(longest * f), sum(lengths)) for f in (1, 1.25, 1.5, 2, 3, 4)})
    best_cost, best_rows = math.inf, []
    for width in widths:
        rows: list[list[int]] = []
        totals: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = next((r for r, t in enumerate(totals) if t + lengths[i] <= width), None)
            if r is None:
                rows.append([])
                totals.append(0)
                r = len(rows) - 1
            rows[r].append(i)
            totals[r] += lengths[i]
        used = max(totals)
        cost = len(rows) * used * (1 + used / attn_tokens)
        if cost < best_cost:
            best_cost, best_rows = cost, rows
    return [sorted(members) for members in best_rows]


def micro_batch_shape(
    lengths: list[int], pack: bool, pack_row_tokens: int | None, attn_tokens: int = DEFAULT_ATTN_TOKENS
) -> tuple[int, int, bool]:
    """(rows, width, masked) of the input tensor `collate` builds for samples of these lengths (padding included);
    masked: attention needs a mask (some row is padded, or holds several samples)."""
    if not pack:
        return len(lengths), max(lengths), min(lengths) < max(lengths)
    rows = pack_rows(lengths, pack_row_tokens, attn_tokens)
    totals = [sum(lengths[i] for i in r) for r in rows]
    width = max(totals)
    return len(rows), width, len(rows) < len(lengths) or min(totals) < width


def attn_tokens_for(hidden_size: int | None) -> int:
    """Packed-row width at which attention costs as much as the linear layers (~6 x hidden size)."""
    return 6 * hidden_size if hidden_size else DEFAULT_ATTN_TOKENS


def batch_builder(
    pad_id: int, pack: bool, pack_row_tokens: int | None, model: torch.nn.Module | None, num_channels: int = 1
) -> Callable[[list[Example]], Batch]:
    """The one collate of a run, for training, the held-out loss and the eval suites alike (the cost model reads the
    model's width: pass the unwrapped model, or None for the default; num_channels: data sources, for per-source loss)."""
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    attn_tokens = attn_tokens_for(hidden_size)
    return functools.partial(
        collate, pad_id=pad_id, pack=pack, pack_row_tokens=pack_row_tokens, attn_tokens=attn_tokens, num_channels=num_channels
    )


def micro_batches(examples: list[Example], rows: list[int], micro_batch_size: int) -> list[list[Example]]:
    return [[examples[i] for i in rows[j : j + micro_batch_size]] for j in range(0, len(rows), micro_batch_size)]


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, device: torch.device, vocab_size: int, atol: float = 1e-3) -> bool:
    """Does this model's attention respect packed-sequence boundaries? Compare logits of two short
    random sequences run packed vs one by one (a few dozen tokens: cheap even for large models)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, 11), generator=g)
    b = torch.randint(0, vocab_size, (1, 7), generator=g)
    was_training = model.training
    model.eval()
    try:
        sep = [model(input_ids=x.to(device), use_cache=False).logits.float() for x in (a, b)]
        packed = model(
            input_ids=torch.cat([a, b], 1).to(device),
            position_ids=torch.cat([torch.arange(11), torch.arange(7)])[None].to(device),
            use_cache=False,
        ).logits.float()
    finally:
        model.train(was_training)
    return torch.allclose(packed, torch.cat(sep, 1), atol=atol, rtol=1e-3)
