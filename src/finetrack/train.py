"""`train.run(cfg)`: the spine of a run, readable top to bottom.

start point -> tokenizer -> data -> resolve -> model -> optimizer -> resume state -> loop
(checkpoints on the schedule, background uploads, retention) -> final checkpoint.
The loop is our own (loop.py: `fit()` and `train_step()`), on `accelerate.Accelerator`, so `accelerate launch` scales it out.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import (
    checkpoint,
    checkpoint_jobs,
    heads,
    objectives,
    precision,
    processes,
    resume,
    rundir,
    runlock,
    sampling,
    sharding,
    tracking,
    warm_start,
    zero,
)
from .batches import batch_builder, packing_is_exact
from .callbacks import Callbacks
from .checkpoint import CheckpointError
from .config import (
    Config,
    ConfigError,
    Environment,
    Resolved,
    RunShape,
    effective_dump,
    resolve,
    resolved_yaml,
)
from .data import prepare, report_line
from .interrupt import Interrupted, StopFlag
from .loop import Loop, fit
from .metrics import MetricsLog
from .models import build_model, check_source, load_tokenizer, load_weights, trainable_report
from .objectives import Objective
from .optim import build_optimizer, check_optimizer
from .resume import Request
from .train_state import DataPosition, LrSchedule, TrainState
from .validation import Validator, decide, watches, write_best

log = logging.getLogger("finetrack")


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
    stop_reason: dict[str, Any] | None = None  # early stopping or a callback ended the run before its last step
    best: dict[str, Any] | None = None  # checkpoints/best.json when checkpoint.best is set


def run(cfg: Config, request: Request = Request(), objective: Objective | None = None, callbacks: Sequence[Any] = ()) -> RunResult:
    """Train one run as configured, resuming from its newest usable checkpoint, and write its run directory.
    The objective is the config's (objective.*); `objective` replaces its function only (tests instrument it so).
    `callbacks`: objects with any of the hooks of callbacks.py, called after train.callbacks' own.

    Raises Interrupted when SIGTERM / SIGINT / SIGUSR1 arrives: after writing a checkpoint, or at once
    while starting (loading, downloading), when no optimizer step has been taken. A full disk or another
    write error ends in one CheckpointError naming the file and the free space.
    """
    # from the first line: a signal while loading exits cleanly too; `held` keeps the run directory's lock to the end
    with StopFlag() as stop, ExitStack() as held:
        try:
            return _run(cfg, objective, request, stop, held, callbacks)
        except OSError as e:
            if not checkpoint.is_write_error(e):
                raise
            raise CheckpointError(checkpoint.write_error_text(Path(cfg.output.dir), e)) from None


def _run(cfg: Config, objective: Objective | None, request: Request, stop: StopFlag, held: ExitStack, hooks: Sequence[Any]) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.output.dir)
    # --- checks that need no weights come first: a mistake costs seconds, not a model load (and a refused
    # run leaves no output.dir behind)
    check_source(cfg.model)
    check_optimizer(cfg.train)
    objective = objective or objectives.build(cfg.objective)  # a python objective's file is read (and checked) now
    callbacks = Callbacks.build(cfg.train.callbacks, list(hooks))  # so are the callbacks' files
    launched = processes.launched_processes()
    processes.stop_with_launcher()
    sharding.check_launch(cfg.model.method)  # FSDP1, QLoRA under FSDP: refused before accelerate imports them
    zero.check_launch(cfg.model.method, launched)  # so are DeepSpeed offloading and QLoRA under DeepSpeed
    # several processes without a GPU: accelerate's CPU data parallel (gloo), which it only sets up when told cpu=True
    cpu = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, **tracking.accelerator_kwargs(cfg.train.report_to, run_dir))
    sharding.set_up(accelerator)  # an FSDP launch on CPU: accelerate's FSDP2 plugin, which it sets up on GPUs only
    zero.set_up(accelerator, cfg.train)  # a DeepSpeed launch: its plugin on CPU too, filled from cfg.train
    sharded = sharding.is_sharded(accelerator)
    in_step = sharding.in_step(accelerator)  # FSDP2, ZeRO-3: every forward on every process
    main = accelerator.is_main_process
    processes.check_launch(launched, accelerator.num_processes)
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
    data = prepare(cfg.data, tokenizer, cfg.train.seed, cfg.objective)
    log.info("data: %s", report_line(data.report))
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    device = accelerator.device
    env = Environment(
        device_type=device.type,
        bf16_supported=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        num_processes=accelerator.num_processes,
        num_train_rows=len(data.train),
        num_sources=len(cfg.data.sources) or 1,
        steps_before_repeat=data.mixture.steps_before_repeat(rows_per_step) if data.mixture and cfg.data.on_source_end == "stop" else None,
    )
    cfg, res = resolve(cfg, env)
    for key, reason in res.reasons.items():
        log.info("resolved %s = %s (%s)", key, list(res[key]) if key == "checkpoint_steps" else res[key], reason)
    shape = res.shape
    assert shape is not None  # resolve() always sets it
    data.note_usage(rows_per_step, shape.total_steps, cfg.train.seed, cfg.data.shuffle)  # a mixture: each source's share, epochs
    fingerprint = data.fingerprint()
    batch = {"global_batch_size": shape.global_batch_size}  # includes the process count: rows per step
    if cfg.objective.python:  # a changed loss function is a changed run: the resume check compares its source
        batch["objective_sha256"] = objectives.source_sha256(cfg.objective.python.function)
    if saved:  # the resume check, before the model: `data.pack: auto` takes the resumed run's value, checked on the model below
        _check_process_count(saved, accelerator.num_processes, request, start)
        cfg = _check_resume(cfg, res, shape, saved, batch, fingerprint, request, start)
        if saved["step"] == shape.total_steps or _ended_early(saved, cfg):
            if main:
                _write_run_files(run_dir, cfg, res, data.report)
                (run_dir / "metrics.jsonl").touch()  # the run directory is complete even when it began from another run's end
            return _already_complete(run_dir, start, saved, cfg, main)

    # a warm start (model.init_from) is located and checked before the model loads; a resumed run has its weights already
    warm = warm_start.locate(cfg.model.init_from, run_dir) if cfg.model.init_from and not start else None
    if warm:
        warm_start.check_method(warm, cfg.model.method)
    init_record = warm.record() if warm else (saved or {}).get("init_from")
    if init_record:
        res.set("init_from", init_record, "model.init_from: the weights this run started from at step 0")
    set_seed(cfg.train.seed)  # new weights (LoRA, a head) initialize the same way whatever the data stage consumed
    model = heads.attach(build_model(cfg.model, device), cfg.objective, [v for e in data.train for v in e.values], cfg.train.seed)
    log.info(trainable_report(model))
    # before config.resolved.yaml: `data.pack: auto` may resolve differently on this model
    assumed_pack = cfg.data.pack
    cfg = _check_packing(cfg, res, heads.language_model(model), device, len(tokenizer))
    if saved and cfg.data.pack != assumed_pack:  # this model cannot pack as the resumed run did: the check names it
        _check_resume(cfg, res, shape, saved, batch, fingerprint, request, start, adopt_pack=False)
    if main:
        _write_run_files(run_dir, cfg, res, data.report)
    if start:
        load_weights(model, start)
    elif warm:
        warm_start.load(model, warm)
    num_sources = len(data.mixture.names) if data.mixture else 1  # several: the loss split by source (Batch.channels)
    make_batch = batch_builder(tokenizer.pad_token_id, cfg.data.pack, cfg.data.pack_row_tokens, heads.language_model(model), num_sources)
    optimizer = build_optimizer(model, cfg.train, cfg.train.lr)
    positions = [p for group in optimizer.param_groups for p in group["params"]]  # the one-process state's keys
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)  # what sampling and checkpoints use: the same module, without DDP/FSDP wrappers
    model.train()
    # before any forward: a sharded model's root holds gathered copies after a forward outside training (sharding.py)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if sharded:
        log.info("FSDP2: parameters, gradients and optimizer state sharded over %d processes", accelerator.num_processes)
    if zero_stage := zero.stage(accelerator):
        log.info("DeepSpeed ZeRO-%d: %s partitioned over %d processes", zero_stage, zero.PARTITIONED[zero_stage], accelerator.num_processes)

    fresh = TrainState(
        data=DataPosition(cfg.train.seed, cfg.data.shuffle, len(data.train), rows_per_step, data.mixture),
        lr_schedule=LrSchedule(cfg.train.lr, shape.warmup_steps, shape.total_steps, cfg.train.lr_schedule),
    )
    save_optimizer, load_optimizer = _optimizer_io(model, optimizer, positions, sharded)
    state = resume_state(start, load_optimizer, fresh, shape.total_steps)  # the RNG last, right before the loop
    state.early_stopping, state.best = watches(cfg, state if start else None)
    if main and state.best and state.best.best_step is not None:  # a kill between a best checkpoint and best.json
        write_best(run_dir, state.best)
    kept_through = state.step if start else -1  # what an earlier attempt logged after this is logged again (a fresh start: step 0 too)
    if main:
        _trim_logs(run_dir, kept_through, bool(start))
    trackers = tracking.start(accelerator, cfg, res, run_dir, kept_through)
    uploader = checkpoint_jobs.start_uploader(cfg, run_dir) if main else None
    exporter = checkpoint_jobs.start_exporter(cfg, run_dir) if main else None
    out = held.enter_context(MetricsLog(run_dir / "metrics.jsonl", shape.total_steps, state.step, main))  # closed on any error too
    # a sharded / partitioned model answers on every process in step (each forward gathers parameters); the main process writes
    sampler = sampling.Sampler(
        prompts,
        cfg.train,
        tokenizer,
        run_dir,
        shape.total_steps,
        shape.steps_per_epoch,
        out,
        trackers,
        answers=main or in_step,
        writes=main,
        precision=partial(precision.autocast, cfg.model, device.type),
    )
    validator = Validator(cfg, run_dir, tokenizer, accelerator, shape.total_steps)
    if not start:
        sampler.sample_if_due(0, bare)  # the starting weights' answers
        base_values = validator.run(0, bare)  # the base model through the suites: the start of every validation curve
        validator.store(0, None, 0.0, False)  # also a suite skipped at step 0 (no trained head yet), as eval records it
        decide(cfg, state, 0, base_values)  # a watched metric its suite does not produce fails now, before any training
        if base_values:
            out.write({"step": 0, "epoch": 0.0, **base_values})
            trackers.log_metrics({"step": 0, **base_values})
    out.watched = [w.metric for w in (state.early_stopping, state.best) if w]
    save = checkpoint_jobs.CheckpointWriter(
        run_dir, accelerator, cfg, shape, bare, tokenizer, save_optimizer, batch, fingerprint, uploader, out, init_record, exporter
    )
    loop = Loop(
        cfg=cfg,
        shape=shape,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        bare=bare,
        optimizer=optimizer,
        trainable=trainable,
        objective=precision.autocasting(objective, cfg.model, device.type),  # model.mixed_precision: the forwards under autocast
        train_rows=data.train,
        mixture=data.mixture,
        eval_rows=data.eval,
        make_batch=make_batch,
        save=save,
        out=out,
        trackers=trackers,
        sampler=sampler,
        validator=validator,
        callbacks=callbacks,
    )
    with stop.training():
        last_loss, ending = fit(loop, state, stop)
    out.close()  # the bar ends its line before the uploads are awaited
    # still under the signal handlers: a signal now says the uploads are awaited, a second one exits at once
    best_step = state.best.best_step if state.best else None
    not_uploaded = checkpoint_jobs.finish(uploader, run_dir, cfg.checkpoint, best_step, exporter) if main else []
    accelerator.end_training()
    final = checkpoint.checkpoint_dir(run_dir, state.step)
    if ending["kind"] == "signal" and state.step < shape.total_steps:
        raise Interrupted(ending["signum"], str(final))
    stop_reason = ending if ending["kind"] in ("early_stopping", "callback") else None
    return RunResult(
        run_dir,
        final,
        shape.total_steps,
        state.first_loss,
        last_loss,
        state.eval_loss,
        saved["step"] if saved else 0,
        not_uploaded,
        stop_reason,
        rundir.read_best(run_dir) if main else None,
    )


def resume_state(start: Path | None, load_optimizer: Callable[[dict], Any], fresh: TrainState, total_steps: int) -> TrainState:
    """The progress to continue from: `fresh` (step 0) without a checkpoint, else the checkpoint's, with its optimizer
    state (`load_optimizer(state_dict)`) and every RNG restored. The data order and the lr schedule follow this config
    (checked against the checkpoint's before the model was loaded), not the copies the checkpoint recorded."""
    if not start:
        return fresh
    resumed = TrainState.from_json(checkpoint.restore_state(start, load_optimizer))
    log.info("resuming from %s: step %d of %d, %s tokens seen", start, resumed.step, total_steps, f"{resumed.tokens_seen:,}")
    return replace(resumed, data=fresh.data, lr_schedule=fresh.lr_schedule)


def _optimizer_io(
    model: nn.Module, optimizer: Any, positions: list[torch.Tensor], sharded: bool
) -> tuple[Callable[[], dict], Callable[[dict], Any]]:
    """(save, load) of the optimizer state in the one-process layout (state keyed by parameter position): the
    optimizer's own state_dict, or gathered from FSDP2 shards / ZeRO partitions (every process calls them)."""
    if engine := zero.engine_of(model):
        return partial(zero.gather_optimizer_state, engine, positions), partial(zero.load_optimizer_state, engine, positions)
    if sharded:
        return partial(sharding.gather_optimizer_state, model, optimizer), partial(sharding.load_optimizer_state, model, optimizer)
    return optimizer.state_dict, optimizer.load_state_dict


def _trim_logs(run_dir: Path, kept_through: int, resumed: bool) -> None:
    """Drop the log lines an earlier attempt wrote after the step this one starts from: those steps run again."""
    for name in ("metrics.jsonl", sampling.SAMPLES_FILE):
        dropped = resume.trim_log(run_dir / name, kept_through)
        if dropped:
            after = f"after step {kept_through}" if resumed else "(a fresh start)"
            log.info("%s: dropped %d line(s) an earlier attempt logged %s: those steps run again", name, dropped, after)


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


def _check_process_count(saved: dict, num_processes: int, request: Request, start: Path) -> None:
    """A resume with another number of processes is refused (unless --allow-config-change): each step's rows are the
    same (split by process from one order), but its gradient would be summed over other processes in another order,
    so the run would not continue bit for bit; with the same micro-batch the global batch changes too. The saved
    count is the checkpoint's global batch over its micro-batch x accumulation."""
    train = saved["config"].get("train", {})
    per_process = train.get("micro_batch_size", 0) * train.get("grad_accum_steps", 0)
    was = saved.get("resolved", {}).get("global_batch_size", 0) // per_process if per_process else num_processes
    if was == num_processes or request.allow_config_change:
        return
    raise ConfigError(
        f"cannot resume from {start}: it was trained by {was} process(es), this launch has {num_processes}: the gradient of "
        "a step would be summed over another number of processes, in another order, so the run would not continue bit "
        f"for bit; launch {was} process(es) ({'`finetrack train CONFIG`' if was == 1 else processes.cpu_launch(was)} on CPU), start over with --fresh, or pass --allow-config-change to continue anyway"
    )


def _ended_early(saved: dict, cfg: Config) -> bool:
    """Did the checkpoint end its run early (early stopping, a callback), with the rule that stopped it unchanged? Then
    the run is complete; a changed rule (say a larger patience) trains on from there."""
    reason = saved.get("stop_reason")
    if not isinstance(reason, dict):
        return False
    key = {"early_stopping": ("train", "early_stopping"), "callback": ("train", "callbacks")}.get(reason.get("kind"))
    if key is None:
        return False
    section, name = key
    was = (saved["config"].get(section) or {}).get(name) if isinstance(saved["config"].get(section), dict) else None
    now = effective_dump(cfg).get(section, {}).get(name)
    if was != now:
        log.info("the checkpoint ended its run early (%s), but %s.%s changed: training on", reason.get("message"), section, name)
    return was == now


def _write_run_files(run_dir: Path, cfg: Config, res: Resolved, data_report: dict) -> None:
    # atomic: `finetrack eval --watch` and the uploader read these while the run goes on
    checkpoint.write_atomic(run_dir / "config.resolved.yaml", resolved_yaml(cfg, res))
    checkpoint.write_atomic(run_dir / "data_report.json", json.dumps(data_report, indent=2) + "\n")


def _already_complete(run_dir: Path, start: Path, saved: dict, cfg: Config, main: bool) -> RunResult:
    """A run whose checkpoint is at its last step: nothing to train, so the model is never loaded. Uploads an
    earlier attempt did not finish still happen, and exports (that is what running the same command again is for)."""
    if saved.get("stop_reason"):
        log.info("%s ended the run early at step %d (%s): nothing to train", start, saved["step"], saved["stop_reason"].get("message"))
    else:
        log.info("%s is at the last step (%d): nothing to train", start, saved["step"])
    uploader = checkpoint_jobs.start_uploader(cfg, run_dir) if main else None
    exporter = checkpoint_jobs.start_exporter(cfg, run_dir) if main else None
    resumed = TrainState.from_json(checkpoint.read_state_tree(start))
    best_step = resumed.best.best_step if resumed.best else None
    not_uploaded = checkpoint_jobs.finish(uploader, run_dir, cfg.checkpoint, best_step, exporter) if main else []
    metrics = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else {}
    return RunResult(
        run_dir,
        start,
        saved["step"],
        resumed.first_loss,
        metrics.get("loss", math.nan),
        metrics.get("eval_loss"),
        saved["step"],
        not_uploaded,
        saved.get("stop_reason"),
        rundir.read_best(run_dir) if main else None,
    )


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
