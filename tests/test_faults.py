"""Faults through the real command line: kill -9 at random moments (also mid-checkpoint), SIGTERM/SIGINT.

The runs are subprocesses training the tiny model. A sitecustomize.py put on PYTHONPATH by the test
(never by finetrack) slows every os.fsync, so a checkpoint write takes long enough to be hit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_jsonl
from safetensors.torch import load_file

from finetrack import checkpoint

SLOW_FSYNC = """
import os, time
_fsync = os.fsync
def _slow_fsync(fd):
    time.sleep(float(os.environ.get("FT_TEST_FSYNC_SECONDS", "0")))
    return _fsync(fd)
os.fsync = _slow_fsync
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, chat_file) -> dict:
    root = tmp_path_factory.mktemp("faults")
    (root / "site").mkdir()
    (root / "site/sitecustomize.py").write_text(SLOW_FSYNC)
    # 48 rows / 4 = 12 steps per epoch: 24 steps cross an epoch boundary; dropout makes RNG state matter
    cfg = {
        "model": {"name": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.1}},
        "data": {"path": str(chat_file), "max_length": 512},
        "train": {"micro_batch_size": 4, "max_steps": 24, "lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every_steps": 3},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return {"root": root}


def start(setup: dict, out: Path, *args: str, fsync_seconds: float = 0.0) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FT_TEST_FSYNC_SECONDS": str(fsync_seconds),
        "PYTHONPATH": os.pathsep.join([str(setup["root"] / "site"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "finetrack", "train", str(setup["root"] / "run.yaml"), f"output.dir={out}", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_jsonl(run / "metrics.jsonl")]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    out = setup["root"] / "reference"
    code, err = finish(start(setup, out))
    assert code == 0, err[-3000:]
    return out


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_kill_9_at_random_moments_then_resume_gives_identical_weights(setup, reference):
    seed = int(time.time())
    rng = random.Random(seed)
    out = setup["root"] / "killed"
    ckpts = out / "checkpoints"
    kills, mid_write = [], 0
    for attempt in range(8):
        found = checkpoint.newest_resumable(out, warn=lambda _: None)  # what this restart must resume from
        newest_before = found.step if found else None
        proc = start(setup, out, fsync_seconds=0.1)
        if attempt == 0:  # the first kill lands inside a checkpoint write, by construction
            hit = wait_for(lambda: ckpts.is_dir() and any(p.name.startswith(".tmp-step-") for p in ckpts.iterdir()), 120, proc)
            assert hit, "no checkpoint write observed"
            time.sleep(rng.uniform(0, 0.3))  # a write takes over 1 s here (10 slowed fsyncs): still inside it
        elif attempt < 4:
            # a random moment once training runs again: inside a step, an eval or a checkpoint write
            before = (out / "metrics.jsonl").stat().st_mtime_ns
            wait_for(lambda: (out / "metrics.jsonl").stat().st_mtime_ns != before, 120, proc)
            wait_for(lambda: False, rng.uniform(0, 1.5), proc)
        if attempt < 4 and proc.poll() is None:
            proc.kill()  # SIGKILL: no handler runs
            proc.wait()
            names = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
            kills.append(names)
            mid_write += any(n.startswith(".tmp-step-") for n in names)  # SIGKILL removes nothing: the write was under way
        _, err = proc.communicate(timeout=300)  # from attempt 4 on: the run goes to its end
        # a restart says where it resumed from: the newest checkpoint complete before it, never step 0 again
        resumed = re.search(r"resuming from \S+/step-(\d{6}): step (\d+) of 24", err)
        if newest_before is None:
            assert resumed is None, f"seed {seed}: resumed with no complete checkpoint: {err[-2000:]}"
        else:
            assert resumed, (
                f"seed {seed}, attempt {attempt}: no 'resuming from' line though step {newest_before} was complete: {err[-2000:]}"
            )
            assert int(resumed.group(1)) == int(resumed.group(2)) >= newest_before, (
                f"seed {seed}: {resumed.group(0)}, newest {newest_before}"
            )
        # whatever was left, every visible step-* folder is either complete or ignored, never half-used
        for d in ckpts.glob("step-*") if ckpts.is_dir() else []:
            checkpoint.verify(d)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, f"seed {seed}: {err[-3000:]}"
    assert len(kills) >= 3, f"seed {seed}: the run finished before enough kills ({kills})"
    assert mid_write >= 1, f"seed {seed}: no kill landed inside a checkpoint write ({kills})"
    final = ckpts / "step-000024"
    assert losses(out) == losses(reference), f"seed {seed}, kills {kills}"
    a, b = weights(reference / "checkpoints/step-000024"), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}, kills {kills}"


def test_sigterm_writes_a_checkpoint_and_exits_143_then_resume_matches(setup, reference):
    out = setup["root"] / "sigterm"
    proc = start(setup, out, "checkpoint.every_steps=100")  # no scheduled checkpoint before the last step
    assert wait_for(lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5, 120, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 143, err[-3000:]
    assert "SIGTERM: finishing this optimizer step, then writing a checkpoint" in err
    (folder,) = list((out / "checkpoints").glob("step-*"))
    meta = checkpoint.read_meta(folder)
    assert meta["rules"] == ["signal"] and 5 <= meta["step"] < 24
    checkpoint.verify(folder)
    assert len(losses(out)) == meta["step"]  # logged every step up to the checkpoint
    # the same command continues; the schedule change (every_steps) is harmless and listed
    code, err = finish(start(setup, out))
    assert code == 0, err[-3000:]
    assert f"resuming from {folder}: step {meta['step']} of 24" in err and "checkpoint.every_steps: 100 -> 3" in err
    assert losses(out) == losses(reference)
    a, b = weights(reference / "checkpoints/step-000024"), weights(out / "checkpoints/step-000024")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_exits_130_and_a_second_signal_exits_at_once(setup):
    out = setup["root"] / "sigint"
    proc = start(setup, out, "train.max_steps=2000", "checkpoint.every_steps=1000")
    assert wait_for(lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2, 120, proc)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130 and "SIGINT: finishing this optimizer step" in err, err[-3000:]
    assert len(checkpoint.complete_checkpoints(out)) == 1

    out2 = setup["root"] / "twice"
    proc = start(setup, out2, "train.max_steps=2000", "checkpoint.every_steps=1000", fsync_seconds=0.5)
    assert wait_for(lambda: (out2 / "metrics.jsonl").is_file() and len((out2 / "metrics.jsonl").read_text().splitlines()) >= 2, 120, proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)  # the checkpoint write is slowed to seconds: the second signal lands during it
    proc.send_signal(signal.SIGUSR1)
    code, err = finish(proc)
    assert code == 143 and "SIGUSR1 again: exiting now without a checkpoint" in err, err[-3000:]
    assert checkpoint.complete_checkpoints(out2) == []  # nothing half-written is visible


def test_a_signal_while_starting_exits_cleanly_without_a_checkpoint(setup):
    """SIGTERM before the first optimizer step (here while config.resolved.yaml is written, its fsync slowed to
    seconds): exit 143 at once, no traceback, no checkpoint, and it says none was needed."""
    out = setup["root"] / "startup"
    proc = start(setup, out, fsync_seconds=5.0)
    tmp = out / f".tmp-config.resolved.yaml-{proc.pid}"
    assert wait_for(tmp.exists, 120, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=60)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM while starting, before any optimizer step: no checkpoint needed" in err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not tmp.exists()  # the interrupted write left nothing behind
