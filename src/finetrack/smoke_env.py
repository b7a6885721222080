"""`finetrack smoke`, first half: the environment a run needs, checked before anything trains (seed 002's setup check).

Each check is an `Item` of the checklist: PASS / FAIL with its evidence, INFO for what is reported but not judged
(versions, the device, optional kernels), SKIP for what could not be checked. A failed check that would make the
short run fail anyway (a required package missing, the remote not writable, no disk for the smoke itself) also
blocks it (`blocks`), so the checklist names the cause instead of a cascade of failures after it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import storage
from .config import Config
from .redact import redact
from .rundir import size_text

if TYPE_CHECKING:  # plan imports torch: only where a check runs
    from .plan import Plan

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
REQUIRED = ("torch", "transformers", "peft", "accelerate")  # finetrack's own dependencies: every run needs them
log = logging.getLogger(__name__)

BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw")


@dataclass
class Item:
    """One line of the checklist."""

    status: str  # PASS | FAIL | INFO | SKIP
    name: str
    evidence: str
    blocks: bool = False  # a FAIL that makes the short run pointless: it is not started

    def line(self) -> str:
        return redact(f"{self.status:<4} {self.name}: {self.evidence}")


# ------------------------------------------------------------------------------------------ packages
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def needs_bitsandbytes(cfg: Config) -> str | None:
    """Why this config needs bitsandbytes (QLoRA, an 8-bit or paged optimizer), or None."""
    if cfg.model.method == "qlora":
        return "model.method=qlora"
    if cfg.train.optimizer in BNB_OPTIMIZERS:
        return f"train.optimizer={cfg.train.optimizer}"
    return None


def versions(cfg: Config) -> Item:
    """The versions of the stack; FAIL when a package this run needs is missing."""
    import torch

    found = {name: _version(name) for name in PACKAGES}
    parts = [f"python {platform.python_version()}"]
    for name, version in found.items():
        text = f"{name} {version}" if version else f"{name} not installed"
        if name == "torch" and version:
            text += f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
        parts.append(text)
    missing = [n for n in REQUIRED if not found[n]]
    why = needs_bitsandbytes(cfg)
    if why and not found["bitsandbytes"]:
        missing.append(f"bitsandbytes (needed by {why}: pip install bitsandbytes)")
    if missing:
        return Item("FAIL", "versions", f"missing {', '.join(missing)}; " + ", ".join(parts), blocks=True)
    return Item("INFO", "versions", ", ".join(parts))


# -------------------------------------------------------------------------------------------- device
def _meminfo() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes from /proc/meminfo; (total from sysconf, None) where it is not there."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (ValueError, OSError):
            return None, None


def device(num_processes: int) -> Item:
    """The device the run trains on and its memory: CUDA (name, total / free), else the CPU (cores, RAM, capability)."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        text = (
            f"{count} CUDA device(s); cuda:0 {name}: {size_text(total)} total, {size_text(free)} free; "
            f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"
        )
        if num_processes > count:
            return Item("FAIL", "device", f"--num-processes {num_processes} but only {text}", blocks=True)
        return Item("INFO", "device", text)
    total, available = _meminfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = f"{size_text(total)} RAM" if total else "RAM unknown"
    if available is not None:
        ram += f" ({size_text(available)} available)"
    return Item(
        "INFO",
        "device",
        f"no CUDA device: CPU with {os.cpu_count()} cores ({usable} usable), {ram}, capability {torch.backends.cpu.get_cpu_capability()}",
    )


def kernels(cfg: Config) -> Item:
    """Optional kernels: flash attention importable, bitsandbytes usable on CUDA. INFO, unless the config asks for one
    that does not work (FAIL: the run would stop on it)."""
    import torch

    cuda = torch.cuda.is_available()
    notes, problems = [], []
    if importlib.util.find_spec("flash_attn") is None:
        notes.append("flash-attn not installed")
    elif not cuda:
        notes.append(f"flash-attn {_version('flash-attn') or ''} installed (needs CUDA; unused here)".replace("  ", " "))
    else:
        try:
            import flash_attn  # noqa: F401  (importing loads its CUDA extension: the check is that this works)

            notes.append(f"flash-attn {_version('flash-attn')} importable")
        except Exception as e:  # noqa: BLE001 - a build for another torch / CUDA fails here with its own error types
            notes.append(f"flash-attn not importable ({' '.join(str(e).split())[:120]})")
            if cfg.model.attn_implementation == "flash_attention_2":
                problems.append("model.attn_implementation=flash_attention_2 needs an importable flash-attn")
    if cfg.model.attn_implementation == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not cuda):
        problems.append("model.attn_implementation=flash_attention_2 needs flash-attn on a CUDA device")
    if _version("bitsandbytes") is None:
        notes.append("bitsandbytes not installed")
    elif not cuda:
        notes.append("bitsandbytes CUDA: no CUDA device")
    else:
        try:
            import bitsandbytes.functional as bnb

            x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
            packed, state = bnb.quantize_4bit(x)
            bnb.dequantize_4bit(packed, state)
            notes.append("bitsandbytes CUDA usable (4-bit quantize round trip)")
        except Exception as e:  # noqa: BLE001 - a CPU-only build, a missing libbitsandbytes_cuda*.so: each its own error type
            notes.append(f"bitsandbytes CUDA not usable ({' '.join(str(e).split())[:120]})")
            if needs_bitsandbytes(cfg) and (cfg.model.method == "qlora" or cfg.train.optimizer.startswith("paged")):
                problems.append(f"{needs_bitsandbytes(cfg)} needs bitsandbytes working on CUDA")
    if problems:
        return Item("FAIL", "kernels", "; ".join(problems) + "; " + ", ".join(notes), blocks=True)
    return Item("INFO", "kernels", ", ".join(notes))


# ---------------------------------------------------------------------------------------------- disk
def checkpoints_on_disk(checkpoint_steps: dict, num_keep_last: int | None, keep_schedule: bool) -> int:
    """The most checkpoints a run holds at once on its disk: its schedule ({step: "rule+rule"}, as plan and
    config.resolved.yaml give it) walked with checkpoint.retain's rule (the newest and the schedule's checkpoints
    kept, the newest num_keep_last rolling ones)."""
    from .checkpoint import SCHEDULE_RULES

    kept: list[tuple[int, set[str]]] = []
    most = 0
    for step in sorted(int(s) for s in checkpoint_steps):
        rules = set(str(checkpoint_steps.get(step, checkpoint_steps.get(str(step), ""))).split("+"))
        kept.append((step, rules))
        most = max(most, len(kept))  # retention runs after the save: the new one and all the older ones coexist
        if num_keep_last is not None:
            older = kept[:-1]
            rolling = [k for k in older if not (keep_schedule and SCHEDULE_RULES & k[1])]
            doomed = {k[0] for k in rolling[: max(0, len(rolling) - max(num_keep_last - 1, 0))]}
            kept = [k for k in kept if k[0] not in doomed]
    return most


def run_disk_bytes(cfg: Config, plan: Plan) -> tuple[int, str]:
    """Bytes the planned run keeps on its disk at most (checkpoints at once, with and without resume state; exports),
    and how that was counted."""
    t, c = plan.time, cfg.checkpoint
    per = t["checkpoint_bytes"]
    most = checkpoints_on_disk(plan.schedule["checkpoint_steps"], c.num_keep_last, c.keep_schedule) + (1 if c.best else 0)
    state = sum(term["bytes"] for term in plan.memory["terms"] if term["name"] == "optimizer state")
    # keep_optimizer_state=last: only the newest keeps its optimizer state; the others are weights (and tokenizer)
    need = per + (most - 1) * (per - state if c.keep_optimizer_state == "last" else per)
    exports = plan.exports.get("total_bytes", 0) if plan.exports else 0
    how = f"at most {most} checkpoint(s) of {size_text(per)} at once" + (f" (num_keep_last={c.num_keep_last})" if c.num_keep_last else "")
    if c.best:
        how += ", +1 for the best"
    if c.keep_optimizer_state == "last":
        how += ", older ones without optimizer state"
    if exports:
        how += f", + exports {size_text(exports)}"
    return need + exports, how


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes on the disk of `path` (its nearest existing folder) and that folder."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free, where


def disk(cfg: Config, plan: Plan, scratch: Path, smoke_bytes: int) -> Item:
    """Free disk at output.dir against what the planned run keeps there; the smoke's own scratch must fit too (it
    blocks the short run when it does not)."""
    need, how = run_disk_bytes(cfg, plan)
    free, where = free_bytes(Path(cfg.output.dir))
    scratch_free, scratch_where = free_bytes(scratch)
    text = f"{size_text(free)} free at {where} (output.dir's disk); the run needs {size_text(need)}: {how}; this smoke ~{size_text(smoke_bytes)}"
    if scratch_where.resolve() != where.resolve() and os.stat(scratch_where).st_dev != os.stat(where).st_dev:
        text += f" at {scratch_where} ({size_text(scratch_free)} free)"
    if scratch_free < smoke_bytes:
        return Item("FAIL", "disk", text + ": not even the smoke fits", blocks=True)
    return Item("PASS" if free >= need else "FAIL", "disk", text)


# -------------------------------------------------------------------------------------------- remote
def scratch_remote(remote: str, stamp: str) -> str:
    """The smoke's scratch prefix under checkpoint.remote: `<remote>/smoke-<stamp>`. The real run reads and writes only
    its own files and checkpoints/ there, never this folder; the smoke deletes it at the end unless --keep."""
    return f"{remote.rstrip('/')}/smoke-{stamp}"


def probe_remote(url: str) -> Item:
    """Write, read back and delete a small object under `url` (storage.py's fsspec helpers): the remote is reachable,
    the credentials work and allow writes. Credentials are never printed (every message is redacted)."""
    data = f"finetrack smoke probe {time.time()}\n".encode()
    started = time.monotonic()
    step = "open"
    try:
        fs, root = storage.open_url(url)
        path = f"{root}/.finetrack-smoke-probe"
        step = "write"
        storage.put_file(fs, path, data=data)
        step = "read back"
        back = fs.cat_file(path)
        step = "delete"
        fs.rm_file(path)
    except Exception as e:  # noqa: BLE001 - every backend has its own error types (botocore, gcsfs, OSError, ImportError)
        return Item("FAIL", "remote", f"{redact(url)}: {step} failed ({storage.describe_error(e, url)})", blocks=True)
    if back != data:
        return Item("FAIL", "remote", f"{redact(url)}: read back {len(back)} bytes that differ from the {len(data)} written", blocks=True)
    seconds = time.monotonic() - started
    return Item("PASS", "remote", f"wrote, read back and deleted a {len(data)}-byte object under {redact(url)} in {seconds:.2f} s")


def delete_remote(url: str) -> str | None:
    """Delete the smoke's scratch prefix; None, or the problem (said, never raised: the checklist is already made)."""
    try:
        fs, root = storage.open_url(url)
        storage.forget_listings(fs, root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    except Exception as e:  # noqa: BLE001 - any backend's error: the user is told to delete it by hand
        return storage.describe_error(e, url)
    return None


# ----------------------------------------------------------------------------------------- cleanup
def missing_folders(path: str | None) -> list[Path]:
    """The folders of a local path (the scratch folder, a local-folder remote) that do not exist yet, deepest first: the
    cleanup removes them again when it leaves them empty, so everything is found as it was (an object store has no folders)."""
    import fsspec

    if not path:
        return []
    protocol, local = fsspec.core.split_protocol(path)
    if protocol not in (None, "file", "local"):
        return []
    folder, missing = Path(local).absolute(), []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def clean_up(scratch: Path, remote: str | None, keep: bool, created: list[Path], logs: Path | None = None) -> None:
    """Delete the scratch folder and the remote scratch prefix (unless --keep), then the `created` folders (missing_folders)
    left empty, and say so. `logs`: a folder inside the scratch folder that stays (an item failed: its FAIL line points
    there)."""
    if keep:
        log.info("smoke: kept (--keep): %s%s", scratch, f" and {redact(remote)}" if remote else "")
        return
    keep_logs = logs is not None and logs.is_dir()
    if keep_logs:
        for child in scratch.iterdir():
            if child.is_dir() and child != logs:
                shutil.rmtree(child, ignore_errors=True)
            elif not child.is_dir():
                child.unlink(missing_ok=True)
        log.info("smoke: scratch deleted but its logs, kept for the failed item(s): %s", logs)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    if remote and (problem := delete_remote(remote)):
        log.warning("warning: the remote scratch %s could not be deleted (%s): delete it by hand", redact(remote), problem)
    for folder in created:  # deepest first; a folder something else wrote into meanwhile stays
        try:
            folder.rmdir()
        except OSError:
            pass
    if not keep_logs:
        log.info("smoke: scratch deleted: %s%s", scratch, f" and {redact(remote)}" if remote else "")
