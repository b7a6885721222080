"""`train.run(cfg)`: the spine of a run, readable top to bottom.

start point -> tokenizer -> data -> resolve -> model -> optimizer -> resume state -> loop
(checkpoints on the schedule, background uploads, retention) -> final checkpoint.
The loop is our own, on `accelerate.Accelerator`, so `accelerate launch` scales it out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, processes, resume, runlock, sampling, tracking
from .batches import IGNORE, Batch, attn_tokens_for, collate, micro_batches, packing_is_exact, step_rows
from .checkpoint import CheckpointError
from .config import (
    CheckpointConfig,
    Config,
    ConfigError,
    Environment,
    Resolved,
    RunShape,
    config_hash,
    effective_dump,
    resolve,
    resolved_yaml,
)
from .data import Example, prepare, report_line
from .health import stop_if_diverged
from .interrupt import Interrupted, StopFlag
from .metrics import MetricsLog, peak_memory_mib
from .models import build_model, check_source, load_tokenizer, load_weights, save_weights, saved_bytes, trainable_report
from .optim import build_optimizer, check_optimizer, lr_at, set_lr
from .resume import Request
from .train_state import DataPosition, LrSchedule, TrainState

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
    resumed_from_step: int = 0
    not_uploaded: list[Path] = field(default_factory=list)


def run(cfg: Config, objective: Objective = causal_lm_objective, request: Request = Request()) -> RunResult:
    """Train one run as configured, resuming from its newest usable checkpoint, and write its run directory.

    Raises Interrupted when SIGTERM / SIGINT / SIGUSR1 arrives: after writing a checkpoint, or at once
    while starting (loading, downloading), when no optimizer step has been taken. A full disk or another
    write error ends in one CheckpointError naming the file and the free space.
    """
    # from the first line: a signal while loading exits cleanly too; `held` keeps the run directory's lock to the end
    with StopFlag() as stop, ExitStack() as held:
        try:
            return _run(cfg, objective, request, stop, held)
        except OSError as e:
            if not checkpoint.is_write_error(e):
                raise
            raise CheckpointError(checkpoint.write_error_text(Path(cfg.output.dir), e)) from None


def _run(cfg: Config, objective: Objective, request: Request, stop: StopFlag, held: ExitStack) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.output.dir)
    # --- checks that need no weights come first: a mistake costs seconds, not a model load (and a refused
    # run leaves no output.dir behind)
    check_source(cfg.model)
    check_optimizer(cfg.train)
    accelerator = Accelerator(**tracking.accelerator_kwargs(cfg.train.report_to, run_dir))
    main = accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on CPU: accelerate would run N independent copies writing the same run directory
        raise ConfigError(
            f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: "
            "use `accelerate launch --multi_gpu` on GPUs (multi-process CPU training is not supported)"
        )
    if cfg.checkpoint.remote:
        _check_remote(cfg.checkpoint.remote)
    prompts = sampling.load_prompts(cfg.train)  # a bad prompt file fails before any work
    if main:  # the lock before the resume sweep below, which deletes unfinished checkpoint folders: a live run's would be one
        held.enter_context(runlock.hold(runlock.make_run_dir(run_dir)))
    set_seed(cfg.train.seed)

    # --- where to start: step 0 or a checkpoint (the main process may move files or download)
    start = resume.find_start(run_dir, cfg.checkpoint.remote, request) if main else None
    start = _share_path(accelerator, start)  # every process resumes from the folder the main process chose
    saved = checkpoint.check_resumable(start) if start else None

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
        log.info("resolved %s = %s (%s)", key, list(res[key]) if key == "checkpoint_steps" else res[key], reason)
    shape = res.shape
    assert shape is not None  # resolve() always sets it
    fingerprint = data.fingerprint()
    batch = {"global_batch_size": shape.global_batch_size}  # includes the process count: rows per step
    if saved:  # the resume check, before the model: `data.pack: auto` takes the resumed run's value, checked on the model below
        cfg = _check_resume(cfg, res, shape, saved, batch, fingerprint, request, start)
        if saved["step"] == shape.total_steps:
            if main:
                _write_run_files(run_dir, cfg, res, data.report)
                (run_dir / "metrics.jsonl").touch()  # the run directory is complete even when it began from another run's end
            return _already_complete(run_dir, start, saved, cfg, main)

    set_seed(cfg.train.seed)  # new weights (LoRA) initialize the same way whatever the data stage consumed
    model = build_model(cfg.model, device)
    log.info(trainable_report(model))
    # before config.resolved.yaml: `data.pack: auto` may resolve differently on this model
    assumed_pack = cfg.data.pack
    cfg = _check_packing(cfg, res, model, device, len(tokenizer))
    if saved and cfg.data.pack != assumed_pack:  # this model cannot pack as the resumed run did: the check names it
        _check_resume(cfg, res, shape, saved, batch, fingerprint, request, start, adopt_pack=False)
    if main:
        _write_run_files(run_dir, cfg, res, data.report)
    if start:
        load_weights(model, start)
    # one collate for training and eval; the cost model reads the unwrapped model's width
    make_batch = partial(
        collate,
        pad_id=tokenizer.pad_token_id,
        pack=cfg.data.pack,
        pack_row_tokens=cfg.data.pack_row_tokens,
        attn_tokens=_attn_tokens(model),
    )
    optimizer = build_optimizer(model, cfg.train, cfg.train.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)  # what sampling and checkpoints use: the same module, without DDP/FSDP wrappers
    model.train()

    total_steps, steps_per_epoch = shape.total_steps, shape.steps_per_epoch
    schedule = shape.checkpoint_steps
    rows_per_process = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    # Progress of the run so far: what a checkpoint stores and a resume restores (RNG last, right before the loop).
    state = TrainState(
        data=DataPosition(cfg.train.seed, cfg.data.shuffle, len(data.train), rows_per_process * world),
        lr_schedule=LrSchedule(cfg.train.lr, shape.warmup_steps, total_steps, cfg.train.lr_schedule),
    )
    if start:
        resumed = TrainState.from_json(checkpoint.restore_state(start, optimizer))
        # the data order and the schedule follow this config (checked against the checkpoint's above), not the recorded copies
        state = replace(resumed, data=state.data, lr_schedule=state.lr_schedule)
        log.info("resuming from %s: step %d of %d, %s tokens seen", start, state.step, total_steps, f"{state.tokens_seen:,}")
    kept_through = state.step if start else -1  # what an earlier attempt logged after this is logged again (a fresh start: step 0 too)
    if main:
        for name in ("metrics.jsonl", sampling.SAMPLES_FILE):
            dropped = resume.trim_log(run_dir / name, kept_through)
            if dropped:
                after = f"after step {kept_through}" if start else "(a fresh start)"
                log.info("%s: dropped %d line(s) an earlier attempt logged %s: those steps run again", name, dropped, after)
    trackers = tracking.start(accelerator, cfg, res, run_dir, kept_through)
    trainable = [p for p in model.parameters() if p.requires_grad]
    uploader = None
    if cfg.checkpoint.remote and main:
        from .storage import Uploader

        uploader = Uploader(cfg.checkpoint.remote, run_dir)
        if uploader.catch_up():
            log.info("uploading checkpoints an earlier attempt did not finish uploading")
    out = MetricsLog(run_dir / "metrics.jsonl", total_steps, state.step, main)
    sampler = sampling.Sampler(prompts, cfg.train, tokenizer, run_dir, total_steps, steps_per_epoch, out, trackers, main)
    if not start:
        sampler.sample_if_due(0, bare)  # the starting weights' answers
    last_loss = float("nan")
    stopped_by = None

    with stop.training(), out:
        for step in range(state.step + 1, total_steps + 1):
            processes.rebalance()  # an eval --watch beside this run may have started or ended: share the cores (processes.py)
            epoch, rows = step_rows(len(data.train), rows_per_process * world, cfg.train.seed, step - 1, cfg.data.shuffle)
            mine = rows[rank * rows_per_process : (rank + 1) * rows_per_process]
            batches = [make_batch(mb) for mb in micro_batches(data.train, mine, cfg.train.micro_batch_size)]
            lr = lr_at(step, cfg.train.lr, shape.warmup_steps, total_steps, cfg.train.lr_schedule)
            set_lr(optimizer, lr)
            started = time.perf_counter()
            loss_sum, num_targets, num_tokens, extra = _accumulate(model, batches, objective, accelerator)
            grad_norm = _clip(accelerator, trainable, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            last_loss = loss_sum / num_targets
            # the loss every step; the weights where they are logged or saved (a checkpoint never holds NaN weights)
            due = step % cfg.train.log_every_steps == 0 or step == total_steps or step in schedule
            stop_if_diverged(step, last_loss, trainable if due else [], accelerator, cfg, run_dir)
            state.step, state.tokens_seen = step, state.tokens_seen + num_tokens
            state.epoch, state.step_in_epoch = epoch, step - epoch * steps_per_epoch
            state.first_loss = last_loss if step == 1 else state.first_loss
            state.window.add(loss_sum, num_targets, num_tokens, grad_norm, extra, time.perf_counter() - started)
            record = None
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    **state.window.flush(),
                    "lr": lr,
                    "tokens": state.tokens_seen,
                    "peak_mem_mib": peak_memory_mib(device),
                }
            every_eval = cfg.eval.loss_every_steps
            if data.eval and ((every_eval and step % every_eval == 0) or step == total_steps):
                state.eval_loss = evaluate_loss(
                    model, data.eval, cfg.eval.micro_batch_size or cfg.train.micro_batch_size, make_batch, objective, accelerator
                )
                record = {**(record or {"step": step}), "eval_loss": state.eval_loss, "eval_ppl": math.exp(min(state.eval_loss, 50))}
            if record:
                out.write(record)
                trackers.log_metrics(record)
            out.bar.update(1)
            sampler.sample_if_due(step, bare)  # before the checkpoint: a checkpoint implies its samples
            stopped_by = stop.requested(accelerator)
            if step in schedule or stopped_by:
                if not due:  # a checkpoint the signal asked for: its weights were not checked above
                    stop_if_diverged(step, last_loss, trainable, accelerator, cfg, run_dir)
                accelerator.wait_for_everyone()
                if main:
                    rules = shape.rules_at(step) + (["signal"] if stopped_by and step not in schedule else [])
                    meta = {
                        "epoch": step / steps_per_epoch,
                        "total_steps": total_steps,
                        "tokens_seen": state.tokens_seen,
                        "rules": rules,
                        "metrics": {"loss": last_loss, "eval_loss": state.eval_loss, "lr": lr, "grad_norm": grad_norm},
                        "config_hash": config_hash(cfg),
                        "config": effective_dump(cfg),
                        "resolved": batch,
                        "data_fingerprint": fingerprint,
                    }
                    _save_checkpoint(run_dir, step, bare, tokenizer, optimizer, state, meta, cfg.checkpoint, uploader, out)
                stopped_by = stopped_by or stop.requested(accelerator)  # a signal during the save: the checkpoint is already there
            if stopped_by:
                break
        accelerator.wait_for_everyone()
    # still under the signal handlers: a signal now says the uploads are awaited, a second one exits at once
    not_uploaded = _finish_uploads(uploader, run_dir, cfg.checkpoint) if main else []
    accelerator.end_training()
    final = checkpoint.checkpoint_dir(run_dir, state.step)
    if stopped_by and state.step < total_steps:
        raise Interrupted(stopped_by, str(final))
    return RunResult(run_dir, final, total_steps, state.first_loss, last_loss, state.eval_loss, saved["step"] if saved else 0, not_uploaded)


def _check_packing(cfg: Config, res: Resolved, model: nn.Module, device: torch.device, vocab_size: int) -> Config:
    """Packed batches only where this model's attention keeps packed sequences apart, checked numerically.
    `data.pack: auto` falls back to padded batches (logged, and recorded in config.resolved.yaml); an explicit
    `data.pack: true` on such a model is an error."""
    if not cfg.data.pack or packing_is_exact(model, device, vocab_size):
        return cfg
    why = f"this model's attention ({cfg.model.attn_implementation}) does not keep packed sequences apart (packed logits differ from separate ones)"
    if "data.pack" not in res.values:  # the user wrote data.pack: true
        raise ConfigError(f"data.pack: {why}; set data.pack=false (or auto: padded batches where packing is not exact)")
    res.set("data.pack", False, f"auto: {why}, so padded batches")
    log.warning("resolved data.pack = False (%s)", res.reasons["data.pack"])
    # a copy, not an assignment: assigning re-runs the section's checks (pack_row_tokens set for auto is fine here)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"pack": False})})


def _check_resume(
    cfg: Config,
    res: Resolved,
    shape: RunShape,
    saved: dict,
    batch: dict,
    fingerprint: str,
    request: Request,
    start: Path,
    adopt_pack: bool = True,
) -> Config:
    """The resumed checkpoint's config against this one (resume.check_config: refused unless harmless or
    --allow-config-change), and its step against this config's last. Returns cfg with `data.pack: auto` set as the
    resumed run had it (the model check may still overturn that: then this runs again and names it)."""
    saved_pack = saved["config"].get("data", {}).get("pack") if isinstance(saved["config"].get("data"), dict) else None
    if adopt_pack and "data.pack" in res.values and isinstance(saved_pack, bool) and saved_pack != cfg.data.pack:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"pack": saved_pack})})
    for line in resume.check_config(
        {**saved["config"], "resolved": saved.get("resolved", {})},
        {**effective_dump(cfg), "resolved": batch},
        saved.get("data_fingerprint"),
        fingerprint,
        request.allow_config_change,
        start,
    ):
        log.info("config change accepted on resume: %s", line)
    if saved["step"] > shape.total_steps:
        raise ConfigError(
            f"{start} is at step {saved['step']}, after the last step of this config ({shape.total_steps}): "
            "raise train.max_steps / train.num_epochs, or start over with --fresh"
        )
    return cfg


def _write_run_files(run_dir: Path, cfg: Config, res: Resolved, data_report: dict) -> None:
    # atomic: `finetrack eval --watch` and the uploader read these while the run goes on
    checkpoint.write_atomic(run_dir / "config.resolved.yaml", resolved_yaml(cfg, res))
    checkpoint.write_atomic(run_dir / "data_report.json", json.dumps(data_report, indent=2) + "\n")


def _already_complete(run_dir: Path, start: Path, saved: dict, cfg: Config, main: bool) -> RunResult:
    """A run whose checkpoint is at its last step: nothing to train, so the model is never loaded. Uploads an
    earlier attempt did not finish still happen (that is what running the same command again is for)."""
    log.info("%s is at the last step (%d): nothing to train", start, saved["step"])
    uploader = None
    if cfg.checkpoint.remote and main:
        from .storage import Uploader

        uploader = Uploader(cfg.checkpoint.remote, run_dir)
        if uploader.catch_up():
            log.info("uploading checkpoints an earlier attempt did not finish uploading")
    not_uploaded = _finish_uploads(uploader, run_dir, cfg.checkpoint) if main else []
    metrics = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else {}
    first_loss = TrainState.from_json(checkpoint.read_state_tree(start)).first_loss
    return RunResult(
        run_dir, start, saved["step"], first_loss, metrics.get("loss", math.nan), metrics.get("eval_loss"), saved["step"], not_uploaded
    )


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    tokenizer,
    optimizer,
    state: TrainState,
    meta: dict,
    ck: CheckpointConfig,
    uploader,
    out: MetricsLog,
) -> None:
    """Write one checkpoint, hand it to the uploader, apply retention."""
    path = checkpoint.save(
        run_dir,
        step,
        lambda d: save_weights(model, tokenizer, d),
        checkpoint.capture_state(optimizer, state.to_json()),
        meta,
        saved_bytes(model),
    )
    out.say(f"checkpoint: {path} ({', '.join(meta['rules'])})")
    if uploader:
        uploader.submit(path)
    for line in checkpoint.retain(
        run_dir, ck.num_keep_last, ck.keep_schedule, ck.keep_optimizer_state, uploader.busy() if uploader else set()
    ):
        out.say(f"retention: {line}")


def _share_path(accelerator, path: Path | None) -> Path | None:
    """The main process's choice, sent to every process as bytes in a tensor (no pickle between processes either)."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast

    buf = torch.zeros(4096, dtype=torch.uint8, device=accelerator.device)
    if accelerator.is_main_process and path is not None:
        raw = str(path).encode()
        assert len(raw) < len(buf), "checkpoint path too long to share"
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    raw = bytes(broadcast(buf, from_process=0).cpu().tolist()).rstrip(b"\0")
    return Path(raw.decode()) if raw else None


def _check_remote(url: str) -> None:
    """A remote URL whose backend is missing or that carries credentials fails before any work is done."""
    from . import storage

    try:
        storage.check_url(url)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"checkpoint.remote: {e}") from None


def _finish_uploads(uploader, run_dir: Path, ck: CheckpointConfig) -> list[Path]:
    """Wait for background uploads (training is over), then apply retention to what they held back."""
    if not uploader:
        return []
    from . import storage

    not_uploaded = uploader.wait()
    if not_uploaded:
        log.error(
            "%d checkpoint(s) are NOT on %s: %s (they are complete locally; re-run the same command to retry the upload)",
            len(not_uploaded),
            storage.redact(ck.remote),
            ", ".join(p.name for p in not_uploaded),
        )
    for line in checkpoint.retain(run_dir, ck.num_keep_last, ck.keep_schedule, ck.keep_optimizer_state, set(not_uploaded)):
        log.info("retention: %s", line)
    return not_uploaded


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
    model: nn.Module,
    examples: list[Example],
    micro_batch_size: int,
    make_batch: Callable[[list[Example]], Batch],
    objective: Objective,
    accelerator,
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


def _attn_tokens(model: nn.Module) -> int:
    return attn_tokens_for(getattr(getattr(model, "config", None), "hidden_size", None))
