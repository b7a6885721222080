"""One training process per run directory, through real processes: a second `finetrack train` on a directory a
live process holds is refused before it touches anything; a holder killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_argv

from finetrack import checkpoint
from finetrack.config import ConfigError
from finetrack.runlock import LOCK_FILE, hold

# a process that takes the lock through the same function train.run uses, then waits to be killed
HOLD = (
    "import sys, time\nfrom finetrack.runlock import hold\nwith hold(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"
)


def train_cmd(run: Path, model_dir: Path, data: Path, *overrides: str) -> list[str]:
    return train_argv(model_dir, data, run, "data.max_length=512", "train.micro_batch_size=4", *overrides)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_the_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as e, hold(run):
            pass
        assert f"{run} is being trained by another process (pid {holder.pid} on " in str(e.value)
    finally:
        holder.kill()  # SIGKILL: no handler, no cleanup; the kernel drops the lock
        holder.wait()
    with hold(run) as path:  # free again at once, though the file is still there
        assert path == run / LOCK_FILE and path.read_text().startswith(f"{os.getpid()} on ")


def test_a_second_train_is_refused_before_it_sweeps_the_run_directory(tmp_path, tiny_model_dir, chat_file):
    """The sweep of unfinished checkpoint folders would delete the one a live run is writing: it must not run."""
    run = tmp_path / "run"
    writing = run / "checkpoints" / ".tmp-step-000003-4242"  # a checkpoint the live run is writing
    writing.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(
            train_cmd(run, tiny_model_dir, chat_file, "train.max_steps=1"), capture_output=True, text=True, timeout=600, check=False
        )
        assert r.returncode == 2, r.stderr[-3000:]
        (line,) = error_lines(r.stderr)
        assert str(run) in line and f"pid {holder.pid} " in line and "Traceback" not in r.stderr
        assert writing.is_dir()  # untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: the same command now runs, and its sweep frees the unfinished folder
    r = subprocess.run(
        train_cmd(run, tiny_model_dir, chat_file, "train.max_steps=1"), capture_output=True, text=True, timeout=600, check=False
    )
    assert r.returncode == 0 and re.search(r"^done: 1 steps", r.stdout, re.MULTILINE), r.stderr[-3000:]
    assert not writing.exists()


def test_a_second_train_beside_a_live_training_then_kill_9_and_resume(tmp_path, tiny_model_dir, chat_file):
    """A real training run holds the lock; a second identical command is refused while the first keeps training
    and keeps its checkpoints; after kill -9 of the first the same command resumes from its newest checkpoint."""
    run = tmp_path / "run"
    long = ("train.max_steps=3000", "checkpoint.every_steps=3", "model.lora.r=4")
    # a file, not a pipe nobody reads while it trains (a full pipe would block it)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(train_cmd(run, tiny_model_dir, chat_file, *long), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not checkpoint.complete_checkpoints(run, warn=lambda _: None) and time.monotonic() < deadline and first.poll() is None:
                time.sleep(0.1)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            r = subprocess.run(train_cmd(run, tiny_model_dir, chat_file, *long), capture_output=True, text=True, timeout=600, check=False)
            assert r.returncode == 2, r.stderr[-3000:]
            (line,) = error_lines(r.stderr)
            assert str(run) in line and f"pid {first.pid} " in line and "Traceback" not in r.stderr
            steps_before = [s for s, _ in checkpoint.step_folders(run)]
            time.sleep(2)
            assert first.poll() is None  # the first run is unharmed and still training
            for step, folder in checkpoint.step_folders(run):
                checkpoint.verify(folder)  # every checkpoint it had is still there and complete
            assert {s for s, _ in checkpoint.step_folders(run)} >= set(steps_before[:-1])  # retention off: none deleted
        finally:
            first.kill()
            first.wait()
    newest = checkpoint.newest_resumable(run, warn=lambda _: None)
    assert newest is not None
    target = newest.step + 2  # a shorter run: train.max_steps is a harmless change on resume
    r = subprocess.run(
        train_cmd(run, tiny_model_dir, chat_file, f"train.max_steps={target}", "checkpoint.every_steps=3", "model.lora.r=4"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = re.search(rf"resuming from \S+/step-(\d+): step (\d+) of {target}", r.stderr)
    assert resumed and int(resumed.group(2)) == newest.step, r.stderr[-3000:]
    assert re.search(rf"^done: {target} steps", r.stdout, re.MULTILINE), r.stdout
