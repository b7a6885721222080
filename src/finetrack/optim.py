"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so resuming needs no scheduler state and the
value logged is exactly the value used.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from .config import ConfigError, TrainConfig


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate for 1-based optimizer step `step`.

    Warmup rises linearly to the peak at step `warmup_steps`; the first step after warmup uses the
    peak, and decay approaches 0 without reaching it (no step is spent at lr 0).
    """
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup_steps - 1) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return peak_lr * (1.0 - progress)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_optimizer(cfg: TrainConfig) -> None:
    """Before the model loads: the configured optimizer's package is installed (paged ones also need CUDA:
    config.resolve checks that, knowing the device)."""
    if cfg.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={cfg.optimizer} needs bitsandbytes: pip install bitsandbytes, or set train.optimizer=adamw")


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (ndim < 2)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.method and model.lora.target_modules")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw":
        # On CPU torch's default AdamW is the per-parameter loop (foreach is the default on CUDA only); the fused
        # kernel trained a full fine-tune 17-20% faster with the same losses (benchmarks/cpu_bf16.py --fused-adamw).
        # float32 parameters only, the kernel's tested ground here (FSDP shards too: tests/test_fsdp.py).
        fused = all(p.device.type == "cpu" and p.dtype == torch.float32 for _, p in params)
        return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={cfg.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}[
        cfg.optimizer
    ]
    return cls(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
