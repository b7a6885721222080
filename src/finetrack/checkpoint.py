"""Checkpoints: `checkpoints/step-000047/`, written under a temporary name and renamed when complete.

Each folder holds weights in their own library's format (a PEFT adapter or a transformers model,
safetensors only), the tokenizer, and `meta.json` describing where in training it was taken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from torch import nn

from .models import save_weights

_VERSIONED = ("finetrack", "torch", "transformers", "peft", "accelerate", "bitsandbytes")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def is_checkpoint_step(step: int, total_steps: int, every_steps: int | None) -> bool:
    """The last step is always saved; every_steps adds periodic ones."""
    return step == total_steps or (every_steps is not None and step % every_steps == 0)


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    """The commit of the directory the run was started from (the user's experiment code), if it is a git checkout."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def save(model: nn.Module, tokenizer, run_dir: Path, step: int, meta: dict) -> Path:
    """Write a checkpoint atomically: build it in a hidden temp folder, fsync, rename."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tokenizer, tmp)
    meta = {"step": step, **meta, "versions": package_versions(), "git_sha": git_sha(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again by a re-run: the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final
