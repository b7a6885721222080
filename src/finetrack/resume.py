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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError

log = logging.getLogger("finetrack")

# Config keys that may change between the run that wrote a checkpoint and the run that resumes it.
HARMLESS_PREFIXES = ("train.max_steps", "train.num_epochs", "train.log_every_steps", "eval.", "checkpoint.", "output.")
FRESH_ENV = "FINETRACK_FRESH"


@dataclass(frozen=True)
class Request:
    """What the user asked for on the command line (or through FINETRACK_FRESH)."""

    fresh: bool = False
    delete_remote: bool = False
    resume_from: str | None = None
    allow_config_change: bool = False

    @classmethod
    def from_env(cls, **kwargs) -> "Request":
        fresh = kwargs.pop("fresh", False) or os.environ.get(FRESH_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(fresh=fresh, **kwargs)

    def __post_init__(self) -> None:
        if self.delete_remote and not self.fresh:
            raise ConfigError("--delete-remote only goes with --fresh (it deletes the remote checkpoints of the previous run)")
        if self.fresh and self.resume_from:
            raise ConfigError("--fresh and --resume-from contradict each other: choose one")


def find_start(run_dir: Path, remote: str | None, request: Request, warn: Callable[[str], None] = log.warning) -> Path | None:
    """The checkpoint folder to resume from, or None to start at step 0 (after --fresh has moved old files aside)."""
    if request.fresh:
        _start_over(run_dir, remote, request.delete_remote)
        return None
    if request.resume_from:
        return _explicit(request.resume_from, run_dir)
    found = checkpoint.newest_resumable(run_dir, warn)
    if found:
        return found.path
    if remote:
        from . import storage

        pulled = storage.pull_newest_resumable(remote, run_dir, warn)
        if pulled:
            log.info("resuming from the remote copy %s/checkpoints/%s", storage.redact(remote), pulled.name)
            return pulled
    leftovers = [d.name for d in (run_dir / "checkpoints").glob("step-*")] if (run_dir / "checkpoints").is_dir() else []
    if leftovers:
        raise ConfigError(
            f"{run_dir}/checkpoints holds {len(leftovers)} checkpoint(s) but none can be resumed (see the warnings above): "
            "fix or remove them, resume another one with --resume-from PATH, or start over with --fresh"
        )
    return None


def _explicit(spec: str, run_dir: Path) -> Path:
    """--resume-from: a checkpoint folder, a run directory (its newest checkpoint), or a remote checkpoint URL."""
    if "://" in spec:
        from . import storage

        root, _, name = spec.rstrip("/").rpartition("/checkpoints/")
        step = checkpoint.parse_step(name)
        if not root or step is None:
            raise ConfigError(f"--resume-from {storage.redact(spec)}: a remote path must end in /checkpoints/step-NNNNNN")
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
    return path


def _start_over(run_dir: Path, remote: str | None, delete_remote: bool) -> None:
    """--fresh: move the previous run's files aside (never deleted locally); remote ones only with --delete-remote."""
    if remote:
        from . import storage

        if delete_remote:
            n = storage.delete_remote_checkpoints(remote)
            log.info("--fresh --delete-remote: deleted %d remote checkpoint(s) under %s", n, storage.redact(remote))
        elif storage.remote_steps(remote):
            raise ConfigError(
                f"--fresh: {storage.redact(remote)} still holds the previous run's checkpoints, which a later resume would pick up. "
                "Add --delete-remote to delete them, or set checkpoint.remote to a new URL"
            )
    old = [p for p in run_dir.iterdir() if p.name != "superseded"] if run_dir.is_dir() else []
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir / "superseded" / stamp
    n = 1
    while aside.exists():  # two --fresh starts in the same second
        aside, n = run_dir / "superseded" / f"{stamp}-{n}", n + 1
    aside.mkdir(parents=True)
    for p in old:
        p.rename(aside / p.name)
    log.info("--fresh: moved the previous run's %d file(s)/folder(s) to %s", len(old), aside)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(saved: dict, current: dict, saved_data: str | None, current_data: str, allow_change: bool, source: Path) -> list[str]:
    """Compare the checkpoint's config with this run's. Returns the accepted changes, one line each;
    raises ConfigError listing the others unless allow_change (then they are returned too)."""
    old, new = _flatten(saved), _flatten(current)
    changes = [(k, old.get(k, "(unset)"), new.get(k, "(unset)")) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
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


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop metrics.jsonl lines written after the checkpoint we resume from (they will be logged again); returns how many."""
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
    checkpoint.write_atomic(path, "".join(x + "\n" for x in keep))
    return len(lines) - len(keep)
