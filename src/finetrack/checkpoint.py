"""Checkpoints: format, integrity, listing and retention.

    checkpoints/step-000047/
      adapter_model.safetensors adapter_config.json | model.safetensors config.json   (weights, own library's format)
      tokenizer files
      trainer_state.safetensors + trainer_state.json   optimizer tensors | everything else (no pickle)
      meta.json        step, epoch, metrics, config, config hash, versions, git sha, data fingerprint
      MANIFEST.json    size and sha256 of every other file; written last

A checkpoint is built under a hidden temporary name, every file fsynced, then renamed into place:
a folder named `step-*` with a MANIFEST.json that verifies is complete, anything else is ignored.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# The torch-free half (folder names, manifest checks, small-file writes) lives in rundir.py, which report and gate use.
from .rundir import (  # noqa: F401  (re-exported: callers import them from here)
    MANIFEST,
    MANIFEST_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    checkpoint_dir,
    fsync_path,
    is_resumable,
    parse_manifest,
    parse_step,
    read_manifest,
    read_meta,
    sha256_file,
    size_text,
    step_folders,
    stray_step_folders,
    verify,
    write_atomic,
)

log = logging.getLogger("finetrack")

# The schema of trainer_state.json (train_state.TrainState plus rng and optimizer trees): bump the number when its layout changes.
_STATE_FAMILY = "finetrack-trainer-state/"
STATE_FORMAT = f"{_STATE_FAMILY}1"
_VERSIONED = ("finetrack", "torch", "transformers", "peft", "accelerate", "bitsandbytes")
# Rules whose checkpoints are the science (kept unless keep_schedule=false); the others roll.
SCHEDULE_RULES = frozenset({"first_epoch", "per_epoch", "steps", "log_spaced"})
WEIGHTS_FILES = "its weights and tokenizer files"  # what write_weights writes (save_pretrained's own file names)


# ------------------------------------------------------------------------------------ integrity
def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, then the folder: done before it gets its `step-*` name, so a crash leaves no holes in one."""
    for f in folder.rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(folder)


def manifest_for(folder: Path, step: int) -> dict:
    """Size and sha256 of every file in a checkpoint folder (subfolders included), MANIFEST.json excepted."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return {"format": MANIFEST_FORMAT, "step": step, "files": files}


# -------------------------------------------------------------------------------- trainer state
def _to_tree(obj: Any, key: str, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> Any:
    """JSON tree with tensors replaced by references into `tensors` (shared tensors stored once)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if ident in seen:
            return {"__tensor__": seen[ident]}
        tensors[key] = t.cpu().contiguous()
        if ident:
            seen[ident] = key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_tree(v, f"{key}/{k}", tensors, seen) for k, v in obj.items()}
        # optimizer state is keyed by parameter index: keep the key types
        return {"__items__": [[k, _to_tree(v, f"{key}/{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_to_tree(v, f"{key}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    raise TypeError(f"trainer state at {key}: cannot store {type(obj).__name__} without pickle")


def _from_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]].clone()  # shared entries become separate tensors
        if "__items__" in tree:
            return {k: _from_tree(v, tensors) for k, v in tree["__items__"]}
        return {k: _from_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_from_tree(v, tensors) for v in tree]
    return tree


def rng_state() -> dict:
    """Every random generator training can touch: python, numpy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch_cpu": torch.get_rng_state(),
        # this process's own GPU only: every process seeds and consumes it alike, and the GPU count may differ on resume
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch_cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def capture_state(optimizer_state: dict, progress: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json tree, trainer_state.safetensors tensors) for the state after an optimizer step.

    `optimizer_state` is `optimizer.state_dict()` (or its gathered equivalent, sharding.py); `progress` is plain data
    from the loop (step, data position, tokens seen, schedule inputs, ...).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tree = {
        "format": STATE_FORMAT,
        **progress,
        "rng": _to_tree(rng_state(), "rng", tensors, seen),
        "optimizer": _to_tree(optimizer_state, "optimizer", tensors, seen),
    }
    return tree, tensors


# what the loop reads back from trainer_state.json, beside the optimizer and RNG trees
_STATE_KEYS = {"step": int, "optimizer": dict, "rng": dict}


def read_state_tree(folder: Path) -> dict:
    """trainer_state.json of a checkpoint, checked for the entries a resume reads (JSON only: no tensor is loaded)."""
    path = Path(folder) / STATE_JSON
    try:
        tree = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    written = tree.get("format") if isinstance(tree, dict) else None
    if isinstance(written, str) and written.startswith(_STATE_FAMILY) and written != STATE_FORMAT:
        # another schema version of ours: name both, the fix is a finetrack version that reads it (or --fresh)
        raise CheckpointError(
            f"{path}: trainer state schema {written}, but this finetrack reads {STATE_FORMAT}: "
            "resume it with the finetrack version that wrote it, or start over with --fresh"
        )
    if written != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a finetrack trainer state (format {STATE_FORMAT})")
    bad = [k for k, kind in _STATE_KEYS.items() if not isinstance(tree.get(k), kind) or isinstance(tree.get(k), bool)]
    if bad:
        raise CheckpointError(f"{path}: missing or malformed {', '.join(bad)}")
    return tree


def check_resumable(folder: Path) -> dict:
    """The meta.json of a checkpoint about to be resumed, after checking what a resume reads from it and from
    trainer_state.json (no tensor is loaded: this runs before the model is). CheckpointError names the file."""
    meta = read_meta(folder)
    where = Path(folder) / "meta.json"
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) or meta["step"] < 0:
        raise CheckpointError(f"{where}: no valid 'step' (a whole number)")
    for key in ("config", "resolved"):
        if not isinstance(meta.get(key, {}), dict):
            raise CheckpointError(f"{where}: '{key}' is not an object")
    if "config" not in meta:
        raise CheckpointError(f"{where}: no 'config' (the settings the run was trained with)")
    read_state_tree(folder)
    try:  # the header only: the tensors load after the model
        with safe_open(Path(folder) / STATE_TENSORS, "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"{Path(folder) / STATE_TENSORS}: not a readable safetensors file ({e})") from None
    return meta


def restore_state(folder: Path, load_optimizer: Callable[[dict], Any]) -> dict:
    """Load optimizer state (`load_optimizer(state_dict)`: optimizer.load_state_dict, or sharding's) and every RNG
    from a checkpoint; returns the loop's progress entries."""
    folder = Path(folder)
    tree = read_state_tree(folder)
    try:
        tensors = load_file(folder / STATE_TENSORS)
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"{folder / STATE_TENSORS}: not a readable safetensors file ({e})") from None
    try:
        load_optimizer(_from_tree(tree.pop("optimizer"), tensors))
        set_rng_state(_from_tree(tree.pop("rng"), tensors))
    except (ValueError, KeyError, TypeError, IndexError) as e:  # a tree that names tensors the file lacks, or of the wrong shape
        raise CheckpointError(
            f"{folder / STATE_JSON}: optimizer or RNG state does not fit this model's trainable parameters ({e})"
        ) from None
    return tree


# ----------------------------------------------------------------------------------------- save
def package_versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
    """Installed versions of `names` (those not installed are left out)."""
    out = {}
    for name in names:
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
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def save(
    run_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    state: tuple[dict, dict[str, torch.Tensor]] | None,
    meta: dict,
    weights_bytes: int = 0,
) -> Path:
    """Write checkpoint `step` atomically: temp folder, every file fsynced, manifest last, rename.

    write_weights(folder) writes the weights and tokenizer (about `weights_bytes`); `state` is `capture_state(...)`
    output. A write the storage refuses (full disk, quota, size limit) removes the partial folder and raises one
    CheckpointError naming the file, the space needed and the space free.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    writing = WEIGHTS_FILES
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_weights(tmp)
        if state is not None:
            tree, tensors = state
            writing = STATE_TENSORS
            save_file(tensors, tmp / STATE_TENSORS, metadata={"format": STATE_FORMAT})
            writing = STATE_JSON
            (tmp / STATE_JSON).write_text(json.dumps(tree) + "\n")
        writing = "meta.json"
        meta = {
            "step": step,
            **meta,
            "versions": package_versions(),
            "git_sha": git_sha(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        writing = MANIFEST
        (tmp / MANIFEST).write_text(json.dumps(manifest_for(tmp, step), indent=2) + "\n")
        writing = "its files (flushing them to disk)"
        fsync_tree(tmp)
    except Exception as e:  # safetensors and tokenizers (Rust) report a full disk as their own error types
        if os_error_code(e) is None:
            raise
        written = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
        if isinstance(e, OSError) and e.filename:  # Python names the file it could not write
            writing = str(Path(e.filename).relative_to(tmp)) if Path(e.filename).is_relative_to(tmp) else e.filename
        state_bytes = sum(t.numel() * t.element_size() for t in state[1].values()) if state else 0
        needed_bytes = max(sum(p.stat().st_size for p in written), weights_bytes + state_bytes)
        shutil.rmtree(tmp, ignore_errors=True)  # the partial write goes; the previous checkpoint was never touched
        where = f"{final} ({writing})" if " " in writing else f"{final}/{writing}"  # a description, or a file name
        raise CheckpointError(_checkpoint_write_failed(run_dir, step, where, e, needed_bytes)) from None
    if final.exists():  # the same step written again (a re-run after a crash): the new one replaces it
        discard(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


# errno values that mean "the storage refused a write", not a bug: full disk, quota, file size limit, read-only, I/O error
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def os_error_code(e: BaseException) -> int | None:
    """The errno of a failed write: from an OSError, or from the text of the errors safetensors and tokenizers
    (Rust) raise, which carry it as `os error 28` / `code: 28`. None for anything else."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)|code: (\d+)", str(e))
    return int(found.group(1) or found.group(2)) if found else None


def is_write_error(e: OSError) -> bool:
    return e.errno in _WRITE_ERRNOS


def _free_text(run_dir: Path) -> str:
    try:
        return f"{size_text(shutil.disk_usage(run_dir).free)} is free"
    except OSError:
        return "the free space is unknown"


def write_error_text(run_dir: Path, e: OSError) -> str:
    """One line for a write into the run directory that the storage refused (metrics, samples, run files)."""
    what = e.filename or "a file of the run directory"
    return (
        f"writing {what} failed: {e.strerror or e}; {_free_text(run_dir)} on the file system of {run_dir}. "
        "Free space (or fix the storage), then run the same command again: it resumes from the newest checkpoint"
    )


def _checkpoint_write_failed(run_dir: Path, step: int, where: str, e: Exception, needed_bytes: int) -> str:
    code = os_error_code(e)
    previous = [d for s, d in step_folders(run_dir) if s < step]
    try:
        previous_bytes = sum(f["size"] for f in read_manifest(previous[-1])["files"].values()) if previous else 0
    except CheckpointError:
        previous_bytes = 0
    need = (
        f"{size_text(previous_bytes)} (the size of {previous[-1].name})"
        if previous_bytes
        else f"{size_text(needed_bytes)} (weights and optimizer state)"
    )
    keep = f"the previous checkpoint {previous[-1].name} is untouched" if previous else "no earlier checkpoint exists"
    return (
        f"writing checkpoint step {step} failed at {where}: {os.strerror(code) if code else e}. A checkpoint needs about {need}; "
        f"{_free_text(run_dir)} on the file system of {run_dir}; {keep}. Free space (or keep fewer checkpoints), "
        "then run the same command again: it resumes from the newest complete checkpoint"
    )


def discard(folder: Path) -> None:
    """Delete a checkpoint folder; its manifest goes first, so a crash midway leaves an incomplete one, never a wrong one."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder)


# -------------------------------------------------------------------------------------- listing
@dataclass
class Found:
    step: int
    path: Path
    meta: dict


def complete_checkpoints(run_dir: Path, warn: Callable[[str], None] = log.warning) -> list[Found]:
    """Checkpoints of a run whose manifest verifies (sizes: cheap enough to list often), oldest first; the others are named through warn()."""
    for d in stray_step_folders(run_dir):
        warn(f"ignoring checkpoints/{d.name}: not a checkpoint folder name (step-NNNNNN, six digits or more); rename it if it is one")
    found = []
    for step, d in step_folders(run_dir):
        try:
            verify(d, full=False)
            found.append(Found(step, d, read_meta(d)))
        except CheckpointError as e:
            warn(f"skipping checkpoint {d.name}: {e}")
    return found


def newest_resumable(run_dir: Path, warn: Callable[[str], None] = log.warning) -> Found | None:
    """The newest checkpoint that fully verifies (sha256) and holds resume state; bad ones are named and skipped."""
    for step, d in reversed(step_folders(run_dir)):
        try:
            if is_resumable(verify(d, full=True)):
                return Found(step, d, check_resumable(d))
            warn(f"skipping checkpoint {d.name}: weights only (its resume state was removed by checkpoint.keep_optimizer_state=last)")
        except CheckpointError as e:
            warn(f"skipping checkpoint {d.name}: {e}")
    return None


# ------------------------------------------------------------------------------------ retention
def retain(
    run_dir: Path,
    num_keep_last: int | None,
    keep_schedule: bool,
    keep_optimizer_state: str,
    busy: set[Path] = frozenset(),
    best_step: int | None = None,
) -> list[str]:
    """Apply the retention policy to the complete checkpoints of a run; returns what was done, one line each.

    What is kept is the union of:
    1. the newest complete checkpoint (a resume continues from it), and any folder in `busy` (still being uploaded);
    2. the best checkpoint (`best_step`, checkpoint.best), while it is the best;
    3. the schedule's checkpoints (rules first_epoch, per_epoch, steps, log_spaced) unless keep_schedule=false;
    4. the newest num_keep_last of the other, rolling ones (every_steps, signal, a stop; the newest and the best
       count among them when they are rolling ones); None keeps them all.
    A checkpoint written only because it was the best (its one rule "best") is deleted once another is better:
    it is not a rolling one. With keep_optimizer_state=last, older checkpoints lose their resume state but keep their
    weights.
    """
    found = complete_checkpoints(run_dir, warn=lambda _: None)
    if not found:
        return []
    older = found[:-1]  # the newest is never touched
    done = []
    for f in [f for f in older if f.meta.get("rules") == ["best"] and f.step != best_step]:
        if f.path not in busy:
            discard(f.path)
            done.append(f"deleted {f.path.name} (saved as the best; step {best_step} is better now)")
    older = [f for f in older if f.path.exists()]
    rolling = [f for f in older if not (keep_schedule and SCHEDULE_RULES & set(f.meta.get("rules", [])))]
    if num_keep_last is not None:
        keep_rolling = max(num_keep_last - 1, 0)  # the newest counts as one of the last N (and so may the best)
        doomed = rolling[: max(0, len(rolling) - keep_rolling)]
        for f in doomed:
            if f.path not in busy and f.step != best_step:
                discard(f.path)
                done.append(f"deleted {f.path.name} (checkpoint.num_keep_last={num_keep_last})")
        older = [f for f in older if f.path.exists()]
    if keep_optimizer_state == "last":
        for f in older:
            if f.path not in busy and (f.path / STATE_TENSORS).exists():
                drop_resume_state(f.path)
                done.append(f"removed resume state from {f.path.name} (checkpoint.keep_optimizer_state=last)")
    return done


def drop_resume_state(folder: Path) -> None:
    """Keep a checkpoint's weights, remove its optimizer/RNG state: the manifest is rewritten first."""
    manifest = read_manifest(folder)
    for name in (STATE_JSON, STATE_TENSORS):
        manifest["files"].pop(name, None)
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for name in (STATE_JSON, STATE_TENSORS):
        (folder / name).unlink(missing_ok=True)
