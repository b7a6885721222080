"""Writing a checkpoint (CheckpointWriter, called by the loop on every process) and what happens to it after, in the
background: the upload (checkpoint.remote), the exports (checkpoint.export), then retention of what they held back.
Started and finished by train.run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import checkpoint, sharding, zero
from .config import CheckpointConfig, Config, RunShape, config_hash, effective_dump
from .metrics import MetricsLog
from .models import save_weights, saved_bytes
from .train_state import TrainState
from .validation import write_best

log = logging.getLogger("finetrack")


def start_uploader(cfg: Config, run_dir: Path) -> Any:
    """The background uploader of checkpoint.remote (None without one), first taking up what an earlier attempt left."""
    if not cfg.checkpoint.remote:
        return None
    from .storage import Uploader

    uploader = Uploader(cfg.checkpoint.remote, run_dir)
    if uploader.catch_up():
        log.info("uploading checkpoints an earlier attempt did not finish uploading")
    return uploader


def start_exporter(cfg: Config, run_dir: Path) -> Any:
    """The background exporter of checkpoint.export (None without it), first taking up what an earlier attempt left."""
    if not cfg.checkpoint.export:
        return None
    from .export.background import Exporter

    exporter = Exporter(cfg.checkpoint.export, run_dir)
    if queued := exporter.catch_up():
        log.info("exporting %d checkpoint(s) an earlier attempt did not export (checkpoint.export)", queued)
    return exporter


def finish(uploader, run_dir: Path, ck: CheckpointConfig, best_step: int | None, exporter: Any = None) -> list[Path]:
    """Wait for background exports and uploads (training is over), then apply retention to what they held back."""
    failed = exporter.wait() if exporter else []
    if failed:
        log.error("%d export(s) failed (checkpoint.export): %s", len(failed), "; ".join(failed))
    if not uploader and not exporter:
        return []
    from . import storage

    not_uploaded = uploader.wait() if uploader else []
    if not_uploaded:
        log.error(
            "%d checkpoint(s) are NOT on %s: %s (they are complete locally; re-run the same command to retry the upload)",
            len(not_uploaded),
            storage.redact(ck.remote),
            ", ".join(p.name for p in not_uploaded),
        )
    for line in checkpoint.retain(run_dir, ck.num_keep_last, ck.keep_schedule, ck.keep_optimizer_state, set(not_uploaded), best_step):
        log.info("retention: %s", line)
    return not_uploaded


@dataclass(frozen=True)
class CheckpointWriter:
    """Writes the checkpoint of a step. Every process calls it (they meet here, so the weights are final on all of
    them); the main process writes, hands the folder to the uploader and applies retention."""

    run_dir: Path
    accelerator: Any
    cfg: Config
    shape: RunShape
    model: nn.Module  # unwrapped
    tokenizer: Any
    optimizer_state: Callable[[], dict]  # every process calls it: optimizer.state_dict, or its gathered equivalent
    resolved: dict  # the resolved values a resume checks (global_batch_size)
    data_fingerprint: str
    uploader: Any  # storage.Uploader or None
    out: MetricsLog
    init_from: dict[str, Any] | None  # the warm start's record (model.init_from), in every checkpoint's meta
    exporter: Any = None  # export.background.Exporter (checkpoint.export) or None

    def __call__(self, step: int, state: TrainState, rules: list[str], metrics: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Write checkpoint `step` of `state`, saved by `rules`, with the step's `metrics` and `extra` entries
        (validation, stop_reason) in its meta.json; then best.json (when this step is the best) and retention."""
        self.accelerator.wait_for_everyone()
        tensors = None
        trainable_only = self.cfg.model.method != "full"
        if sharding.is_sharded(self.accelerator):  # every process takes part in gathering; the main process writes
            sharding.reshard(self.model)
            tensors = sharding.gather_weights(self.model, trainable_only)
        elif zero.stage(self.accelerator) == 3:  # parameters partitioned too
            tensors = zero.gather_weights(self.model, trainable_only, self.accelerator.is_main_process)
        optimizer_state = self.optimizer_state()  # sharded or partitioned (ZeRO): every process takes part
        if not self.accelerator.is_main_process:
            return checkpoint.checkpoint_dir(self.run_dir, step)
        cfg, ck = self.cfg, self.cfg.checkpoint
        meta = {
            "epoch": step / self.shape.steps_per_epoch,
            "total_steps": self.shape.total_steps,
            "tokens_seen": state.tokens_seen,
            "rules": rules,
            "metrics": metrics,
            **extra,
            **({"init_from": self.init_from} if self.init_from else {}),
            "config_hash": config_hash(cfg),
            "config": effective_dump(cfg),
            "resolved": self.resolved,
            "data_fingerprint": self.data_fingerprint,
        }
        path = checkpoint.save(
            self.run_dir,
            step,
            lambda d: save_weights(self.model, self.tokenizer, d, cfg.objective, tensors),
            checkpoint.capture_state(optimizer_state, state.to_json()),
            meta,
            saved_bytes(self.model),
        )
        self.out.say(f"checkpoint: {path} ({', '.join(rules)})")
        best_step = state.best.best_step if state.best else None
        if state.best and best_step == step:  # after the checkpoint is complete: best.json never names a partial one
            write_best(self.run_dir, state.best)
            self.out.say(f"best: step {step}, {state.best.metric} {state.best.best_value:.6g}")
        if self.uploader:
            self.uploader.submit(path)
        if self.exporter:
            self.exporter.submit(path)
        busy = (self.uploader.busy() if self.uploader else set()) | (self.exporter.busy() if self.exporter else set())
        for line in checkpoint.retain(self.run_dir, ck.num_keep_last, ck.keep_schedule, ck.keep_optimizer_state, busy, best_step):
            self.out.say(f"retention: {line}")
        return path
