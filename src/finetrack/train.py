"""`train.run(cfg)`: the spine of a run, readable top to bottom.

config -> tokenizer -> data -> resolve -> model -> optimizer -> loop -> final checkpoint.
The loop is our own, on `accelerate.Accelerator`, so `accelerate launch` scales it out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .batches import DEFAULT_ATTN_TOKENS, IGNORE, Batch, collate, micro_batches, packing_is_exact, step_rows
from .config import Config, ConfigError, Environment, config_hash, resolve, resolved_yaml
from .data import Example, prepare, report_line
from .models import build_model, load_tokenizer, trainable_report
from .optim import build_optimizer, lr_at, set_lr

log = logging.getLogger("finetrack")

# An objective maps (model, batch) to the SUM of per-token losses and extra metrics. The loop divides
# by the number of loss-carrying tokens in the whole accumulated batch, so micro-batch size and
# accumulation do not change what is optimized.
Objective = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]


def causal_lm_objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy, summed over target tokens. Logits are computed only where a target
    exists (boolean `logits_to_keep`): on chat data most positions carry no loss."""
    keep = batch.targets != IGNORE  # (B, T)
    logits = model(**batch.inputs, logits_to_keep=keep, use_cache=False).logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep returns (B, T, V)
        logits = logits[keep]
    loss_sum = F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")  # logits: (N, V)
    return loss_sum, {}


@dataclass
class RunResult:
    run_dir: Path
    final_checkpoint: Path
    total_steps: int
    first_loss: float
    final_loss: float
    eval_loss: float | None


def run(cfg: Config, objective: Objective = causal_lm_objective) -> RunResult:
    """Train one run as configured and write its run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.output.dir)
    _check_run_dir(run_dir)
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on CPU: accelerate would run N independent copies writing the same run directory
        raise ConfigError(
            f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: "
            "use `accelerate launch --multi_gpu` on GPUs (multi-process CPU training is not supported)"
        )
    set_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed)
    log.info("data: %s", report_line(data.report))
    device = accelerator.device
    env = Environment(
        device_type=device.type,
        bf16_supported=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        num_processes=accelerator.num_processes,
        num_train_rows=len(data.train),
    )
    cfg, res = resolve(cfg, env)
    for key, reason in res.reasons.items():
        log.info("resolved %s = %s (%s)", key, res[key], reason)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.resolved.yaml").write_text(resolved_yaml(cfg, res))
        (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2) + "\n")

    set_seed(cfg.train.seed)  # new weights (LoRA) initialize the same way whatever the data stage consumed
    model = build_model(cfg.model, device)
    log.info(trainable_report(model))
    if cfg.data.pack and not packing_is_exact(model, device, len(tokenizer)):
        raise ConfigError(
            f"data.pack: this model's attention ({cfg.model.attn_implementation}) does not keep packed sequences apart "
            "(packed logits differ from separate ones); set data.pack=false"
        )
    # one collate for training and eval; the cost model reads the unwrapped model's width
    make_batch = partial(collate, pad_id=tokenizer.pad_token_id, pack=cfg.data.pack, pack_row_tokens=cfg.data.pack_row_tokens, attn_tokens=_attn_tokens(model))
    optimizer = build_optimizer(model, cfg.train, cfg.train.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    total_steps, steps_per_epoch = res["total_steps"], res["steps_per_epoch"]
    rows_per_process = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    progress = _progress(total_steps, accelerator.is_main_process)
    window = _Window()
    tokens_seen = 0
    first_loss = last_loss = float("nan")
    eval_loss = None

    for step in range(1, total_steps + 1):
        _, rows = step_rows(len(data.train), rows_per_process * world, cfg.train.seed, step - 1, cfg.data.shuffle)
        mine = rows[rank * rows_per_process : (rank + 1) * rows_per_process]
        batches = [make_batch(mb) for mb in micro_batches(data.train, mine, cfg.train.micro_batch_size)]
        lr = lr_at(step, cfg.train.lr, res["warmup_steps"], total_steps, cfg.train.lr_schedule)
        set_lr(optimizer, lr)
        started = time.perf_counter()
        loss_sum, num_targets, num_tokens, extra = _accumulate(model, batches, objective, accelerator)
        grad_norm = _clip(accelerator, trainable, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = loss_sum / num_targets
        tokens_seen += num_tokens
        first_loss = loss if step == 1 else first_loss
        last_loss = loss
        window.add(loss_sum, num_targets, num_tokens, grad_norm, extra, time.perf_counter() - started)
        record = None
        if step % cfg.train.log_every_steps == 0 or step == total_steps:
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4), **window.flush(), "lr": lr, "tokens": tokens_seen, "peak_mem_mb": peak_memory_mb(device)}
        every_eval = cfg.eval.loss_every_steps
        if data.eval and ((every_eval and step % every_eval == 0) or step == total_steps):
            eval_loss = evaluate_loss(model, data.eval, cfg.eval.micro_batch_size or cfg.train.micro_batch_size, make_batch, objective, accelerator)
            record = {**(record or {"step": step}), "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))}
        if record and metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            progress.set_postfix({k: _short(record[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb") if k in record})
        progress.update(1)
        if checkpoint.is_checkpoint_step(step, total_steps, cfg.checkpoint.every_steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                meta = {"epoch": step / steps_per_epoch, "total_steps": total_steps, "tokens_seen": tokens_seen, "loss": loss, "eval_loss": eval_loss, "config_hash": config_hash(cfg)}
                path = checkpoint.save(accelerator.unwrap_model(model), tokenizer, run_dir, step, meta)
                progress.write(f"checkpoint: {path}")
    progress.close()
    if metrics_file:
        metrics_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, checkpoint.checkpoint_dir(run_dir, total_steps), total_steps, first_loss, last_loss, eval_loss)


def _accumulate(model: nn.Module, batches: list[Batch], objective: Objective, accelerator) -> tuple[float, int, int, dict[str, float]]:
    """Forward/backward every micro-batch of one optimizer step; gradients are the mean over all
    target tokens of the step on all processes. Returns (loss sum, target tokens, tokens) of all
    processes, and the objective's own metrics averaged over this process's micro-batches."""
    device = accelerator.device
    counts = torch.tensor([sum(b.num_target_tokens for b in batches), sum(b.num_tokens for b in batches)], device=device)
    counts = accelerator.reduce(counts, reduction="sum")
    num_targets = max(1, int(counts[0]))
    loss_total = torch.zeros((), device=device)
    extra: dict[str, float] = {}
    for i, batch in enumerate(batches):
        # DDP averages gradients over processes; multiplying by the world size turns that into a sum.
        sync = nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            loss_sum, metrics = objective(model, batch.to(device))
            accelerator.backward(loss_sum * accelerator.num_processes / num_targets)
        loss_total += loss_sum.detach()
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + float(v) / len(batches)
    loss_total = accelerator.reduce(loss_total, reduction="sum")
    return float(loss_total), num_targets, int(counts[1]), extra


def _clip(accelerator, params: list[torch.Tensor], max_norm: float | None) -> float:
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, examples: list[Example], micro_batch_size: int, make_batch: Callable[[list[Example]], Batch], objective: Objective, accelerator
) -> float:
    """Mean loss per target token over the held-out rows (each process takes a share)."""
    was_training = model.training
    model.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    totals = torch.zeros(2, device=accelerator.device)
    for mb in micro_batches(examples, mine, micro_batch_size):
        batch = make_batch(mb).to(accelerator.device)
        loss_sum, _ = objective(model, batch)
        totals += torch.stack([loss_sum.float(), torch.tensor(float(batch.num_target_tokens), device=accelerator.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))


class _Window:
    """Token-weighted averages over the steps since the last log line (time spent in eval and
    checkpoints is not training time and does not count in tokens_per_s)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.loss_sum = self.targets = self.tokens = 0
        self.grad_norm = 0.0
        self.extra: dict[str, float] = {}

    def add(self, loss_sum: float, targets: int, tokens: int, grad_norm: float, extra: dict[str, float], seconds: float) -> None:
        self.seconds += seconds
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens
        self.grad_norm = grad_norm
        self.extra = extra  # the objective's own metrics, from the latest step

    def flush(self) -> dict:
        out = {"loss": self.loss_sum / max(1, self.targets), "grad_norm": self.grad_norm, "target_tokens": self.targets, "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1), **self.extra}
        self.__init__()
        return out


def _attn_tokens(model: nn.Module) -> int:
    """Packed-row width at which attention costs as much as the linear layers (~6 x hidden size)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return 6 * hidden if hidden else DEFAULT_ATTN_TOKENS


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"output.dir={run_dir} already holds files; choose a new output.dir (output.dir=runs/NAME) or remove that directory"
        )


def _short(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
