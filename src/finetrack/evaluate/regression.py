"""The `regression` suite: how well the run's regression head predicts held-out targets, at one checkpoint.

Predictions come from `objectives.predict` (the head's normalization undone), so every metric is in the data's
units, whatever objective.regression.normalize_targets says. The metrics are computed here with numpy (no scipy:
it is not a dependency), Spearman from ranks with ties averaged as scipy.stats.spearmanr does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..batches import batch_builder, micro_batches
from ..config import Config
from .spec import RegressionSuite

METRICS = ("mse", "mae", "r2", "pearson", "spearman")


def run(suite: RegressionSuite, model: nn.Module, tokenizer, rows: list, cfg: Config, accelerator) -> dict:
    """{'metrics': {mse, mae, r2, pearson, spearman}, 'counts': {rows, targets}} of `model` (a heads.WithHead) on `rows`.

    Every process scores every row: the metrics need all predictions together, and eval runs in one process."""
    from .. import objectives
    from ..heads import language_model

    make_batch = batch_builder(tokenizer.pad_token_id, bool(cfg.data.pack), cfg.data.pack_row_tokens, language_model(model))
    was_training = model.training
    model.eval()  # the head's dropout off, as in training's held-out loss
    predicted, targets = [], []
    try:
        for chunk in micro_batches(rows, list(range(len(rows))), suite.micro_batch_size):
            p, t = objectives.predict(model, make_batch(chunk).to(accelerator.device))
            predicted.append(p.cpu())
            targets.append(t.cpu())
    finally:
        model.train(was_training)
    p = torch.cat(predicted).double().numpy() if predicted else np.zeros(0)
    t = torch.cat(targets).double().numpy() if targets else np.zeros(0)
    return {"metrics": regression_metrics(p, t), "counts": {"rows": len(rows), "targets": len(t)}}


def regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict[str, float | None]:
    """mse, mae, r2 (1 - residual / total sum of squares), Pearson and Spearman correlation of predictions and targets.

    A metric that is undefined on these values is None (written as null; the gate and report say "no value"), not
    NaN: r2 when the targets are all equal, a correlation when either side is constant, everything on no targets."""
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if predicted.shape != target.shape or predicted.ndim != 1:
        raise ValueError(f"predictions {predicted.shape} and targets {target.shape} must be two vectors of one length")
    if not len(target):
        return dict.fromkeys(METRICS)
    error = predicted - target
    total = float(((target - target.mean()) ** 2).sum())
    return {
        "mse": float((error**2).mean()),
        "mae": float(np.abs(error).mean()),
        "r2": 1.0 - float((error**2).sum()) / total if total > 0 else None,
        "pearson": pearson(predicted, target),
        "spearman": spearman(predicted, target),
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either vector is constant (or shorter than 2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    scale = math.sqrt(float((dx**2).sum()) * float((dy**2).sum()))
    if scale == 0:
        return None
    return max(-1.0, min(1.0, float((dx * dy).sum()) / scale))  # round-off must not leave [-1, 1]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the ranks, tied values sharing their average rank."""
    return pearson(average_ranks(x), average_ranks(y))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1; equal values get the mean of the ranks they span ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]] if len(values) else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]  # one past each group's last position
    group_rank = (starts + ends - 1) / 2 + 1  # the mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = group_rank[np.cumsum(starts_group) - 1]
    return ranks
