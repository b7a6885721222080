"""A checkpoint write the storage refuses, made real: a size-limited tmpfs that fills up (needs root to mount;
skipped otherwise), and a per-process file size limit (RLIMIT_FSIZE: the kernel refuses with EFBIG).

Either way: exit 2, one error line naming the file and the space, the previous checkpoint untouched, no partial
checkpoint left, never "done"; with space again the same command resumes.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest
from conftest import train_argv

from finetrack import checkpoint

COMMON = ("data.max_length=512", "train.micro_batch_size=4", "checkpoint.every_steps=1")


def train(model_dir: Path, data: Path, out: Path, *overrides: str, preexec_fn=None) -> subprocess.CompletedProcess:
    cmd = train_argv(model_dir, data, out, *COMMON, *overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn, check=False)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs at tmp_path/disk; yields (mount point, a function that resizes it)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")

    def resize(num_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={num_bytes}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_checkpoint_stops_the_run_and_keeps_the_previous_one(tmp_path, tiny_model_dir, chat_file, small_tmpfs):
    mnt, resize = small_tmpfs
    # one checkpoint's size, measured on a real run of the same config
    ref = train(tiny_model_dir, chat_file, tmp_path / "ref", "train.max_steps=1")
    assert ref.returncode == 0, ref.stderr[-3000:]
    one = sum(f.stat().st_size for f in (tmp_path / "ref/checkpoints/step-000001").rglob("*"))
    # room for the run's small files and one checkpoint, not two (tmpfs counts whole 4 KiB pages per file)
    resize(int(one * 1.5) + 128 * 1024)
    out = mnt / "run"
    r = train(tiny_model_dir, chat_file, out, "train.max_steps=4")
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r)
    assert "writing checkpoint step 2 failed at " in line and str(out / "checkpoints/step-000002") in line, line
    assert "No space left on device" in line and "is free on the file system of" in line and "the size of step-000001" in line, line
    assert "the previous checkpoint step-000001 is untouched" in line
    assert "Traceback" not in r.stderr and "done:" not in r.stdout
    assert [s for s, _ in checkpoint.step_folders(out)] == [1]
    checkpoint.verify(out / "checkpoints/step-000001")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # the partial write is gone
    # with space again, the same command resumes from the checkpoint that was kept
    resize(64 * 2**20)
    r = train(tiny_model_dir, chat_file, out, "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints/step-000001'}: step 1 of 4" in r.stderr
    assert [s for s, _ in checkpoint.step_folders(out)] == [1, 2, 3, 4]


def test_a_file_size_limit_during_the_first_checkpoint_is_one_error_line(tmp_path, tiny_model_dir, chat_file):
    """RLIMIT_FSIZE below the size of the full model's weights file: its write fails with EFBIG (the run's small
    files fit). No checkpoint existed before: the message says so, and nothing is left behind."""
    limit_bytes = 200 * 1024  # model.safetensors of the tiny model is about 430 kB; every other file is under 30 kB

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    out = tmp_path / "run"
    r = train(tiny_model_dir, chat_file, out, "model.method=full", "train.max_steps=2", preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r)
    assert "writing checkpoint step 1 failed at " in line and "File too large" in line, line
    assert "no earlier checkpoint exists" in line and "is free on the file system of" in line, line
    assert "Traceback" not in r.stderr and "done:" not in r.stdout
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
