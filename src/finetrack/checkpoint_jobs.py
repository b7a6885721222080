"""What happens to a checkpoint after training wrote it, in the background: the upload (checkpoint.remote), the
exports (checkpoint.export), then retention of what they held back. Started and finished by train.run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import CheckpointConfig, Config

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
