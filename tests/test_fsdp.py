"""Sharded training (accelerate's FSDP2 plugin) on CPU with gloo, through the real launcher and the accelerate config a
user copies (examples/accelerate/fsdp2.yaml): LoRA, full fine-tuning and a regression head give the one-process trajectory at the same
global batch; checkpoints are gathered and written as one process writes them (same files, the optimizer state in the
one-process layout), loadable by plain transformers / PEFT; kill -9 of the launcher and the same command resumes bit for
bit; a one-process run continues from a sharded run's checkpoint; FSDP1 and QLoRA under FSDP are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl
from safetensors.torch import load_file
from test_multiprocess import (
    BIN,
    assert_same_checkpoints,
    assert_same_trajectory,
    free_port,
    launch,
    metrics,
    untimed_metrics,
    write_config,
)

from finetrack import checkpoint

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "examples/accelerate/fsdp2.yaml"


def fsdp(*args: str) -> list[str]:
    """The command the README gives for sharded training, 2 processes."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(ACCELERATE_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
        "-m",
        "finetrack",
        "train",
        *args,
    ]


def optimizer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / checkpoint.STATE_TENSORS)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_gives_the_one_process_trajectory_and_checkpoints(tmp_path, tiny_model_dir, chat_file, method):
    one = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "one", grad_accum_steps=2)
    two = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "two")
    for path in (one, two):
        text = path.read_text().replace(f"name: {tiny_model_dir}", f"name: {tiny_model_dir}\n  method: {method}")
        # 9 held-out rows: 5 for process 0 (2 micro-batches of 4), 4 for process 1 (1): it runs a forward it does not
        # count, since every forward of a sharded model gathers on both (without it the run would hang)
        path.write_text(text.replace("eval_split: 0.25", "eval_split: 0.1875"))
    r = launch([sys.executable, "-m", "finetrack", "train", str(one)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(fsdp(str(two)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in r.stderr
    # stated tolerance: rel 1e-5 (the reduce-scatter sums the processes' gradients in its own order)
    assert_same_trajectory(tmp_path / "one", tmp_path / "two", num_steps=6)
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two", (2, 4, 6), method, tiny_model_dir)
    # samples and validation: answered by both processes in step, written once
    assert [(s["step"], s["answer"]) for s in read_jsonl(tmp_path / "two/samples.jsonl")] == [
        (s["step"], s["answer"]) for s in read_jsonl(tmp_path / "one/samples.jsonl")
    ]
    for name in ("step-000000.json", "step-000006.json"):  # validation results stored with their checkpoint
        va, vb = (json.loads((tmp_path / d / "eval" / name).read_text()) for d in ("one", "two"))
        assert vb["metrics"] == pytest.approx(va["metrics"], rel=1e-5)


def test_fsdp_with_a_regression_head(tmp_path, tiny_model_dir, regression_file):
    """A head around a PEFT model: sharded with it, gathered with it (head.safetensors), the same trajectory."""
    import yaml

    def config(name: str, grad_accum_steps: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        cfg = {
            "model": {"name": str(tiny_model_dir), "method": "lora"},
            "data": {"path": str(regression_file), "max_length": 512, "eval_split": 0.1875},
            "objective": {"kind": "regression", "regression": {"head": {"hidden_sizes": [8]}}},
            "train": {"micro_batch_size": 4, "grad_accum_steps": grad_accum_steps, "max_steps": 4, "lr": 1e-2, "warmup_steps": 0},
            "checkpoint": {"every_steps": 2},
            "eval": {"loss_every_steps": 2, "suites": [{"name": "qa", "kind": "regression", "every_steps": 2}]},
            "output": {"dir": str(tmp_path / name)},
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    r = launch([sys.executable, "-m", "finetrack", "train", str(config("one", 2))], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(fsdp(str(config("two", 1))), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for step in (2, 4):
        for key in ("loss", "grad_norm", "eval_loss", "val/qa.mse"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    ha, hb = (load_file(tmp_path / d / "checkpoints/step-000004/head.safetensors") for d in ("one", "two"))
    assert sorted(ha) == sorted(hb) and all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha)


def test_fsdp_killed_launcher_resumes_bit_for_bit_and_one_process_continues(tmp_path, tiny_model_dir, chat_file):
    settings = {"max_steps": 30, "micro_batch_size": 2, "sample_every_steps": None}
    full = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "full", **settings)
    cut = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "cut", **settings)
    for path in (full, cut):
        path.write_text(path.read_text().replace(f"name: {tiny_model_dir}", f"name: {tiny_model_dir}\n  method: full"))
    r = launch(fsdp(str(full)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(fsdp(str(cut)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (tmp_path / "cut/checkpoints/step-000006/MANIFEST.json").is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only
    proc.wait()
    time.sleep(5)
    assert subprocess.run(["pgrep", "-f", f"finetrack train {cut}"], capture_output=True, text=True).stdout.split() == []
    assert not (tmp_path / "cut/checkpoints/step-000030").exists(), "the run finished before it was cut off"
    r = launch(fsdp(str(cut)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("resuming from") == 1  # said once, by the main process
    a, b = (untimed_metrics(tmp_path / d) for d in ("full", "cut"))
    assert a == b
    x, y = (d / "checkpoints/step-000030" for d in (tmp_path / "full", tmp_path / "cut"))
    for name in ("model.safetensors", checkpoint.STATE_TENSORS):
        assert (x / name).read_bytes() == (y / name).read_bytes(), name

    # a sharded run's checkpoint is a one-process checkpoint: one process continues it (another process count is
    # refused without --allow-config-change, as for data parallel)
    r = launch([sys.executable, "-m", "finetrack", "train", str(cut), "train.max_steps=32"], tmp_path)
    assert r.returncode == 2 and "it was trained by 2 process(es), this launch has 1" in r.stderr, r.stderr[-2000:]
    r = launch(
        [sys.executable, "-m", "finetrack", "train", str(cut), "train.max_steps=32", "train.grad_accum_steps=2", "--allow-config-change"],
        tmp_path,
    )
    assert r.returncode == 0 and "done: 32 steps" in r.stdout + r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "finetrack supports FSDP2 only"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["model.method=qlora"], "model.method qlora under FSDP"),
    ],
)
def test_fsdp_launches_finetrack_cannot_checkpoint_are_refused(tmp_path, tiny_model_dir, chat_file, env, args, expected):
    """What accelerate launch sets for an FSDP1 config (or QLoRA under FSDP): one error line, before any
    model is loaded or the run directory exists."""
    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "out")
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "train", str(config), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
