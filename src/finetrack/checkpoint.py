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

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("finetrack")

MANIFEST = "MANIFEST.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
MANIFEST_FORMAT, STATE_FORMAT = "finetrack-checkpoint/1", "finetrack-trainer-state/1"
_VERSIONED = ("finetrack", "torch", "transformers", "peft", "accelerate", "bitsandbytes")
# Rules whose checkpoints are the science (kept unless keep_schedule=false); the others roll.
SCHEDULE_RULES = frozenset({"first_epoch", "per_epoch", "steps", "log_spaced"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """`step-000047` -> 47; anything else (temporary folders, stray files) -> None."""
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


# ------------------------------------------------------------------------------------ integrity
def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, then the folder: done before it gets its `step-*` name, so a crash leaves no holes in one."""
    for f in folder.rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(folder)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or a signal while starting: leave no stray temporary file
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def manifest_for(folder: Path, step: int) -> dict:
    """Size and sha256 of every file in a checkpoint folder (subfolders included), MANIFEST.json excepted."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return {"format": MANIFEST_FORMAT, "step": step, "files": files}


def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest's content, checked: our format, and only files inside the checkpoint folder. `where` names it in errors."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{where}: not a finetrack manifest (format {MANIFEST_FORMAT})")
    if any(PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts for rel in manifest["files"]):
        raise CheckpointError(f"{where}: lists files outside the checkpoint folder")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointError naming the file if it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was not completely written)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return parse_manifest(raw, str(path))


def verify(folder: Path, full: bool = True) -> dict:
    """Check every file the manifest lists: present, same size and (with full=True) same sha256.

    Returns the manifest; raises CheckpointError naming the first bad file. Files the manifest does
    not list are ignored (never read).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST} says {want['size']} (truncated or overwritten)")
        if full and sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"{path}: sha256 does not match {MANIFEST} (corrupted)")
    return manifest


def is_resumable(manifest: dict) -> bool:
    return STATE_JSON in manifest["files"] and STATE_TENSORS in manifest["files"]


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


def capture_state(optimizer: torch.optim.Optimizer, progress: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json tree, trainer_state.safetensors tensors) for the state after an optimizer step.

    `progress` is plain data from the loop (step, data position, tokens seen, schedule inputs, ...).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tree = {
        "format": STATE_FORMAT,
        **progress,
        "rng": _to_tree(rng_state(), "rng", tensors, seen),
        "optimizer": _to_tree(optimizer.state_dict(), "optimizer", tensors, seen),
    }
    return tree, tensors


def restore_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Load optimizer state and every RNG from a checkpoint; returns the loop's progress entries."""
    folder = Path(folder)
    try:
        tree = json.loads((folder / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / STATE_JSON}: unreadable ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder / STATE_JSON}: not a finetrack trainer state (format {STATE_FORMAT})")
    try:
        tensors = load_file(folder / STATE_TENSORS)
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"{folder / STATE_TENSORS}: not a readable safetensors file ({e})") from None
    try:
        optimizer.load_state_dict(_from_tree(tree.pop("optimizer"), tensors))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / STATE_JSON}: optimizer state does not fit this model's trainable parameters ({e})") from None
    set_rng_state(_from_tree(tree.pop("rng"), tensors))
    return tree


# ----------------------------------------------------------------------------------------- save
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
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def save(
    run_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    state: tuple[dict, dict[str, torch.Tensor]] | None,
    meta: dict,
) -> Path:
    """Write checkpoint `step` atomically: temp folder, every file fsynced, manifest last, rename.

    write_weights(folder) writes the weights and tokenizer; `state` is `capture_state(...)` output.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    if state is not None:
        tree, tensors = state
        save_file(tensors, tmp / STATE_TENSORS, metadata={"format": STATE_FORMAT})
        (tmp / STATE_JSON).write_text(json.dumps(tree) + "\n")
    meta = {"step": step, **meta, "versions": package_versions(), "git_sha": git_sha(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / MANIFEST).write_text(json.dumps(manifest_for(tmp, step), indent=2) + "\n")
    fsync_tree(tmp)
    if final.exists():  # the same step written again (a re-run after a crash): the new one replaces it
        discard(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


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


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / 'meta.json'}: unreadable ({e})") from None


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-*` folder, complete or not, by step."""
    found = ((parse_step(d.name), d) for d in (Path(run_dir) / "checkpoints").glob("step-*") if d.is_dir())
    return sorted((step, d) for step, d in found if step is not None)


def complete_checkpoints(run_dir: Path, warn: Callable[[str], None] = log.warning) -> list[Found]:
    """Checkpoints of a run whose manifest verifies (sizes: cheap enough to list often), oldest first; the others are named through warn()."""
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
                return Found(step, d, read_meta(d))
            warn(f"skipping checkpoint {d.name}: weights only (its resume state was removed by checkpoint.keep_optimizer_state=last)")
        except CheckpointError as e:
            warn(f"skipping checkpoint {d.name}: {e}")
    return None


# ------------------------------------------------------------------------------------ retention
def retain(
    run_dir: Path, keep_last: int | None, keep_schedule: bool, keep_optimizer_state: str, busy: set[Path] = frozenset()
) -> list[str]:
    """Apply the retention policy to the complete checkpoints of a run; returns what was done, one line each.

    Rolling checkpoints (every_steps, signal) beyond the newest keep_last are deleted; scheduled ones
    (first_epoch, per_epoch, steps, log_spaced) are kept unless keep_schedule=false. With
    keep_optimizer_state=last, older checkpoints lose their resume state but keep their weights.
    The newest complete checkpoint is never touched, nor a folder in `busy` (still being uploaded).
    """
    found = complete_checkpoints(run_dir, warn=lambda _: None)
    if not found:
        return []
    older = found[:-1]  # the newest is never touched
    done = []
    rolling = [f for f in older if not (keep_schedule and SCHEDULE_RULES & set(f.meta.get("rules", [])))]
    if keep_last is not None:
        keep_rolling = max(keep_last - 1, 0)  # the newest counts as one of the last N
        doomed = rolling[: max(0, len(rolling) - keep_rolling)]
        for f in doomed:
            if f.path not in busy:
                discard(f.path)
                done.append(f"deleted {f.path.name} (checkpoint.keep_last={keep_last})")
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
