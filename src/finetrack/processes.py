"""finetrack processes on this machine: liveness, a per-user registry, and compute threads sized to share the CPU.

Two torch processes on 2 cores (an `eval --watch` beside training) each start one intra-op thread per
core: 4 busy threads on 2 cores made a training step 15-20x slower instead of about 2x (DESIGN.md).
So every compute process registers itself (one file per pid under a per-user runtime folder) and uses
max(1, usable cores // live finetrack processes) threads. Entries of processes that are gone (kill -9
leaves its file behind) are ignored and removed. A thread count the user chose (OMP_NUM_THREADS,
MKL_NUM_THREADS) always wins. This module imports torch only to apply the count.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("finetrack")

USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# How often a long-running process looks at the registry again (a second process may have started or ended).
REBALANCE_EVERY_S = 10.0

_state: dict[str, object] = {"entry": None, "threads": None, "checked_at": 0.0}


def process_alive(pid: int) -> bool:
    """Does process `pid` exist (signal 0: an existence check only)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), '' where /proc is absent: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name in (...) may hold spaces


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), read from /proc: [] where there is none (not Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[-1].split()[1])  # field 4, after the command name in (...)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def registry_dir() -> Path:
    """Per-user folder holding one file per running finetrack compute process (FINETRACK_RUNTIME_DIR overrides)."""
    base = os.environ.get("FINETRACK_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    sub = "finetrack-processes" if "FINETRACK_RUNTIME_DIR" in os.environ or "XDG_RUNTIME_DIR" in os.environ else f"finetrack-{os.getuid()}"
    return Path(base) / sub


def register(folder: Path | None = None) -> Path:
    """Record this process in the registry (removed again at exit); returns its entry file."""
    folder = folder or registry_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = folder / str(os.getpid())
    entry.write_text(_start_time(os.getpid()))
    atexit.register(entry.unlink, missing_ok=True)
    return entry


def live_processes(folder: Path | None = None) -> list[int]:
    """Pids of the registered processes still running, ascending; entries of dead (or reused) pids are removed."""
    folder = folder or registry_dir()
    live = []
    for entry in folder.glob("*") if folder.is_dir() else []:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            started = entry.read_text()
        except OSError:  # removed by its process meanwhile
            continue
        if process_alive(pid) and (not started or started == _start_time(pid)):
            live.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return sorted(live)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or `taskset` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_for(cores: int, processes: int) -> int:
    """Compute threads for one of `processes` processes sharing `cores`: an equal share, at least one."""
    return max(1, cores // max(1, processes))


def user_threads() -> str | None:
    """The variable (NAME=value) by which the user chose a thread count, if any."""
    return next((f"{name}={os.environ[name]}" for name in USER_THREAD_VARS if os.environ.get(name)), None)


def configure_threads() -> int | None:
    """Register this process and size torch's intra-op threads to its share of the cores; returns the count set
    (None where the user chose one). Logs one line when the cores are shared."""
    if user_threads() is not None:
        return None  # torch read it when it started
    if _state["entry"] is None:
        try:
            _state["entry"] = register()
        except OSError as e:  # a read-only /tmp: no sharing, but no reason to stop
            log.warning(
                "could not register this process under %s (%s): compute threads are not shared with other finetrack processes",
                registry_dir(),
                e,
            )
            _state["entry"] = False
    return rebalance(force=True)


def rebalance(force: bool = False) -> int | None:
    """Look at the registry again (at most every REBALANCE_EVERY_S) and change the thread count if the number of
    finetrack processes changed; cheap enough to call once per optimizer step. Returns the count in use."""
    now = time.monotonic()
    if not _state["entry"] or (not force and now - float(_state["checked_at"]) < REBALANCE_EVERY_S):
        return _state["threads"]  # type: ignore[return-value]
    _state["checked_at"] = now
    cores, processes = usable_cores(), max(1, len(live_processes()))
    threads = threads_for(cores, processes)
    if threads != _state["threads"]:
        _apply(threads)
        if processes > 1:
            log.info("%d finetrack processes share %d cores: using %d thread%s", processes, cores, threads, "" if threads == 1 else "s")
        elif _state["threads"] is not None:
            log.info("the other finetrack processes ended: using %d threads on %d cores", threads, cores)
        _state["threads"] = threads
    return threads


def _apply(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ multi-process launches
def cpu_launch(num_processes: int | str = "N") -> str:
    """The commands that start `num_processes` training processes on CPU (gloo), as error messages give them."""
    n = num_processes
    return f"`torchrun --nproc_per_node {n} -m finetrack train CONFIG` (or `accelerate launch --multi_gpu --num_processes {n} -m finetrack train CONFIG`)"


def launched_processes() -> int:
    """How many training processes the launcher started (WORLD_SIZE, set by torchrun and `accelerate launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(launched: int, seen: int) -> None:
    """Refuse a launch whose processes would not train together: N processes that accelerate does not join (each
    would train alone and write the same run directory), and `accelerate launch --cpu --num_processes N`, which
    starts one process (accelerate's simple launcher) and would quietly train with 1/N of the global batch. That
    launch is recognized by the rendezvous address it sets (MASTER_PORT) with no WORLD_SIZE."""
    from .config import ConfigError

    if launched != seen:
        raise ConfigError(
            f"launched as {launched} processes but accelerate sees {seen}: on GPUs use `accelerate launch --multi_gpu`; on CPU {cpu_launch()}"
        )
    if seen == 1 and os.environ.get("ACCELERATE_USE_CPU") is not None and os.environ.get("MASTER_PORT") and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "accelerate launch asked for several processes but started one (with --cpu it runs a single process): "
            f"the run would train with a fraction of the global batch; on CPU launch {cpu_launch()}"
        )


def stop_with_launcher() -> None:
    """A process started by a launcher (torchrun, accelerate launch) gets SIGTERM when the launcher dies: torchrun does
    not stop its workers when it is killed with SIGKILL (measured: they trained on to the end), so a killed job would
    leave them writing its run directory. SIGTERM is finetrack's stop signal: every process stops at the same step
    and saves a checkpoint (interrupt.py), and running the same command again resumes. Linux only (prctl)."""
    import ctypes
    import signal
    import sys

    if launched_processes() == 1 or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
