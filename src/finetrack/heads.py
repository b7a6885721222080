"""The regression head: a linear layer or a small MLP on a pooled hidden state, and `WithHead`, the language model and
its head as one module (one forward, so DDP / FSDP see the head's parameters like any other).

A checkpoint stores the head beside the model's weights: `head.safetensors` (its tensors, the target statistics
included) and `head.json` (what builds it again: sizes, activation, the layer and pooling it reads). Resume, eval and
export load both from there.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from .config import HeadConfig, ObjectiveConfig
from .data_files import DataError

log = logging.getLogger("finetrack")

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
HEAD_FORMAT = "finetrack-head/1"
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Head(nn.Module):
    """hidden state (N, H) -> prediction (N,), in normalized target units; `unnormalized` maps back to the data's."""

    def __init__(self, hidden_size: int, cfg: HeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        width = hidden_size
        for size in cfg.hidden_sizes:
            layers += [nn.Linear(width, size), _ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)
        # the training targets' statistics (objective.regression.normalize_targets): saved with the head
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled.float()).squeeze(-1)

    def normalized(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.target_mean) / self.target_std

    def unnormalized(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions * self.target_std + self.target_mean


class WithHead(nn.Module):
    """The language model and the regression head reading its hidden state at `layer`, pooled by a batch's weights."""

    def __init__(self, lm: nn.Module, head: Head, layer: int) -> None:
        super().__init__()
        self.lm, self.head, self.layer = lm, head, layer

    def forward(
        self, pool: torch.Tensor, logits_to_keep: torch.Tensor | int = 1, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits where `logits_to_keep` says, the head's prediction at each pool row (N,), normalized)."""
        out = self.lm(**inputs, output_hidden_states=True, logits_to_keep=logits_to_keep, use_cache=False)
        return out.logits, self.head(pooled_states(out.hidden_states[self.layer], pool))


def pooled_states(hidden: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(N, H): each pool row's weighted average of the hidden states (B, T, H) of the positions it weighs."""
    return pool.to(hidden.dtype) @ hidden.flatten(0, 1)


def language_model(model: nn.Module) -> nn.Module:
    """The language model of `model`: what generates, and what save_pretrained writes."""
    return model.lm if isinstance(model, WithHead) else model


def attach(model: nn.Module, objective: ObjectiveConfig, train_values: list[float], seed: int = 0) -> nn.Module:
    """The model as the objective trains it: with a new regression head (on the model's device, float32) for
    kind=regression, else unchanged. normalize_targets takes the statistics of `train_values`. The head's initial
    weights depend on `seed` alone (not on what else drew random numbers before), and draw nothing from the random
    stream training goes on with."""
    if objective.kind != "regression":
        return model
    r = objective.regression
    lm = model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(lm.config.hidden_size, r.head)
    head = head.to(next(lm.parameters()).device)
    if r.normalize_targets and train_values:
        values = torch.tensor(train_values, dtype=torch.float64)
        mean, std = float(values.mean()), float(values.std(correction=0)) if len(values) > 1 else 1.0
        if not (math.isfinite(mean) and math.isfinite(std)):  # targets near 1e308: the loss was NaN, blamed on train.lr
            raise DataError(
                f"the regression targets ({r.target_field}) range from {min(train_values):.3g} to {max(train_values):.3g}: their mean "
                "and spread overflow float64; rescale them in the data (e.g. divide by a power of ten)"
            )
        if std == 0:
            log.warning("warning: every training target (%s) is %g: the head can only learn that constant", r.target_field, mean)
        head.target_mean.fill_(mean)
        head.target_std.fill_(max(std, 1e-6))
    if r.freeze_backbone:
        lm.requires_grad_(False)
    return WithHead(lm, head, r.layer)


def head_config(model: WithHead, objective: ObjectiveConfig) -> dict:
    r = objective.regression
    return {
        "format": HEAD_FORMAT,
        "hidden_size": model.lm.config.hidden_size,
        "layer": r.layer,
        "level": r.level,
        "pool": r.pool,
        "marker": r.marker,
        "step_separator": r.step_separator,
        "head": r.head.model_dump(),
        "normalize_targets": r.normalize_targets,
        "target_mean": float(model.head.target_mean),
        "target_std": float(model.head.target_std),
    }


def save_head(model: WithHead, folder: Path, objective: ObjectiveConfig, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """head.safetensors (the head's tensors, or `tensors` gathered from a sharded model) and head.json."""
    from safetensors.torch import save_file

    tensors = model.head.state_dict() if tensors is None else tensors
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(json.dumps(head_config(model, objective), indent=2) + "\n")


def load_head(head: Head, folder: Path) -> None:
    """The head tensors a checkpoint holds, into a head built from the same config (resume, eval)."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    path = Path(folder) / HEAD_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {HEAD_WEIGHTS}: this checkpoint was not trained with a regression head")
    state = load_file(str(path))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: does not fit the configured head ({str(e).splitlines()[0]}); check objective.regression.head"
        ) from None


def read_head(folder: Path) -> tuple[Head, int]:
    """The trained head a checkpoint holds, built from its head.json and loaded from head.safetensors (float32, on the
    CPU), and the hidden layer it reads: eval rebuilds the model as training had it without the run's objective config."""
    from .checkpoint import CheckpointError

    path = Path(folder) / HEAD_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {HEAD_CONFIG}: this checkpoint was not trained with a regression head")
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != HEAD_FORMAT:
            raise ValueError(f"format {saved.get('format')!r}, not {HEAD_FORMAT}")
        head = Head(int(saved["hidden_size"]), HeadConfig(**saved["head"]))
        layer = int(saved["layer"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a finetrack head description ({' '.join(str(e).split())[:160]})") from None
    load_head(head, folder)
    return head, layer
