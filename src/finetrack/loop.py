"""The loop: `fit()` runs optimizer steps with `train_step()` over a typed `TrainState`; train.run builds what it needs.

Plain functions over small typed objects (no Trainer class): `Loop` holds the parts, `TrainState` the progress a
checkpoint stores, `RunShape` the step counts and the checkpoint schedule.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import processes, sharding, zero
from .batches import Batch, micro_batches, step_rows
from .callbacks import CallbackError, Callbacks, Requests, RunView
from .config import Config, RunShape
from .data import Example
from .health import stop_if_diverged
from .interrupt import StopFlag
from .metrics import MetricsLog, peak_memory_mib
from .mixture import Mixture
from .objectives import Objective, Term, logged, weighted_loss
from .optim import lr_at, set_lr
from .rundir import checkpoint_dir
from .train_state import TrainState
from .validation import Validator, decide

# step, state, rules, metrics, meta -> folder: writes the checkpoint of `step` (every process calls it; see checkpoint_jobs.CheckpointWriter)
SaveCheckpoint = Callable[[int, TrainState, list[str], dict[str, Any], dict[str, Any]], Path]


@dataclass
class Loop:
    """What the loop works with, built once by train.run: references only, no behaviour of its own."""

    cfg: Config
    shape: RunShape
    run_dir: Path
    accelerator: Any
    model: nn.Module  # as accelerate prepared it (DDP / FSDP wrapped when launched so)
    bare: nn.Module  # the same module unwrapped (a heads.WithHead with a regression head): what checkpoints save
    optimizer: torch.optim.Optimizer
    trainable: list[torch.Tensor]
    objective: Objective
    train_rows: list[Example]
    eval_rows: list[Example]
    mixture: Mixture | None  # data.sources: which source's rows each step takes (mixture.py)
    make_batch: Callable[[list[Example]], Batch]  # one collate for training and eval
    save: SaveCheckpoint
    out: MetricsLog
    trackers: Any  # tracking.Trackers
    sampler: Any  # sampling.Sampler
    validator: Validator
    callbacks: Callbacks


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, summed over every micro-batch and process."""

    loss: float  # the objective's value: sum of weight * term / units
    loss_sum: float  # what the metrics window adds up: the term's sum for a one-term objective, else `loss`
    loss_units: int  # ... and what it divides by: that term's units, else 1 (steps)
    num_targets: int  # loss-carrying tokens
    num_tokens: int
    grad_norm: float  # before clipping
    extra: dict[str, float]  # the objective's terms per unit, as logged (objectives.logged)
    by_source: dict[int, tuple[float, int]] = field(default_factory=dict)  # a mixture: each source's (loss_sum, loss_units)


def fit(loop: Loop, state: TrainState, stop: StopFlag) -> tuple[float, dict[str, Any]]:
    """Optimizer steps from state.step + 1 to the last, with logging, validation, samples and checkpoints on their
    schedules. Returns the last step's loss and why the loop ended: {"kind": "end" | "early_stopping" | "callback" |
    "signal", "step", "message", ...}."""
    cfg: Config = loop.cfg  # read through an annotated name: the unread-field test (test_config) follows reads statically
    shape, acc = loop.shape, loop.accelerator
    last_loss, ending = math.nan, {"kind": "end", "step": shape.total_steps, "message": "trained to the last step"}
    for step in range(state.step + 1, shape.total_steps + 1):
        processes.rebalance()  # an eval --watch beside this run may have started or ended: share the cores (processes.py)
        epoch, batches = step_batches(loop, step)
        lr = lr_at(step, cfg.train.lr, shape.warmup_steps, shape.total_steps, cfg.train.lr_schedule)
        started = time.perf_counter()
        result = train_step(loop, batches, lr)
        last_loss = result.loss
        # the loss every step; the weights where they are logged or saved (a checkpoint never holds NaN weights)
        checked = _is_log_step(loop, step) or step in shape.checkpoint_steps
        stop_if_diverged(step, last_loss, loop.trainable if checked else [], acc, cfg, loop.run_dir)
        _advance(state, step, epoch, shape.steps_per_epoch, result, time.perf_counter() - started)
        report = _report_step(loop, state, step, lr, result)  # metrics line, validation, decisions, callbacks
        loop.sampler.sample_if_due(step, loop.bare)  # before the checkpoint: a checkpoint implies its samples
        signum = stop.requested(acc)
        if step in shape.checkpoint_steps or report.save or report.stop_reason or signum:
            _save(loop, state, step, report, signum)
            signum = signum or stop.requested(acc)  # a signal during the save: the checkpoint is already there
        if report.stop_reason or signum:
            ending = report.stop_reason or {"kind": "signal", "step": step, "signum": signum, "message": f"stopped by signal {signum}"}
            break
    acc.wait_for_everyone()
    _call(loop, "on_stop", state, Requests(), stop_reason=ending, checkpoint=checkpoint_dir(loop.run_dir, state.step))
    return last_loss, ending


@dataclass(frozen=True)
class StepReport:
    """What the end of a step decided: its validation values, a checkpoint due, a stop."""

    validation: dict[str, float | None]
    loss: float
    lr: float
    grad_norm: float
    save: bool = False  # the best improved: a checkpoint is due
    stop_reason: dict[str, Any] | None = None  # early stopping or a callback asked to stop


def _report_step(loop: Loop, state: TrainState, step: int, lr: float, result: StepResult) -> StepReport:
    """The step's metrics line with its validation (held-out loss, suites), the decisions taken from it (best,
    early stopping), the callbacks' hooks (they may log metrics into the line and ask for a stop)."""
    cfg: Config = loop.cfg
    record = _step_metrics(loop, state, step, lr) if _is_log_step(loop, step) else {}
    values = {**_held_out(loop, state, step), **loop.validator.run(step, loop.bare)}
    decision = decide(cfg, state, step, values)
    requests = Requests()
    try:
        if values:
            _call(loop, "on_validation", state, requests, validation=values)
        _call(loop, "on_step_end", state, requests, metrics={**record, **values})
    except CallbackError as e:  # the run stops with the callback's error: the step's line and checkpoint written first
        _write_line(loop, step, record, values, requests.logged)
        folder = _save(loop, state, step, StepReport(values, result.loss, lr, result.grad_norm), error=True)
        raise CallbackError(f"{e}; checkpoint {folder} written: fix the callback and run the same command to resume") from e
    _write_line(loop, step, record, values, requests.logged)
    loop.out.bar.update(1)
    stop_reason = decision.stop_reason
    if stop_reason is None and requests.stops:
        name, reason = requests.stops[0]
        stop_reason = {
            "kind": "callback",
            "step": step,
            "callback": name,
            "reason": reason,
            "message": f"callback {name} asked to stop: {reason}",
        }
    return StepReport(values, result.loss, lr, result.grad_norm, decision.best_improved, stop_reason)


def _write_line(loop: Loop, step: int, record: dict, values: dict, logged: dict) -> None:
    """The step's metrics.jsonl line (and trackers): training figures, validation values, what callbacks logged."""
    if record or values or logged:
        line = {**(record or {"step": step}), **values, **logged}
        loop.out.write(line)
        loop.trackers.log_metrics(line)


def _save(loop: Loop, state: TrainState, step: int, report: StepReport, signum: int | None = None, error: bool = False) -> Path:
    """The checkpoint of `step`, its rules saying why it was written, its validation results stored beside it."""
    cfg: Config = loop.cfg
    shape = loop.shape
    if not (_is_log_step(loop, step) or step in shape.checkpoint_steps):  # its weights were not checked after the step
        stop_if_diverged(step, report.loss, loop.trainable, loop.accelerator, cfg, loop.run_dir)
    stopped = report.stop_reason is not None  # early stopping or a callback: the run ends here
    rules = list(shape.rules_at(step))
    rules += ["best"] if report.save else []
    rules += [{"early_stopping": "early_stop", "callback": "callback_stop"}[report.stop_reason["kind"]]] if stopped else []
    rules += ["signal"] if signum and step not in shape.checkpoint_steps else []
    rules += ["error"] if error else []
    rules += ["last"] if stopped and "last" not in rules else []  # a watcher (eval --watch) sees the run's last checkpoint
    meta: dict[str, Any] = {"validation": report.validation} if report.validation else {}
    if stopped:
        meta["stop_reason"] = report.stop_reason
    metrics = {"loss": report.loss, "eval_loss": state.eval_loss, "lr": report.lr, "grad_norm": report.grad_norm}
    folder = loop.save(step, state, rules, metrics, meta)
    loop.validator.store(step, folder, step / shape.steps_per_epoch, "last" in rules)
    _call(loop, "on_checkpoint", state, Requests(), checkpoint=folder)
    return folder


def _call(loop: Loop, hook: str, state: TrainState, requests: Requests, **fields: Any) -> None:
    """Call a hook of the callbacks (if any) with a read-only view of the run; what they ask for goes to `requests`."""
    if loop.callbacks:
        frozen = {k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in fields.items()}
        view = RunView(state.step, loop.shape.total_steps, state.step / loop.shape.steps_per_epoch, loop.run_dir, loop.bare, **frozen)
        loop.callbacks.call(hook, replace(view, _requests=requests))


def step_batches(loop: Loop, step: int) -> tuple[int, list[Batch]]:
    """(epoch, this process's micro-batches) of optimizer step `step` (from 1): a pure function of the step, so a
    resume at any step sees the rows an uninterrupted run would."""
    cfg: Config = loop.cfg
    train, acc = cfg.train, loop.accelerator
    rows_per_process = train.micro_batch_size * train.grad_accum_steps
    rows_per_step = rows_per_process * acc.num_processes
    if loop.mixture:  # each source its share of every step (an epoch of a mixture: as many rows as its sources hold)
        epoch, rows = (step - 1) // loop.shape.steps_per_epoch, loop.mixture.step(rows_per_step, train.seed, step, cfg.data.shuffle)
    else:
        epoch, rows = step_rows(len(loop.train_rows), rows_per_step, train.seed, step - 1, cfg.data.shuffle)
    mine = rows[acc.process_index * rows_per_process : (acc.process_index + 1) * rows_per_process]
    return epoch, [loop.make_batch(mb) for mb in micro_batches(loop.train_rows, mine, train.micro_batch_size)]


def train_step(loop: Loop, batches: list[Batch], lr: float) -> StepResult:
    """One optimizer step at learning rate `lr`: forward/backward every micro-batch, clip, step, clear the gradients."""
    cfg: Config = loop.cfg
    set_lr(loop.optimizer, lr)
    result = _accumulate(loop.model, batches, loop.objective, loop.accelerator)
    if engine := zero.engine_of(loop.model):  # DeepSpeed clips at train.max_grad_norm, steps and clears the gradients
        return replace(result, grad_norm=zero.step(engine))
    grad_norm = _clip(loop.accelerator, loop.trainable, cfg.train.max_grad_norm)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return replace(result, grad_norm=grad_norm)


def _advance(state: TrainState, step: int, epoch: int, steps_per_epoch: int, result: StepResult, seconds: float) -> None:
    state.step, state.tokens_seen = step, state.tokens_seen + result.num_tokens
    state.epoch, state.step_in_epoch = epoch, step - epoch * steps_per_epoch
    state.first_loss = result.loss if step == 1 else state.first_loss
    state.window.add(
        result.loss_sum, result.loss_units, result.num_targets, result.num_tokens, result.grad_norm, result.extra, seconds, result.by_source
    )


def _is_log_step(loop: Loop, step: int) -> bool:
    cfg: Config = loop.cfg
    return step % cfg.train.log_every_steps == 0 or step == loop.shape.total_steps


def _step_metrics(loop: Loop, state: TrainState, step: int, lr: float) -> dict[str, Any]:
    """The training figures of a logged step: the averages since the last logged step, lr, tokens, memory."""
    return {
        "step": step,
        "epoch": round(step / loop.shape.steps_per_epoch, 4),
        **state.window.flush(loop.mixture.names if loop.mixture else ()),
        "lr": lr,
        "tokens": state.tokens_seen,
        "peak_mem_mib": peak_memory_mib(loop.accelerator.device),
    }


def _held_out(loop: Loop, state: TrainState, step: int) -> dict[str, float]:
    """The objective on the held-out rows when due (every eval.loss_every_steps and at the last step): eval_loss,
    eval_ppl (causal_lm), eval_<term>; {} when not due."""
    cfg: Config = loop.cfg
    every_eval = cfg.eval.loss_every_steps
    if not loop.eval_rows or not ((every_eval and step % every_eval == 0) or step == loop.shape.total_steps):
        return {}
    micro_batch_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    result = held_out_result(loop.model, loop.eval_rows, micro_batch_size, loop.make_batch, loop.objective, loop.accelerator)
    state.eval_loss = result.loss if result else math.nan
    values = {"eval_loss": state.eval_loss}
    if cfg.objective.kind == "causal_lm":
        values["eval_ppl"] = math.exp(min(state.eval_loss, 50))
    values.update({f"eval_{k}": v for k, v in (result.extra if result else {}).items()})
    for c, (loss_sum, units) in (result.by_source if result and loop.mixture else {}).items():
        if units:  # a source with held-out rows: its own held-out loss (source/<name>.eval_loss)
            values[f"source/{loop.mixture.names[c]}.eval_loss"] = loss_sum / units
    return values


def _accumulate(model: nn.Module, batches: list[Batch], objective: Objective, accelerator) -> StepResult:
    """Forward/backward every micro-batch of one optimizer step. Each term is divided by its units summed over all
    micro-batches and processes first (objectives.py), so the gradients are those of the whole step's loss however it
    is split. Returns the step's loss and per-unit terms over all processes (grad_norm filled in by the caller)."""
    device = accelerator.device
    units = _step_units(batches, accelerator)
    sums = Sums()
    engine = zero.engine_of(model)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP and ZeRO average gradients over processes; multiplying by the world size turns that into a sum.
        sync = nullcontext() if last or engine else accelerator.no_sync(model)
        with sync:
            terms = objective(model, batch.to(device))
            loss = weighted_loss(terms, units, accelerator.num_processes)
            zero.backward(engine, loss, last) if engine else accelerator.backward(loss)
        sums.add(terms)
    return _step_result(sums, units, accelerator)


@dataclass
class Sums:
    """An objective's terms summed over micro-batches (detached, float32), each with its unit and weight, and split by
    data source where the terms are (a mixture: Term.by_channel)."""

    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (unit, weight)
    by_channel: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (num_channels,)

    def add(self, terms: dict[str, Term]) -> None:
        for name, term in terms.items():
            total = term.total.detach().float()
            self.totals[name] = self.totals[name] + total if name in self.totals else total
            self.kinds[name] = (term.unit, term.weight)
            if term.by_channel is not None:
                split = term.by_channel.detach().float()
                self.by_channel[name] = self.by_channel[name] + split if name in self.by_channel else split


def _step_units(batches: list[Batch], accelerator) -> dict[str, int]:
    """Every unit of this step's batches, summed over micro-batches and processes (known before any forward)."""
    local: Counter = Counter()
    for b in batches:
        local.update(_units_of(b))
    return _reduce_units(local, accelerator)


def _units_of(batch: Batch) -> dict[str, int]:
    """A batch's units, every real token ("_all_tokens", for throughput) and each unit per source ("tokens@1")."""
    per_source = {f"{unit}@{c}": int(n) for unit, counts in batch.channel_units().items() for c, n in enumerate(counts)}
    return {**batch.units, "_all_tokens": batch.num_tokens, **per_source}


def _reduce_units(local: Counter, accelerator) -> dict[str, int]:
    """Units counted on this process, summed over all processes ("_all_tokens": every real token, for throughput)."""
    names = sorted(set(local) | {"tokens", "rows", "_all_tokens"})
    total = accelerator.reduce(torch.tensor([local[k] for k in names], device=accelerator.device), reduction="sum").tolist()
    return dict(zip(names, map(int, total)))


def _step_result(sums: Sums, units: dict[str, int], accelerator) -> StepResult:
    names, split = sorted(sums.totals), sorted(sums.by_channel)
    parts = [torch.stack([sums.totals[k] for k in names])] if names else []
    parts += [sums.by_channel[k] for k in split]
    reduced = accelerator.reduce(torch.cat(parts), reduction="sum").tolist() if parts else []
    total = dict(zip(names, reduced))
    by_channel, at = {}, len(names)
    for k in split:
        by_channel[k] = reduced[at : at + len(sums.by_channel[k])]
        at += len(sums.by_channel[k])
    kinds = sums.kinds
    means = {k: total[k] / max(1, units[kinds[k][0]]) for k in names}
    weights = {k: kinds[k][1] for k in names}
    loss = float(weighted_loss({k: Term(torch.tensor(total[k], dtype=torch.float64), *kinds[k]) for k in names}, units))
    loss_terms = [k for k in names if weights[k]]
    one_term = len(loss_terms) == 1 and weights[loss_terms[0]] == 1.0  # token-weighted averages over a log window, as before
    if one_term:
        (k,) = loss_terms
        loss_sum, loss_units = total[k], units[kinds[k][0]]
    else:
        loss_sum, loss_units = loss, 1
    by_source = _by_source(by_channel, kinds, units, loss_terms, one_term)
    return StepResult(loss, loss_sum, loss_units, units["tokens"], units["_all_tokens"], 0.0, logged(means, weights), by_source)


def _by_source(
    by_channel: dict[str, list[float]], kinds: dict[str, tuple[str, float]], units: dict[str, int], loss_terms: list[str], one_term: bool
) -> dict[int, tuple[float, int]]:
    """Each source's (loss_sum, loss_units), laid out as the step's own: the one term's sum and units, or the
    objective over that source's rows (every loss term divided by that source's units) and 1. {} unless every loss
    term is split by source."""
    if not loss_terms or not all(k in by_channel for k in loss_terms):
        return {}
    out = {}
    for c in range(len(by_channel[loss_terms[0]])):
        counts = {k: units.get(f"{kinds[k][0]}@{c}", 0) for k in loss_terms}
        if one_term:
            (k,) = loss_terms
            out[c] = (by_channel[k][c], counts[k])
        elif all(counts.values()):  # a source with no units of some term this step has no value for the objective
            out[c] = (sum(kinds[k][1] * by_channel[k][c] / counts[k] for k in loss_terms), 1)
    return out


def _clip(accelerator, params: list[torch.Tensor], max_norm: float | None) -> float:
    if max_norm is not None and sharding.is_sharded(accelerator):
        # torch's clip works on sharded gradients directly (accelerate's FSDP branch compares the parameter lists
        # with ==, which DTensors refuse); the norm it returns is completed over the processes
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    # a sharded gradient's norm (FSDP: a DTensor) is completed over the processes
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


@torch.no_grad()
def held_out_result(
    model: nn.Module,
    examples: list[Example],
    micro_batch_size: int,
    make_batch: Callable[[list[Example]], Batch],
    objective: Objective,
    accelerator,
) -> StepResult | None:
    """The objective over the held-out rows (each process takes a share), normalized like a training step over all of
    them (None when there are none). Batches are built one at a time (no backward needs the units first)."""
    was_training = model.training
    model.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    local: Counter = Counter()
    sums = Sums()
    for rows in micro_batches(examples, mine, micro_batch_size):
        batch = make_batch(rows)
        local.update(_units_of(batch))
        sums.add(objective(model, batch.to(accelerator.device)))
    if sharding.in_step(accelerator) and examples:
        # each forward of a sharded model gathers parameters on every process: a process with fewer rows runs the
        # forwards it lacks on a row whose result is not counted (process 0 has the most)
        most = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / micro_batch_size)
        for _ in range(most - math.ceil(len(mine) / micro_batch_size)):
            objective(model, make_batch(examples[:1]).to(accelerator.device))
    model.train(was_training)
    if not sums.totals:
        return None
    return _step_result(sums, _reduce_units(local, accelerator), accelerator)


def evaluate(
    model: nn.Module,
    examples: list[Example],
    micro_batch_size: int,
    make_batch: Callable[[list[Example]], Batch],
    objective: Objective,
    accelerator,
) -> dict[str, float]:
    """The objective over the held-out rows: {"loss": ..., and each term as logged} (held_out_result)."""
    result = held_out_result(model, examples, micro_batch_size, make_batch, objective, accelerator)
    return {"loss": result.loss, **result.extra} if result else {"loss": math.nan}
