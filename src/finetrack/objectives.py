"""Objectives: what training minimizes and the held-out loss measures, below both train and eval.

An objective maps (model, batch) to named `Term`s: each a SUM over the micro-batch of one unit (target tokens, rows,
regression targets, triplets) with the weight it has in the loss (0: a metric, logged, never optimized). The units
are counted by the batch builder before the forward (`Batch.units`); the loop sums them over every micro-batch and
process of an optimizer step first and divides each term by its total, so the micro-batch size, the accumulation and
the number of processes never change what is optimized, for every objective:

    loss = sum over terms of  weight * (sum of the term over the step) / (its units over the step)

Kinds (objective.kind): causal_lm (next-token cross-entropy), regression (a head on a pooled hidden state, heads.py),
contrastive (triplets: the weighted cosine formulation or InfoNCE with in-batch negatives), python (your function,
the same protocol: `function(model, batch) -> {name: Term}`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import user_code
from .batches import IGNORE, Batch
from .config import ConfigError, ContrastiveConfig, ObjectiveConfig, RegressionConfig
from .heads import pooled_states


@dataclass(frozen=True)
class Term:
    """One part of an objective over a micro-batch: `total` summed over its `unit`s, `weight` in the loss."""

    total: torch.Tensor
    unit: str  # a key of Batch.units: tokens | rows | targets | triplets
    weight: float = 1.0  # 0: a metric (logged under its name, never optimized)
    by_channel: torch.Tensor | None = None  # a mixture: `total` split by data source ((num_channels,), detached)


def term(values: torch.Tensor, unit: str, batch: Batch, weight: float = 1.0) -> Term:
    """A Term from one value per `unit` of the batch (in the order Batch.channels lists them: for tokens, the
    loss-carrying positions in row-major order), split by data source when the batch mixes several (per-source loss:
    `source/<name>.loss` in metrics.jsonl). A custom objective may build its Terms with it to get per-source loss."""
    by_channel = None
    if batch.channels is not None:
        channels = batch.channels[unit]
        by_channel = torch.zeros(batch.num_channels, device=values.device).index_add_(0, channels, values.detach().float())
    return Term(values.sum(), unit, weight, by_channel)


Objective = Callable[[nn.Module, Batch], dict[str, Term]]


def weighted_loss(terms: dict[str, Term], units: dict[str, int], scale: float = 1.0) -> torch.Tensor:
    """sum of weight * total * scale / units[unit] over the loss terms (`units`: the whole step's)."""
    loss = None
    for term in terms.values():
        if term.weight:
            part = term.weight * term.total * scale / max(1, units[term.unit])
            loss = part if loss is None else loss + part
    if loss is None:
        raise ConfigError(f"the objective returned no loss term (terms: {sorted(terms)}; every weight is 0)")
    return loss


def logged(means: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """metrics.jsonl keys of an objective's per-unit means: `loss/<name>` for each loss term when there are several,
    a metric under its own name, and `discrimination` (stability - (1 - separation)) where both exist."""
    loss_terms = [k for k, w in weights.items() if w]
    out = {f"loss/{k}": means[k] for k in loss_terms if len(loss_terms) > 1}
    out.update({k: v for k, v in means.items() if not weights.get(k)})
    if "stability" in out and "separation" in out:
        out["discrimination"] = out["stability"] - (1.0 - out["separation"])
    return out


# ------------------------------------------------------------------------------------------ causal_lm
def next_token_sum(model: nn.Module, batch: Batch, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy, summed over target tokens (reduction="none": per target token, row-major). Logits are
    computed only where a target exists (boolean `logits_to_keep`): on chat data most positions carry no loss."""
    keep = batch.targets != IGNORE  # (B, T)
    logits = model(**batch.inputs, logits_to_keep=keep, use_cache=False).logits
    return _cross_entropy(logits, keep, batch.targets, reduction)


def _cross_entropy(logits: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep returns (B, T, V)
        logits = logits[keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)  # logits: (N, V)


def causal_lm(model: nn.Module, batch: Batch) -> dict[str, Term]:
    """objective.kind=causal_lm: next-token cross-entropy per target token (with several data sources: per token, so
    the same forward gives each source's loss)."""
    if batch.channels is not None:
        return {"lm": term(next_token_sum(model, batch, "none"), "tokens", batch)}
    return {"lm": Term(next_token_sum(model, batch), "tokens")}


# ----------------------------------------------------------------------------------------- regression
@dataclass(frozen=True)
class Regression:
    """objective.kind=regression: the head's prediction at each read position against its target (normalized by the
    number of targets), plus the next-token loss on answer tokens when lm_weight > 0. `model` is a heads.WithHead."""

    cfg: RegressionConfig

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Term]:
        assert batch.pool is not None and batch.values is not None, "regression batches carry pools and values"
        keep = batch.targets != IGNORE
        use_lm = self.cfg.lm_weight > 0 and batch.num_target_tokens > 0
        logits, predicted = model(batch.pool, logits_to_keep=keep if use_lm else 1, **batch.inputs)
        head = _head_of(model)
        if batch.channels is not None:  # a mixture: per target and per token, for each source's loss
            terms = {"regression": term(regression_loss(predicted, head.normalized(batch.values), self.cfg, "none"), "targets", batch)}
            if self.cfg.lm_weight > 0:
                ce = _cross_entropy(logits, keep, batch.targets, "none") if use_lm else predicted[:0]
                terms["lm"] = term(ce, "tokens", batch, self.cfg.lm_weight)
            return terms
        terms = {"regression": Term(regression_loss(predicted, head.normalized(batch.values), self.cfg), "targets")}
        if self.cfg.lm_weight > 0:
            ce = _cross_entropy(logits, keep, batch.targets) if use_lm else predicted.sum() * 0.0
            terms["lm"] = Term(ce, "tokens", self.cfg.lm_weight)
        return terms


def regression_loss(predicted: torch.Tensor, target: torch.Tensor, cfg: RegressionConfig, reduction: str = "sum") -> torch.Tensor:
    """Summed over targets (reduction="none": per target): mse, mae or huber (huber_delta)."""
    if cfg.loss == "mse":
        return F.mse_loss(predicted, target, reduction=reduction)
    if cfg.loss == "mae":
        return F.l1_loss(predicted, target, reduction=reduction)
    return F.huber_loss(predicted, target, reduction=reduction, delta=cfg.huber_delta)


def _head_of(model: nn.Module):
    # DDP / FSDP wrap the WithHead: its head is one level down
    return model.head if hasattr(model, "head") else model.module.head


@torch.no_grad()
def predict(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) of a regression batch in the data's units (the head's normalization undone)."""
    assert batch.pool is not None and batch.values is not None
    _, predicted = model(batch.pool, logits_to_keep=1, **batch.inputs)
    return _head_of(model).unnormalized(predicted).float(), batch.values.float()


# ---------------------------------------------------------------------------------------- contrastive
@dataclass(frozen=True)
class Contrastive:
    """objective.kind=contrastive on triplet batches (anchors, positives, negatives; batches.collate):

    weighted: lambda_task * CE(anchor answers) + lambda_pos * (-cos(a, p) / tau) + lambda_neg * (cos(a, n) / tau)
    infonce:  lambda_task * CE(anchor answers) + lambda_pos * InfoNCE(a; p against the micro-batch's p and n)

    Metrics per triplet: stability = cos(a, p), separation = 1 - cos(a, n) (discrimination derived when logged)."""

    cfg: ContrastiveConfig

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Term]:
        c = self.cfg
        split = batch.channels is not None  # a mixture: per token and per triplet, for each source's loss
        a, p, n, task = representations(model, batch, c.layer, need_logits=c.lambda_task > 0, reduction="none" if split else "sum")
        cos_ap, cos_an = F.cosine_similarity(a, p, dim=-1), F.cosine_similarity(a, n, dim=-1)
        terms = {}
        if c.lambda_task > 0:
            terms["task"] = term(task, "tokens", batch, c.lambda_task) if split else Term(task, "tokens", c.lambda_task)
        if c.loss == "weighted":
            terms["pos"] = term(-cos_ap / c.tau, "triplets", batch, c.lambda_pos)
            terms["neg"] = term(cos_an / c.tau, "triplets", batch, c.lambda_neg)
        else:
            others = torch.cat([p, n])  # row i's positive is column i; every other row's p and n are negatives
            logits = F.cosine_similarity(a[:, None, :], others[None, :, :], dim=-1) / c.tau
            labels = torch.arange(len(a), device=a.device)
            if split:
                terms["infonce"] = term(F.cross_entropy(logits.float(), labels, reduction="none"), "triplets", batch, c.lambda_pos)
            else:
                terms["infonce"] = Term(F.cross_entropy(logits.float(), labels, reduction="sum"), "triplets", c.lambda_pos)
        terms["stability"] = term(cos_ap.detach(), "triplets", batch, 0.0)
        terms["separation"] = term((1 - cos_an).detach(), "triplets", batch, 0.0)
        return terms


def representations(model: nn.Module, batch: Batch, layer: int, need_logits: bool = False, reduction: str = "sum"):
    """(anchor, positive, negative) pooled hidden states (B, H) each, and the next-token loss sum on the anchors'
    answers (0 when need_logits is False or no answer token is in the batch; reduction="none": per answer token)."""
    assert batch.pool is not None and batch.num_triplets, "contrastive batches are triplets"
    keep = batch.targets != IGNORE
    use_lm = need_logits and batch.num_target_tokens > 0
    out = model(**batch.inputs, output_hidden_states=True, logits_to_keep=keep if use_lm else 1, use_cache=False)
    states = pooled_states(out.hidden_states[layer], batch.pool).float()
    b = batch.num_triplets
    if use_lm:
        task = _cross_entropy(out.logits, keep, batch.targets, reduction)
    else:
        task = states.sum() * 0.0 if reduction == "sum" else states[:0, 0]
    return states[:b], states[b : 2 * b], states[2 * b :], task


# --------------------------------------------------------------------------------------------- python
@dataclass(frozen=True)
class PythonObjective:
    """objective.kind=python: `function(model, batch) -> {name: Term}`, checked on every call."""

    name: str
    function: Callable

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Term]:
        terms = self.function(model, batch)
        if not isinstance(terms, dict) or not terms or not all(isinstance(t, Term) for t in terms.values()):
            raise ConfigError(f"objective {self.name} returned {type(terms).__name__}: it must return {{name: finetrack.objectives.Term}}")
        for key, term in terms.items():
            if term.unit not in batch.units:
                raise ConfigError(f"objective {self.name}: term '{key}' has unit '{term.unit}'; units of this batch: {sorted(batch.units)}")
            if term.total.dim() != 0:
                raise ConfigError(f"objective {self.name}: term '{key}' is not a scalar (shape {tuple(term.total.shape)}): return its sum")
        return terms


_FIELD = "objective.python.function"


def python_source(function: str) -> Path:
    """The file defining the objective's function (user_code.source_file)."""
    return user_code.source_file(function, _FIELD)


def source_sha256(function: str) -> str:
    """sha256 of the objective's source file: recorded in every checkpoint, checked on resume."""
    return user_code.source_sha256(function, _FIELD)


# ---------------------------------------------------------------------------------------------- build
def build(cfg: ObjectiveConfig) -> Objective:
    """The objective a config names."""
    if cfg.kind == "regression":
        return Regression(cfg.regression)
    if cfg.kind == "contrastive":
        return Contrastive(cfg.contrastive)
    if cfg.kind == "python":
        assert cfg.python is not None
        return PythonObjective(cfg.python.function, user_code.load(cfg.python.function, _FIELD))
    return causal_lm
