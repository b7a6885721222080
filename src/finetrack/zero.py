"""DeepSpeed ZeRO stages 1 and 2 through accelerate, with checkpoints that stay what one process writes.

`accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml -m finetrack train CONFIG` partitions the
optimizer state (stage 1) and the gradients (stage 2) over the processes; every process keeps the whole model, so
sampling, validation and the weights in a checkpoint are those of data parallel. What ZeRO changes for the loop:

- its engine reduces, clips and steps: the loop marks the accumulation boundary itself (one engine step per optimizer
  step, whatever the micro-batch count), passes the loss unscaled (the objective is already normalized over the whole
  step), and DeepSpeed clips at `train.max_grad_norm` and reports the norm before clipping;
- DeepSpeed saves its partitions with torch.save (pickle). finetrack writes the optimizer state in the layout
  `torch.optim.Optimizer.state_dict()` has in one process instead: each parameter's full state, assembled from the
  partitions through DeepSpeed's own map of where each parameter's fragment lies (`param._hp_mapping`, which its
  `safe_get_full_optimizer_state` reads too; that function is not used since it misses every parameter group after the
  first: DeepSpeed links the groups' states after stepping the first), keyed by the parameter's position. On resume
  each process copies its fragment of every parameter back into its partition, so a checkpoint does not tell how many
  processes wrote it, nor whether DeepSpeed did.

On CPU, accelerate ignores a DeepSpeed launch (its state.py sets DeepSpeed up on GPU-type devices only) while DeepSpeed
runs there on gloo: finetrack selects accelerate's own DeepSpeed plugin itself, so the same command works, and is
tested, on a CPU machine.

Refused, each with its reason: ZeRO-3 (parameters partitioned: every forward outside training, the checkpoint's weights
and loading would need gathering; FSDP2 shards parameters and is supported), offloading (DeepSpeed's CPU Adam is a
compiled extension, untested here), DeepSpeed's fp16/bf16 engines (finetrack's precision is `model.dtype` and
`model.mixed_precision`), and QLoRA.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig

VARIABLE = "ACCELERATE_USE_DEEPSPEED"  # what `accelerate launch` sets for a DeepSpeed config
SUPPORTED_STAGES = (1, 2)


def requested() -> bool:
    """Did the launcher ask for DeepSpeed (`accelerate launch --use_deepspeed` or `distributed_type: DEEPSPEED`)?"""
    return os.environ.get(VARIABLE, "false").lower() in ("1", "true", "yes")


def check_launch(method: str) -> None:
    """Before accelerate starts: what the launcher's variables already tell (stage, offloading, method)."""
    if not requested():
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    _check_stage(int(stage) if stage.isdigit() else -1)
    for kind in ("OPTIMIZER", "PARAM"):
        _check_offload(kind.lower(), os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind}_DEVICE", "none"))
    if method == "qlora":
        raise ConfigError("model.method qlora under DeepSpeed: not supported; use lora or full, or launch without DeepSpeed")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("accelerate launch with DeepSpeed: deepspeed is not installed: pip install 'finetrack[deepspeed]'")


def _check_stage(stage: int) -> None:
    if stage in SUPPORTED_STAGES:
        return
    if stage == 3:
        raise ConfigError(
            "DeepSpeed ZeRO stage 3: not supported (parameters partitioned over the processes); use zero_stage 1 or 2, "
            "or shard parameters with FSDP2: accelerate launch --config_file examples/accelerate/fsdp2.yaml"
        )
    raise ConfigError(f"DeepSpeed ZeRO stage {stage}: not supported; set zero_stage: 1 or 2 in the accelerate config")


def _check_offload(what: str, device: Any) -> None:
    if device not in (None, "none", "auto"):
        raise ConfigError(
            f"DeepSpeed offload_{what}_device: {device}: not supported (DeepSpeed's CPU Adam is a compiled extension "
            f"finetrack does not test); set offload_{what}_device: none in the accelerate config"
        )


def set_up(accelerator: Any, train: TrainConfig) -> None:
    """Select accelerate's DeepSpeed plugin where accelerate itself would not (several CPU processes), check the
    DeepSpeed config it holds, and fill in what finetrack's config decides: micro-batch, accumulation, clipping."""
    from accelerate.utils import DistributedType

    if not requested():
        return
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        _select_plugin(accelerator)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError("accelerate launch with DeepSpeed needs several processes: add --num_processes N (N > 1)")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    _check_stage(int(zero.get("stage", 0)))
    for what in ("optimizer", "param"):
        _check_offload(what, (zero.get(f"offload_{what}") or {}).get("device"))
    for engine in ("fp16", "bf16"):
        if (ds.get(engine) or {}).get("enabled") in (True, "true"):
            raise ConfigError(
                f"DeepSpeed's {engine} engine: not supported; set mixed_precision: 'no' in the accelerate config "
                "(finetrack's precision is model.dtype and model.mixed_precision: bf16 autocast over float32 weights)"
            )
    ours = {  # DeepSpeed's key: (finetrack's field, its value)
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", train.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", train.grad_accum_steps),
        "gradient_clipping": ("train.max_grad_norm", float(train.max_grad_norm or 0.0)),  # 0.0: no clipping (null)
    }
    for key, (field, value) in ours.items():
        theirs = ds.get(key, "auto")
        if theirs not in ("auto", None) and not _same_number(theirs, value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}: {theirs}, but {field} gives {value}: "
                f"remove {key} from the accelerate / DeepSpeed config ({field} decides it)"
            )
        ds[key] = value
    ds["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps * accelerator.num_processes
    accelerator.gradient_accumulation_steps = train.grad_accum_steps  # what accelerate compares DeepSpeed's with


def _same_number(a: Any, b: float) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _select_plugin(accelerator: Any) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher set
    plugin.set_mixed_precision(accelerator.mixed_precision)  # as accelerate does on GPUs (a bf16 engine is refused)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    # AcceleratorState copies PartialState's fields each time it is constructed (accelerate's state.py does the same)
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    plugin.select(_from_accelerator_state=True)
    accelerator.deepspeed_engine_wrapped = None


def stage(accelerator: Any) -> int | None:
    """This run's ZeRO stage (None: not DeepSpeed)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def engine_of(model: nn.Module) -> Any | None:
    """The DeepSpeed engine accelerate prepared `model` into (None: not DeepSpeed)."""
    ds = sys.modules.get("deepspeed")
    return model if ds is not None and isinstance(model, ds.DeepSpeedEngine) else None


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward. The loss is already normalized over the whole step (not divided by the accumulation
    count again); the last micro-batch is the accumulation boundary, where ZeRO reduces what the others accumulated."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine: Any) -> float:
    """The optimizer step: DeepSpeed clips at gradient_clipping (train.max_grad_norm), steps and clears the gradients.
    Returns the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _zero_optimizer(engine: Any) -> Any:
    return engine.optimizer  # DeepSpeedZeroOptimizer: bit16_groups (the model's parameters), the flat partitions


def gather_optimizer_state(engine: Any, positions: list[torch.Tensor]) -> dict[str, Any]:
    """Every process calls this: the optimizer's full state, keyed by parameter position as `optimizer.state_dict()` is
    in one process (`positions`: the parameters in the order the optimizer was built with), on the main process's CPU
    ({} on the others). Each process contributes its fragment of every parameter; a sum over the processes assembles it
    (the fragments do not overlap)."""
    zo = _zero_optimizer(engine)
    base = zo.optimizer
    index = {id(p): i for i, p in enumerate(positions)}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for g, group in enumerate(base.param_groups):
        flat = zo.single_partition_of_fp32_groups[g]
        flat_state = base.state.get(flat, {})
        members = [index[id(p)] for p in zo.bit16_groups[g]]
        for p, i in zip(zo.bit16_groups[g], members):
            state[i] = {}
            for key, value in flat_state.items():
                if not (torch.is_tensor(value) and value.shape == flat.shape):  # shared by the partition (step)
                    state[i][key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
                    continue
                full = torch.zeros(p.numel(), dtype=value.dtype, device=value.device)
                if p._hp_mapping is not None:  # this process's fragment of p (none: p lies in another's partition)
                    lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.get_hp_fragment_address()
                    full.narrow(0, lp.start, lp.numel).copy_(value.narrow(0, hp.start, hp.numel))
                torch.distributed.all_reduce(full, group=zo.real_dp_process_group[g])
                state[i][key] = full.view(p.shape).cpu()
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": sorted(members)})
    if engine.global_rank != 0:
        return {}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_optimizer_state(engine: Any, positions: list[torch.Tensor], saved: dict[str, Any]) -> None:
    """Every process calls this with the full state (as gather_optimizer_state returned it): each copies its fragment
    of every parameter into its partition, through DeepSpeed's fragment addresses."""
    zo = _zero_optimizer(engine)
    base = zo.optimizer
    index = {id(p): i for i, p in enumerate(positions)}
    if len(saved["state"]) > len(positions) or len(saved["param_groups"]) != len(base.param_groups):
        raise ValueError(f"the saved optimizer state does not fit the {len(positions)} parameters being trained")
    for g, group in enumerate(base.param_groups):
        flat = zo.single_partition_of_fp32_groups[g]
        flat_state: dict[str, Any] = {}
        for p in zo.bit16_groups[g]:
            for key, value in saved["state"].get(index[id(p)], {}).items():
                if not (torch.is_tensor(value) and value.dim() and value.numel() == p.numel()):
                    flat_state.setdefault(key, value.clone() if torch.is_tensor(value) else value)
                    continue
                buffer = flat_state.setdefault(key, torch.zeros_like(flat))
                if p._hp_mapping is not None:  # this process's fragment of p (none: p lies in another's partition)
                    lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.get_hp_fragment_address()
                    buffer.narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))
        if flat_state:
            base.state[flat] = flat_state
        group.update({k: v for k, v in saved["param_groups"][g].items() if k != "params"})
