"""Is the run still sound: a loss or weights that stopped being finite end it with the step and what to change.

A diverged run must never say "done", nor write a checkpoint of non-finite weights: the newest checkpoint
stays the last good one, to start over from with other settings.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, ConfigError


class Diverged(ConfigError):
    """The loss or the weights stopped being finite: the settings (lr, clipping) or the data must change."""


def stop_if_diverged(step: int, loss: float, params: list[torch.Tensor], accelerator, cfg: Config, run_dir: Path) -> None:
    """Raise Diverged when the loss of `step`, or any of `params` after its update, is not finite. Called every step
    for the loss (free) and at each logged step and before each checkpoint for the weights, so no checkpoint holds
    NaN weights: the newest one stays the last good one."""
    what = None if math.isfinite(loss) else f"the loss is {loss}"
    if params:
        # a sharded parameter is checked on this process's shard (FSDP: a DTensor; ZeRO-3: its ds_tensor, the
        # parameter itself being empty); the reduce below covers the rest
        local = [p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p) for p in params]
        bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).any().float()
        if accelerator.num_processes > 1:  # sharded weights: any process's shard counts
            bad = accelerator.reduce(bad, reduction="sum")
        if what is None and bad.item():
            what = "some weights are not finite (inf or NaN)"
    if what is None:
        return
    good = checkpoint.newest_resumable(run_dir, warn=lambda _: None)
    raise Diverged(
        f"training diverged at step {step}: {what}. The last good checkpoint is "
        + (f"{good.path} (step {good.step})" if good else "none (none was written before this step)")
        + f". Lower train.lr (now {cfg.train.lr}), "
        + ("set train.max_grad_norm (e.g. 1.0), " if cfg.train.max_grad_norm is None else "")
        + "or check the data for extreme rows; then start over with --fresh"
        + (" or continue that checkpoint with --allow-config-change" if good else "")
    )
