"""Where a run starts: step 0, or a checkpoint (local, remote, or another run's), and whether the
config allows it.

One rule: run the same command on the same output directory and it continues. `--fresh` starts
over (old files moved aside, never deleted), `--resume-from PATH` continues another run's
checkpoint, and a bad explicit path is an error, never a silent restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, rundir, runlock
from .checkpoint import CheckpointError
from .config import Config, ConfigError, harmless_on_resume_prefixes
from .schema import flatten

log = logging.getLogger("finetrack")

# Config keys that may change between the run that wrote a checkpoint and the run that resumes it (run length,
# logging, samples, trackers, checkpoints, eval, output): marked on each field (Knob harmless_on_resume, config.py).
HARMLESS_PREFIXES = harmless_on_resume_prefixes(Config)
FRESH_ENV = "FINETRACK_FRESH"


@dataclass(frozen=True)
class Request:
    """What the user asked for on the command line (or through FINETRACK_FRESH)."""

    fresh: bool = False
    delete_remote: bool = False
    resume_from: str | None = None
    allow_config_change: bool = False

    @classmethod
    def from_env(cls, **kwargs) -> Request:
        fresh = kwargs.pop("fresh", False) or os.environ.get(FRESH_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(fresh=fresh, **kwargs)

    def __post_init__(self) -> None:
        if self.delete_remote and not self.fresh:
            raise ConfigError("--delete-remote only goes with --fresh (it deletes the remote checkpoints of the previous run)")
        if self.fresh and self.resume_from:
            raise ConfigError("--fresh and --resume-from contradict each other: choose one")
        if self.resume_from and _names_best(self.resume_from):
            raise ConfigError(_best_refusal(self.resume_from))


def _names_best(spec: str) -> bool:
    """Does --resume-from point at a run's best checkpoint (RUN/best, RUN/checkpoints/best, .../best.json)? A local
    folder named best that is a run directory or a checkpoint folder is taken as what it is."""
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    if name == rundir.BEST_FILE:
        return True
    if name != rundir.BEST:
        return False
    local = Path(spec)
    return "://" in spec or not ((local / rundir.CHECKPOINTS_DIR).is_dir() or (local / rundir.MANIFEST).is_file())


def _best_refusal(spec: str) -> str:
    """Why resuming "the best" is refused, and what the user may have meant, with the run's own paths where known."""
    from .redact import redact

    run = spec.rstrip("/").rpartition("/")[0]
    run = "" if run == rundir.CHECKPOINTS_DIR else run.removesuffix(f"/{rundir.CHECKPOINTS_DIR}")
    if "://" in spec:  # a remote checkpoint is resumed by its URL only
        run = redact(run)
        return (
            f"--resume-from {redact(spec)}: resume continues a checkpoint: --resume-from {run}/checkpoints/step-NNNNNN "
            f"(the best's step is in {run}/checkpoints/best.json); to start a new run from the best weights, set "
            f"model.init_from: {run}/checkpoints/step-NNNNNN in a new config (a warm start)"
        )
    try:
        best = rundir.read_best(Path(run or "."))
    except rundir.CheckpointError:
        best = None
    label = run or "RUN"
    where = (
        f"{rundir.checkpoint_dir(Path(run or '.'), best['step'])}, named by checkpoints/best.json"
        if best is not None
        else f"{label}/checkpoints/step-NNNNNN, the step its checkpoints/best.json names"
    )
    return (
        f"--resume-from {spec}: resume continues the newest checkpoint of a run: --resume-from {label} (or its "
        f"checkpoints/step-NNNNNN); to start a new run from the best weights ({where}), set model.init_from: {label}:best "
        f"in a new config (a warm start), or evaluate it: `finetrack eval {label} --steps best`"
    )


def find_start(run_dir: Path, remote: str | None, request: Request, warn: Callable[[str], None] = log.warning) -> Path | None:
    """The checkpoint folder to resume from, or None to start at step 0 (after --fresh has moved old files aside).

    Order: the run directory's own newest verified checkpoint (so re-running a command that has
    --resume-from continues where it got to), then --resume-from, then the remote copy. Local
    checkpoints newer than the chosen one (unusable ones that were skipped) are moved aside, so
    retention and later resumes only see the checkpoints of this line of training.
    """
    _sweep_temp_folders(run_dir)
    if request.fresh:
        _start_over(run_dir, remote, request.delete_remote)
        return None
    found = checkpoint.newest_resumable(run_dir, warn)
    if found and request.resume_from:
        log.info(
            "--resume-from ignored: %s already has its own checkpoint %s (the same command run again continues from there)",
            run_dir,
            found.path.name,
        )
    start = (
        found.path
        if found
        else _explicit(request.resume_from, run_dir)
        if request.resume_from
        else _from_remote(remote, run_dir, warn)
        if remote
        else None
    )
    if start is None:
        leftovers = checkpoint.step_folders(run_dir)
        if leftovers:
            raise ConfigError(
                f"{run_dir}/checkpoints holds {len(leftovers)} checkpoint(s) but none can be resumed (see the warnings above): "
                "fix or remove them, resume another one with --resume-from PATH, or start over with --fresh"
            )
        return None
    _set_aside_newer(run_dir, checkpoint.check_resumable(start)["step"])
    return start


def _from_remote(remote: str, run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete remote checkpoint, downloaded; an error (never a restart from step 0) if the remote has
    checkpoints but none could be used or the remote cannot be read."""
    from . import storage

    try:
        steps = storage.remote_steps(remote)
        # the run's history first (metrics.jsonl, ...; trimmed to the resumed step later): a local log that began at
        # the resumed step would replace the remote one at the next upload. First, so that a failed checkpoint
        # download, retried by running again, still finds the history here.
        fetched = storage.pull_logs(remote, run_dir) if steps else []
        if fetched:
            log.info("fetched %s from %s", ", ".join(fetched), storage.redact(remote))
        pulled = storage.pull_newest_resumable(remote, run_dir, warn) if steps else None
    except Exception as e:  # every fsspec backend has its own error types (network, credentials, permissions)
        raise ConfigError(
            f"checkpoint.remote: cannot read {storage.redact(remote)}: {storage.describe_error(e, remote)}. "
            "Check the network and credentials and run the same command again"
        ) from None
    if steps and not pulled:
        raise ConfigError(
            f"checkpoint.remote: {storage.redact(remote)} holds {len(steps)} checkpoint(s) but none could be downloaded "
            "and verified (see the warnings above); run again to retry, or start over with --fresh --delete-remote"
        )
    if pulled:
        log.info("resuming from the remote copy %s/checkpoints/%s", storage.redact(remote), pulled.name)
    return pulled


def _sweep_temp_folders(run_dir: Path) -> None:
    """Temporary checkpoint folders are incomplete by construction (a crash mid-write): free their disk."""
    for tmp in (run_dir / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s (a checkpoint write that never finished)", tmp)
    for tmp in (run_dir / "checkpoints").glob(f".tmp-{rundir.BEST_FILE}-*"):  # best.json's atomic write, killed (the run is locked)
        tmp.unlink(missing_ok=True)


def _set_aside_newer(run_dir: Path, step: int) -> None:
    newer = [d for s, d in checkpoint.step_folders(run_dir) if s > step]
    if newer:
        aside = _aside_dir(run_dir) / "checkpoints"
        aside.mkdir(parents=True)
        for d in newer:
            d.rename(aside / d.name)
        log.warning("moved %d checkpoint(s) after step %d that cannot be resumed to %s", len(newer), step, aside)


def _explicit(spec: str, run_dir: Path) -> Path:
    """--resume-from: a checkpoint folder, a run directory (its newest checkpoint), or a remote checkpoint URL."""
    if "://" in spec:
        from . import storage

        found = rundir.split_checkpoint_url(spec)
        if found is None:
            raise ConfigError(f"--resume-from {storage.redact(spec)}: a remote path must end in /checkpoints/step-NNNNNN")
        root, step = found
        try:
            return storage.pull_checkpoint(root, step, run_dir)
        except (CheckpointError, OSError, ValueError) as e:
            raise ConfigError(f"--resume-from {storage.redact(spec)}: {e}") from None
    path = Path(spec)
    if (path / "checkpoints").is_dir():
        found = checkpoint.newest_resumable(path)
        if not found:
            raise ConfigError(f"--resume-from {path}: this run directory has no complete checkpoint with resume state")
        return found.path
    if not path.is_dir():
        raise ConfigError(f"--resume-from {path}: no such checkpoint folder or run directory")
    try:
        manifest = checkpoint.verify(path, full=True)
    except CheckpointError as e:
        raise ConfigError(f"--resume-from {path}: {e}") from None
    if not checkpoint.is_resumable(manifest):
        raise ConfigError(f"--resume-from {path}: weights only (its resume state was removed); evaluate it, or resume a newer checkpoint")
    try:
        checkpoint.check_resumable(path)
    except CheckpointError as e:
        raise ConfigError(f"--resume-from {path}: {e}") from None
    return path


def _start_over(run_dir: Path, remote: str | None, delete_remote: bool) -> None:
    """--fresh: move the previous run's files aside (never deleted locally); remote ones only with --delete-remote."""
    if remote:
        from . import storage

        try:
            n = storage.delete_remote_checkpoints(remote) if delete_remote else 0
            remaining = [] if delete_remote else storage.remote_steps(remote)
        except Exception as e:  # every fsspec backend has its own error types
            raise ConfigError(f"--fresh: cannot read {storage.redact(remote)}: {storage.describe_error(e, remote)}") from None
        if delete_remote:
            log.info("--fresh --delete-remote: deleted %d remote checkpoint(s) under %s", n, storage.redact(remote))
        elif remaining:
            raise ConfigError(
                f"--fresh: {storage.redact(remote)} still holds the previous run's checkpoints, which a later resume would pick up. "
                "Add --delete-remote to delete them, or set checkpoint.remote to a new URL"
            )
    # the lock stays: moved aside, a second process would create and lock a new file of the same name
    old = [p for p in run_dir.iterdir() if p.name not in ("superseded", runlock.LOCK_FILE)] if run_dir.is_dir() else []
    if not old:
        return
    aside = _aside_dir(run_dir)
    aside.mkdir(parents=True)
    for p in old:
        p.rename(aside / p.name)
    log.info("--fresh: moved the previous run's %d file(s)/folder(s) to %s", len(old), aside)


def _aside_dir(run_dir: Path) -> Path:
    """RUN_DIR/superseded/<time>: where files that are not deleted but no longer used go."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir / "superseded" / stamp, 1
    while aside.exists():  # twice in the same second
        aside, n = run_dir / "superseded" / f"{stamp}-{n}", n + 1
    return aside


_DEFAULTS = flatten(Config().model_dump(mode="json"))


# settings added after runs were written, with the value those runs had in effect: a checkpoint without the key
# resumes under that value without a config change
_BEFORE_THEY_EXISTED = {"model.mixed_precision": "none"}


def _differs(key: str, old: dict, new: dict) -> bool:
    """Does `key` differ between two flattened dumps? A key written on one side only, at its default, does not: the
    dump leaves out settings that have no effect, and which ones has changed between versions (e.g. data.split on files)."""
    if key in old and key in new:
        return old[key] != new[key]
    if key in new and key in _BEFORE_THEY_EXISTED:
        return new[key] != _BEFORE_THEY_EXISTED[key]
    written = old if key in old else new
    return key not in _DEFAULTS or written[key] != _DEFAULTS[key]


def check_config(saved: dict, current: dict, saved_data: str | None, current_data: str, allow_change: bool, source: Path) -> list[str]:
    """Compare the checkpoint's config with this run's. Returns the accepted changes, one line each;
    raises ConfigError listing the others unless allow_change (then they are returned too)."""
    old, new = flatten(saved), flatten(current)
    changes = [(k, old.get(k, "(unset)"), new.get(k, "(unset)")) for k in sorted(set(old) | set(new)) if _differs(k, old, new)]
    harmless = [f"{k}: {a} -> {b}" for k, a, b in changes if k.startswith(HARMLESS_PREFIXES)]
    blocking = [f"{k}: {a} -> {b}" for k, a, b in changes if not k.startswith(HARMLESS_PREFIXES)]
    if saved_data and saved_data != current_data:
        blocking.append(f"training data (tokenized rows) fingerprint: {saved_data} -> {current_data}")
    if blocking and not allow_change:
        raise ConfigError(
            f"cannot resume from {source}: these settings differ from the run that wrote it:\n  "
            + "\n  ".join(blocking)
            + "\nrestore them, start over with --fresh, or pass --allow-config-change to continue anyway"
        )
    return harmless + [f"{line} (allowed by --allow-config-change)" for line in blocking]


def trim_log(path: Path, last_step: int) -> int:
    """Drop the lines of a run's JSONL log (metrics.jsonl, samples.jsonl) whose "step" is after `last_step`, the
    step we resume from (those steps run and are logged again; -1 on a fresh start drops step 0 too); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a crash
    if len(keep) < len(lines):  # rewritten only when something goes
        checkpoint.write_atomic(path, "".join(x + "\n" for x in keep))
    return len(lines) - len(keep)
