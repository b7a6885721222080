"""One training process per run directory: `RUN_DIR/train.lock`, held with flock while a run trains.

Two processes training the same directory would delete each other's checkpoints (the start-up sweep
removes temporary checkpoint folders, retention removes old ones). The kernel releases an flock when
its holder dies, even by kill -9, so a crash never leaves a stale lock: the same command run again
takes it and resumes. The file itself stays (deleting it would let two processes lock two different
files of the same name); it holds the pid and host of the last holder, for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .schema import ConfigError

LOCK_FILE = "train.lock"


def run_dir_problem(run_dir: Path) -> str | None:
    """What stands in the way of output.dir on this machine without creating anything (a file where the folder or
    one of its parents belongs, a nearest existing folder that is not writable), or None. `plan` warns with it."""
    run_dir = Path(run_dir)
    where = f"output.dir={run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        return f"{where}: is a file, not a folder; choose another output.dir or move the file away"
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{where}: {existing} is a file, not a folder; choose another output.dir"
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}: {existing} is not writable; fix its permissions or choose another output.dir"
    return None


def make_run_dir(run_dir: Path) -> Path:
    """Create output.dir (and its parents) and check that files can be written in it; ConfigError saying what is
    in the way otherwise. Runs before anything is loaded."""
    run_dir = Path(run_dir)
    where = f"output.dir={run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{where}: is a file, not a folder; choose another output.dir or move the file away")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None)
        raise ConfigError(f"{where}: {blocking or 'a parent'} is a file, not a folder; choose another output.dir") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be created ({e.strerror}); choose another output.dir") from None
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise ConfigError(f"{where}: cannot write in it ({e.strerror}); fix its permissions or choose another output.dir") from None
    probe.unlink()
    return run_dir


@contextmanager
def hold(run_dir: Path) -> Iterator[Path]:
    """Hold the run directory's training lock for the duration of the block; ConfigError naming the holder if
    another live process holds it. `run_dir` must exist."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"output.dir: cannot create the lock file {path} ({e.strerror}): choose a writable output.dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
            raise ConfigError(
                f"{Path(run_dir)} is being trained by another process (pid {holder}, holding {path}): wait for it to "
                "finish, stop it (kill -TERM PID writes a checkpoint), or train into another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
