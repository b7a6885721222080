"""`resolve()`: every value decided automatically ("auto", step counts, the checkpoint schedule), decided
once, here, with a human-readable reason; written to config.resolved.yaml with the config itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import Config
from .precision import CpuBf16, auto_mixed_precision, slow_bf16_warning, this_cpu
from .schedule import ScheduleError, checkpoint_steps, describe
from .schema import ConfigError, effective_dump

log = logging.getLogger("finetrack")


@dataclass(frozen=True)
class RunShape:
    """The derived numbers a run is laid out by, typed: what train, plan and resume read instead of looking
    values up by name in `Resolved` (whose `values` stay the record written to config.resolved.yaml)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch_size: int  # rows per optimizer step over all processes
    checkpoint_steps: dict[int, tuple[str, ...]]  # step -> the rules that chose it, e.g. {125: ("first_epoch", "per_epoch")}

    def rules_at(self, step: int) -> list[str]:
        """The schedule's rules for a checkpoint at `step` (empty when the schedule has none there)."""
        return list(self.checkpoint_steps.get(step, ()))


@dataclass
class Resolved:
    """Values decided automatically, each with the reason it was chosen; `shape` is set by resolve() (not resolve_model())."""

    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    shape: RunShape | None = None

    def set(self, key: str, value: Any, reason: str) -> None:
        self.values[key] = value
        self.reasons[key] = reason

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass(frozen=True)
class Environment:
    """What resolve() needs to know about the machine and the data."""

    device_type: str  # "cpu" | "cuda" | "mps"
    bf16_supported: bool
    num_processes: int
    num_train_rows: int
    num_sources: int = 1  # data.sources
    steps_before_repeat: int | None = None  # data.on_source_end=stop: the most steps before a mixture source repeats
    cpu_bf16: CpuBf16 = field(default_factory=this_cpu)  # what the CPU offers for bfloat16 (model.mixed_precision: auto)


def resolve_model(cfg: Config, env: Environment) -> tuple[Config, Resolved]:
    """The 'auto' values of the model and data sections (what loading a model for training or eval needs)."""
    res = Resolved()
    cfg = cfg.model_copy(deep=True)
    m, d = cfg.model, cfg.data
    if m.dtype == "auto":
        if m.mixed_precision == "bf16":
            res.set("model.dtype", "float32", "auto: float32 master weights under model.mixed_precision=bf16")
        elif env.device_type == "cuda" and env.bf16_supported:
            res.set("model.dtype", "bfloat16", "auto: the GPU supports bfloat16")
        elif env.device_type == "cpu":
            # bfloat16 weights would also round every optimizer update to bfloat16; bf16 compute is model.mixed_precision
            res.set("model.dtype", "float32", "auto: CPU training: float32 weights (bf16 compute is model.mixed_precision)")
        else:
            res.set("model.dtype", "float32", f"auto: {env.device_type} without bfloat16")
        m.dtype = res["model.dtype"]
    if m.mixed_precision == "auto":
        mode, why = auto_mixed_precision(env.device_type, m.dtype, m.method, env.cpu_bf16)
        res.set("model.mixed_precision", mode, why)
        m.mixed_precision = mode
    elif m.mixed_precision == "bf16" and (slow := slow_bf16_warning(env.device_type, env.cpu_bf16)):
        log.warning("warning: %s", slow)
    if m.method == "qlora" and m.qlora.compute_dtype == "auto":
        res.set("model.qlora.compute_dtype", m.dtype, "auto: same as model.dtype")
        m.qlora.compute_dtype = m.dtype
    if m.attn_implementation == "auto":
        res.set("model.attn_implementation", "sdpa", "auto: PyTorch scaled-dot-product attention, supports padding-free packing")
        m.attn_implementation = "sdpa"
    if d.pack == "auto":
        # transformers builds a block-diagonal mask from restarting position_ids for these kernels;
        # train.run also checks it numerically on the loaded model before step 1.
        ok = m.attn_implementation in ("sdpa", "eager", "flash_attention_2")
        res.set(
            "data.pack",
            ok,
            f"auto: attn_implementation={m.attn_implementation} " + ("supports" if ok else "does not support") + " padding-free packing",
        )
        d.pack = ok
    return cfg, res


def resolve(cfg: Config, env: Environment) -> tuple[Config, Resolved]:
    """Fill every 'auto' value and derive step counts. Returns the concrete config and the reasons."""
    cfg, res = resolve_model(cfg, env)
    m, t = cfg.model, cfg.train
    if t.optimizer.startswith("paged") and env.device_type != "cuda":
        raise ConfigError(
            f"train.optimizer={t.optimizer} pages optimizer state to CPU memory and needs a CUDA GPU; use adamw or adamw_8bit"
        )
    if t.lr == "auto":
        lr = 2e-5 if m.method == "full" else 2e-4
        res.set("train.lr", lr, f"auto: usual starting point for method={m.method}")
        t.lr = lr

    global_batch_rows = t.micro_batch_size * t.grad_accum_steps * env.num_processes
    res.set(
        "global_batch_size",
        global_batch_rows,
        f"micro_batch_size {t.micro_batch_size} x grad_accum_steps {t.grad_accum_steps} x {env.num_processes} process(es)",
    )
    if env.num_train_rows < global_batch_rows:
        raise ConfigError(
            f"only {env.num_train_rows} training rows but one optimizer step needs {global_batch_rows}: "
            "lower train.micro_batch_size or train.grad_accum_steps, or add data"
        )
    # Incomplete trailing batches are dropped so every optimizer step has the same number of rows.
    steps_per_epoch = env.num_train_rows // global_batch_rows
    left = f"the last {env.num_train_rows - steps_per_epoch * global_batch_rows} rows of each shuffled epoch are left out"
    if env.num_sources > 1:  # each source goes through its rows at its own pace (mixture.py): nothing is left out
        left = f"an epoch of a mixture of {env.num_sources} sources: as many rows as they hold together"
    res.set("steps_per_epoch", steps_per_epoch, f"{env.num_train_rows} rows // {global_batch_rows} rows per step ({left})")
    epoch_steps = None if t.num_epochs is None else max(1, math.ceil(t.num_epochs * steps_per_epoch))
    if t.max_steps is not None and (epoch_steps is None or t.max_steps <= epoch_steps):
        total, why = t.max_steps, "train.max_steps" + (f" (before num_epochs {t.num_epochs} = {epoch_steps} steps)" if epoch_steps else "")
    elif epoch_steps is not None:
        total = epoch_steps
        why = f"ceil(num_epochs {t.num_epochs} x steps_per_epoch {steps_per_epoch})" + (
            f" (before max_steps {t.max_steps})" if t.max_steps else ""
        )
    else:
        total, why = steps_per_epoch, "one epoch (neither train.num_epochs nor train.max_steps is set)"
    if env.steps_before_repeat is not None and total > env.steps_before_repeat:
        if env.steps_before_repeat == 0:
            raise ConfigError(
                "data.on_source_end=stop: a data source has fewer rows than its share of one optimizer step; "
                "add rows, lower its weight or the batch size, or set data.on_source_end=repeat"
            )
        total, why = (
            env.steps_before_repeat,
            f"data.on_source_end=stop: a source would repeat after step {env.steps_before_repeat} (before {why})",
        )
    res.set("total_steps", total, why)
    ck = cfg.checkpoint
    try:
        plan = checkpoint_steps(
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            every_steps=ck.every_steps,
            num_per_epoch=ck.num_per_epoch,
            num_first_epoch=ck.num_first_epoch,
            steps=ck.steps,
            num_log_spaced=ck.num_log_spaced,
        )
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    res.set("checkpoint_steps", {s: "+".join(rules) for s, rules in plan.items()}, describe(plan, steps_per_epoch))
    if t.warmup_steps is None:
        warm = round(t.warmup_ratio * total)
        res.set("warmup_steps", warm, f"round(warmup_ratio {t.warmup_ratio} x total_steps {total})")
    elif t.warmup_steps > total:
        # A warning, not an error: a short trial of a long config (plan --measure, a smoke copy) is legitimate.
        reached = t.lr * total / t.warmup_steps  # optim.lr_at: linear warmup, the run ends inside it
        why = (
            f"train.warmup_steps={t.warmup_steps} is longer than the run ({total} steps): the learning rate only reaches {reached:.3g} at the last "
            f"step, the peak {t.lr:g} is never reached; lower train.warmup_steps if that is not intended"
        )
        log.warning("warning: %s", why)
        res.set("warmup_steps", t.warmup_steps, why)
    else:
        res.set("warmup_steps", t.warmup_steps, "train.warmup_steps")
    res.shape = RunShape(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=res["warmup_steps"],
        global_batch_size=global_batch_rows,
        checkpoint_steps={s: tuple(rules) for s, rules in plan.items()},
    )
    return cfg, res


def resolved_yaml(cfg: Config, res: Resolved) -> str:
    """The text of config.resolved.yaml: the concrete config plus derived values with their reasons."""
    tree = effective_dump(cfg)
    tree["resolved"] = {k: {"value": v, "reason": res.reasons[k]} for k, v in res.values.items()}
    return yaml.safe_dump(tree, sort_keys=False, width=120)


def config_hash(cfg: Config) -> str:
    """A short stable hash of the concrete config (for checkpoint meta and run identity)."""
    blob = json.dumps(effective_dump(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
