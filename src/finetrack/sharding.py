"""Sharded data parallel: accelerate's FSDP2 plugin, and checkpoints that stay what one process writes.

`accelerate launch --use_fsdp --fsdp_version 2 ...` (or an accelerate config with `distributed_type: FSDP`) shards
parameters, gradients and optimizer state over the processes. A checkpoint must still be the self-describing,
pickle-free one a single process writes (torch.distributed.checkpoint's sharded layout keeps pickled metadata), so
on save every process takes part in gathering the full tensors to the main process, which writes:

- the weights as their own library saves them (a PEFT adapter: only the trainable tensors are gathered; a full
  fine-tune: every tensor, consolidated into model.safetensors);
- the optimizer state in the layout `torch.optim.Optimizer.state_dict()` has in one process (state keyed by the
  parameter's position), so a checkpoint does not tell how many processes wrote it.

On resume the weights load into the model before it is sharded (as without FSDP) and the optimizer state is
scattered back to the shards (`set_optimizer_state_dict`).

accelerate sets FSDP up only on GPU-type devices (its state.py ignores the plugin for MULTI_CPU), while torch's
FSDP2 runs on CPU with gloo: there finetrack selects accelerate's own plugin itself, so the same launch command
works, and is tested, on a CPU machine.

Every process must run the same forwards while the model is sharded (each layer all-gathers its parameters):
sampling and validation run on every process with the same inputs, the main process writing (`gathered`, `reshard`),
and the held-out loss gives every process the same number of micro-batches.

DeepSpeed ZeRO (stages 1-3) is zero.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import zero

FSDP_VARIABLE = "ACCELERATE_USE_FSDP"  # what `accelerate launch` sets for an FSDP config


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested() -> bool:
    """Did the launcher ask for FSDP (`accelerate launch --use_fsdp` or a config with `distributed_type: FSDP`)?"""
    return _flag(FSDP_VARIABLE)


def check_launch(method: str) -> None:
    """Refuse, before accelerate starts, a sharded launch finetrack cannot checkpoint pickle-free: FSDP version 1, and
    QLoRA under FSDP (bitsandbytes' 4-bit weights need their own storage type to be sharded)."""
    from .config import ConfigError

    if not requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate launch with FSDP version {version}: finetrack supports FSDP2 only; "
            "add `--fsdp_version 2` (or `fsdp_version: 2` under fsdp_config in the accelerate config)"
        )
    if method == "qlora":
        raise ConfigError("model.method qlora under FSDP: not supported; use lora or full with FSDP, or launch without --use_fsdp")


def set_up(accelerator: Any) -> None:
    """Select accelerate's FSDP2 plugin where accelerate itself would not: several CPU processes (see the module's
    docstring). The plugin reads the FSDP_* variables `accelerate launch` set, as it does on GPUs."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if not requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies PartialState's fields each time it is constructed (accelerate's state.py does the same)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Any) -> bool:
    """Is the model sharded over the processes (FSDP2)?"""
    return bool(getattr(accelerator, "is_fsdp2", False))


def in_step(accelerator: Any) -> bool:
    """Must every process run the same forwards (each one gathers parameters from the others)? FSDP2 and ZeRO-3."""
    return is_sharded(accelerator) or zero.stage(accelerator) == 3


def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_weights(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Every process calls this: the full tensors of `model` on the main process's CPU ({} on the others), named as
    `model.state_dict()` names them. `trainable_only`: the adapter and head, not the frozen base."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only))


def _positions(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order the optimizer holds them: position i in a one-process state_dict()."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every process calls this: the optimizer's full state on the main process ({} on the others), keyed by parameter
    position as `optimizer.state_dict()` is in one process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, _bare(optimizer), options=_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_positions(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every process calls this with the full state (as gather_optimizer_state returned it): each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _positions(model, optimizer)
    try:
        full = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
        }
    except IndexError:
        raise ValueError(f"the saved optimizer state holds more parameters than the {len(names)} being trained") from None
    set_optimizer_state_dict(model, _bare(optimizer), full, options=_options())


def _bare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Forwards outside training that may not enter through the sharded root: generate() calls the transformers model
    inside a PEFT model or a head, so the root's own parameters (those accelerate leaves in no unit of their own) are
    gathered for the duration, and registered sharded again after. Each decoder layer still gathers its own in its
    forward, on every process in step. A model that is not sharded passes through."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # FSDP2 takes the first sharded module to run forward as the root of its tree (torch's fully_shard state): at
    # step 0 no training forward has run yet, and the inner model's would make it a root of its own
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        reshard(model)


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again on every sharded module: a forward outside training (sampling, validation,
    the held-out loss) leaves the root's parameters gathered (FSDP2 reshards the root after backward only), and a
    checkpoint names parameters as the optimizer holds them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
