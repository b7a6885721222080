"""DeepSpeed ZeRO (stages 1, 2 and 3) through accelerate, with checkpoints that stay what one process writes.

`accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml -m finetrack train CONFIG` partitions the
optimizer state (stage 1), the gradients (stage 2) and the parameters (stage 3, deepspeed_zero3.yaml) over the
processes. What ZeRO changes for the loop:

- its engine reduces, clips and steps: the loop marks the accumulation boundary itself (one engine step per optimizer
  step, whatever the micro-batch count), passes the loss unscaled (the objective is already normalized over the whole
  step), and DeepSpeed clips at `train.max_grad_norm` and reports the norm before clipping;
- DeepSpeed saves its partitions with torch.save (pickle). finetrack writes the optimizer state in the layout
  `torch.optim.Optimizer.state_dict()` has in one process instead: each parameter's full state, assembled from the
  partitions (stages 1-2: through DeepSpeed's map of where each parameter's fragment lies, `param._hp_mapping`, which
  its `safe_get_full_optimizer_state` reads too; that function is not used since it misses every parameter group
  after the first: DeepSpeed links the groups' states after stepping the first; stage 3: its own gather), keyed by the
  parameter's position. On resume each process copies its fragment of every parameter back into its partition, so a
  checkpoint does not tell how many processes wrote it, nor whether DeepSpeed did;
- stage 3: the model is built and loaded whole, as in any run, and partitioned when accelerate prepares it; every
  forward gathers the parameters of each layer from all processes, so sampling, validation and the held-out loss run
  on every process in step (as under FSDP2), and a checkpoint gathers the weights (only the trainable ones for LoRA)
  to the main process, which writes them. Stages 1-2 keep the whole model on every process: data parallel's paths.

On CPU, accelerate ignores a DeepSpeed launch (its state.py sets DeepSpeed up on GPU-type devices only) while DeepSpeed
runs there on gloo: finetrack selects accelerate's own DeepSpeed plugin itself, so the same command works, and is
tested, on a CPU machine.

Refused, each with its reason: offloading (DeepSpeed's CPU Adam is a compiled extension, untested here), DeepSpeed's
fp16/bf16 engines (finetrack's precision is `model.dtype` and `model.mixed_precision`), and QLoRA.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig

VARIABLE = "ACCELERATE_USE_DEEPSPEED"  # what `accelerate launch` sets for a DeepSpeed config
PARTITIONED = {1: "optimizer state", 2: "gradients and optimizer state", 3: "parameters, gradients and optimizer state"}


def requested() -> bool:
    """Did the launcher ask for DeepSpeed (`accelerate launch --use_deepspeed` or `distributed_type: DEEPSPEED`)?"""
    return os.environ.get(VARIABLE, "false").lower() in ("1", "true", "yes")


def check_launch(method: str, num_processes: int) -> None:
    """Before accelerate starts: what the launcher's variables already tell (stage, offloading, method, processes)."""
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
    if num_processes < 2 and not torch.cuda.is_available():  # DeepSpeed over one CPU process: nothing to partition
        raise ConfigError("accelerate launch with DeepSpeed needs several processes on CPU: add --num_processes N (N > 1)")


def _check_stage(stage: int) -> None:
    if stage not in PARTITIONED:
        raise ConfigError(f"DeepSpeed ZeRO stage {stage}: not supported; set zero_stage: 1, 2 or 3 in the accelerate config")


def _check_offload(what: str, device: Any) -> None:
    if device not in (None, "none", "auto"):
        raise ConfigError(
            f"DeepSpeed offload_{what}_device: {device}: not supported (DeepSpeed's CPU Adam is a compiled extension "
            f"finetrack does not test); set offload_{what}_device: none in the accelerate config"
        )


def set_up(accelerator: Any, train: TrainConfig) -> None:
    """Select accelerate's DeepSpeed plugin where accelerate itself would not (several CPU processes), check the
    DeepSpeed config it holds, and fill in what finetrack's config decides: micro-batch, accumulation, clipping.
    Called before the model is built."""
    from accelerate.utils import DistributedType

    if not requested():
        return
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        _select_plugin(accelerator)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError("accelerate launch with DeepSpeed: accelerate did not set DeepSpeed up; launch with --num_processes N (N > 1)")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero_config = ds.get("zero_optimization", {})
    _check_stage(int(zero_config.get("stage", 0)))
    for what in ("optimizer", "param"):
        _check_offload(what, (zero_config.get(f"offload_{what}") or {}).get("device"))
    for engine in ("fp16", "bf16"):
        if (ds.get(engine) or {}).get("enabled") in (True, "true"):
            raise ConfigError(
                f"DeepSpeed's {engine} engine: not supported; set mixed_precision: 'no' in the accelerate config "
                "(finetrack's precision is model.dtype and model.mixed_precision: bf16 autocast over float32 weights)"
            )
    for section, field in (("optimizer", "train.optimizer"), ("scheduler", "train.lr_schedule")):
        if section in ds:
            raise ConfigError(
                f"the DeepSpeed config has {'an' if section == 'optimizer' else 'a'} `{section}` section: not supported; remove it ({field} decides it, "
                "and finetrack's optimizer runs inside DeepSpeed's ZeRO optimizer)"
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
    if int(zero_config.get("stage", 0)) == 3:
        # the model is built whole and loaded as in any run (a resume loads its checkpoint into it), then partitioned
        # when accelerate prepares it: transformers must not build it partitioned (deepspeed.zero.Init), which it
        # does while accelerate's plugin is registered with it
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
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


@dataclass(frozen=True)
class _Partition:
    """What one process holds of one group of parameters: the float32 partition the torch optimizer steps (its state
    has the partition's shape) and the model's parameters it holds fragments of."""

    group: int  # the optimizer's param group
    flat: torch.Tensor
    params: list[nn.Parameter]


def _partitions(zo: Any) -> list[_Partition]:
    """The partitions of DeepSpeed's ZeRO optimizer (stage 3 splits each param group into sub-groups)."""
    if hasattr(zo, "fp32_partitioned_groups_flat"):  # stage 3
        return [_Partition(zo.sub_group_to_group_id[s], flat, zo.fp16_groups[s]) for s, flat in enumerate(zo.fp32_partitioned_groups_flat)]
    return [_Partition(g, flat, zo.bit16_groups[g]) for g, flat in enumerate(zo.single_partition_of_fp32_groups)]


def _per_parameter(value: Any, p: nn.Parameter) -> bool:
    """Is a saved state entry p's own tensor (exp_avg, ...), not one the partition shares (step)?"""
    numel = int(getattr(p, "ds_numel", p.numel()))  # stage 3: the whole parameter's count (p itself is empty)
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == numel


def _full(zo: Any, part: _Partition, p: nn.Parameter, key: str) -> torch.Tensor:
    """Every process calls this: the whole of p's optimizer state `key`, assembled from the partitions."""
    if hasattr(p, "ds_id"):  # stage 3: DeepSpeed gathers it
        return zo.get_full_hp_param(p, key).detach().reshape(p.ds_shape)
    value = zo.optimizer.state[part.flat][key]
    full = torch.zeros(p.numel(), dtype=value.dtype, device=value.device)
    if p._hp_mapping is not None:  # this process's fragment of p (none: p lies in another's partition)
        lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.get_hp_fragment_address()
        full.narrow(0, lp.start, lp.numel).copy_(value.narrow(0, hp.start, hp.numel))
    torch.distributed.all_reduce(full, group=zo.real_dp_process_group[part.group])  # the fragments do not overlap
    return full.view(p.shape)


def _set_full(zo: Any, part: _Partition, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Copy this process's fragment of `value` (p's whole state `key`) into its partition's state."""
    if hasattr(p, "ds_id"):  # stage 3
        zo.set_full_hp_param(value.to(part.flat.device), p, key)
        return
    if p._hp_mapping is not None:
        lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.get_hp_fragment_address()
        zo.optimizer.state[part.flat][key].narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))


def gather_optimizer_state(engine: Any, positions: list[torch.Tensor]) -> dict[str, Any]:
    """Every process calls this: the optimizer's full state, keyed by parameter position as `optimizer.state_dict()` is
    in one process (`positions`: the parameters in the order the optimizer was built with), on the main process's CPU
    ({} on the others)."""
    zo = engine.optimizer  # DeepSpeed's ZeRO optimizer; zo.optimizer is the torch one, stepping the partitions
    index = {id(p): i for i, p in enumerate(positions)}
    state: dict[int, dict[str, Any]] = {}
    members: dict[int, list[int]] = {}
    for part in _partitions(zo):
        flat_state = zo.optimizer.state.get(part.flat, {})
        for p in part.params:
            i = index[id(p)]
            members.setdefault(part.group, []).append(i)
            state[i] = {}
            for key, value in flat_state.items():
                partitioned = torch.is_tensor(value) and value.shape == part.flat.shape
                state[i][key] = _full(zo, part, p, key).cpu() if partitioned else _copy(value)  # else shared: step
    if engine.global_rank != 0:
        return {}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": sorted(members.get(g, []))}
        for g, group in enumerate(zo.optimizer.param_groups)
    ]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _copy(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def load_optimizer_state(engine: Any, positions: list[torch.Tensor], saved: dict[str, Any]) -> None:
    """Every process calls this with the full state (as gather_optimizer_state returned it): each copies its fragment
    of every parameter into its partitions."""
    zo = engine.optimizer
    index = {id(p): i for i, p in enumerate(positions)}
    if len(saved["state"]) > len(positions) or len(saved["param_groups"]) != len(zo.optimizer.param_groups):
        raise ValueError(f"the saved optimizer state does not fit the {len(positions)} parameters being trained")
    for part in _partitions(zo):
        saved_of = {id(p): saved["state"].get(index[id(p)], {}) for p in part.params}
        # the partition's state first (torch creates it at the first step): zeros where no parameter lies, shared values
        flat_state: dict[str, Any] = {}
        for p in part.params:
            for key, value in saved_of[id(p)].items():
                flat_state.setdefault(key, torch.zeros_like(part.flat) if _per_parameter(value, p) else _copy(value).to(part.flat.device))
        if not flat_state:
            continue
        zo.optimizer.state[part.flat] = flat_state
        for p in part.params:
            for key, value in saved_of[id(p)].items():
                if _per_parameter(value, p):
                    _set_full(zo, part, p, key, value)
    for group, was in zip(zo.optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in was.items() if k != "params"})


def gather_weights(model: nn.Module, trainable_only: bool, main: bool) -> dict[str, torch.Tensor]:
    """ZeRO-3, every process calls this: the full tensors of `model` (unwrapped) on the main process's CPU ({} on the
    others), named as `model.state_dict()` names them. `trainable_only`: the adapter and head, not the frozen base."""
    import deepspeed

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not main:
            return {}
        return {k: _copy(v) for k, v in model.state_dict().items() if k in names or not trainable_only}
