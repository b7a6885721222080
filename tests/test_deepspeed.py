"""DeepSpeed ZeRO (stages 2 and 1) through accelerate on CPU with gloo, through the real launcher and the accelerate config a
user copies (examples/accelerate/deepspeed_zero2.yaml): LoRA and full fine-tuning give the one-process trajectory at the
same global batch, with gradient accumulation; checkpoints hold the optimizer state gathered from the partitions in the
one-process layout (no pickle); kill -9 of the launcher and the same command resumes bit for bit; one process continues
a ZeRO run's checkpoint; what finetrack cannot checkpoint or whose settings contradict its config is refused."""

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
from safetensors.torch import load_file
from test_multiprocess import BIN, assert_same_trajectory, free_port, launch, untimed_metrics, write_config

from finetrack import checkpoint

pytest.importorskip("deepspeed", reason="DeepSpeed is part of the test extra (pip install -e '.[test]')")

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "examples/accelerate/deepspeed_zero2.yaml"


def zero2(*args: str, config: Path = ACCELERATE_CONFIG) -> list[str]:
    """The command the README gives for DeepSpeed ZeRO-2, 2 processes."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
        "-m",
        "finetrack",
        "train",
        *args,
    ]


def with_method(path: Path, model_dir: Path, method: str) -> Path:
    path.write_text(path.read_text().replace(f"name: {model_dir}", f"name: {model_dir}\n  method: {method}"))
    return path


@pytest.mark.parametrize("stage, method", [(2, "lora"), (2, "full"), (1, "lora")])
def test_zero_gives_the_one_process_trajectory_and_checkpoints(tmp_path, tiny_model_dir, chat_file, stage, method):
    # 2 processes x 2 micro-batches vs 1 process x 4: the accumulation boundary is the loop's, not DeepSpeed's counter
    one = with_method(
        write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "one", micro_batch_size=2, grad_accum_steps=4), tiny_model_dir, method
    )
    two = with_method(
        write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "two", micro_batch_size=2, grad_accum_steps=2), tiny_model_dir, method
    )
    accelerate_config = tmp_path / "zero.yaml"
    accelerate_config.write_text(ACCELERATE_CONFIG.read_text().replace("zero_stage: 2", f"zero_stage: {stage}"))
    r = launch([sys.executable, "-m", "finetrack", "train", str(one)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(zero2(str(two), config=accelerate_config), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    partitioned = "gradients and optimizer state" if stage == 2 else "optimizer state"
    assert f"DeepSpeed ZeRO-{stage}: {partitioned} partitioned over 2 processes" in r.stderr
    assert r.stderr.count("done: 6 steps") + r.stdout.count("done: 6 steps") == 1
    # stated tolerance: rel 1e-4. ZeRO-2 reduces each micro-batch's gradients over the processes, then accumulates:
    # the sums run in another order than one process's (measured: the same to 1e-7 through step 4; the lr 1e-2 spike at
    # step 5, grad norm 10, carries that to 1.5e-5 in step 6's grad norm; data parallel happens to sum in one order)
    assert_same_trajectory(tmp_path / "one", tmp_path / "two", num_steps=6, rel=1e-4)
    for step in (2, 4, 6):  # the same files, written once, in the same format
        x, y = checkpoint.checkpoint_dir(tmp_path / "one", step), checkpoint.checkpoint_dir(tmp_path / "two", step)
        checkpoint.verify(y)
        assert sorted(p.relative_to(x).as_posix() for p in x.rglob("*")) == sorted(p.relative_to(y).as_posix() for p in y.rglob("*"))
    x, y = checkpoint.checkpoint_dir(tmp_path / "one", 6), checkpoint.checkpoint_dir(tmp_path / "two", 6)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(x / weights), load_file(y / weights)
    assert sorted(wa) == sorted(wb)
    for k in wa:  # measured: 1.8e-6 at most, on weights of size 0.1
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k
    # the optimizer state gathered from the partitions: the one-process layout and values
    oa, ob = load_file(x / checkpoint.STATE_TENSORS), load_file(y / checkpoint.STATE_TENSORS)
    assert sorted(oa) == sorted(ob) and len(oa) > 2
    for k in oa:
        assert oa[k].dtype == ob[k].dtype and torch.allclose(oa[k], ob[k], rtol=1e-4, atol=1e-7), k
    ta, tb = (json.loads((d / checkpoint.STATE_JSON).read_text())["optimizer"] for d in (x, y))
    assert ta == tb  # the same tree: param_groups (hyperparameters, positions) and the state's keys
    assert not list(y.rglob("*.pt")) and not list(y.rglob("*.bin"))  # nothing DeepSpeed pickles


def test_zero2_killed_launcher_resumes_bit_for_bit_and_one_process_continues(tmp_path, tiny_model_dir, chat_file):
    settings = {"max_steps": 30, "micro_batch_size": 2, "sample_every_steps": None}
    full = with_method(write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "full", **settings), tiny_model_dir, "full")
    cut = with_method(write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "cut", **settings), tiny_model_dir, "full")
    r = launch(zero2(str(full)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(zero2(str(cut)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (tmp_path / "cut/checkpoints/step-000006/MANIFEST.json").is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only
    proc.wait()
    time.sleep(5)
    assert subprocess.run(["pgrep", "-f", f"finetrack train {cut}"], capture_output=True, text=True).stdout.split() == []
    assert not (tmp_path / "cut/checkpoints/step-000030").exists(), "the run finished before it was cut off"
    r = launch(zero2(str(cut)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("resuming from") == 1  # said once, by the main process
    a, b = (untimed_metrics(tmp_path / d) for d in ("full", "cut"))
    assert a == b
    x, y = (d / "checkpoints/step-000030" for d in (tmp_path / "full", tmp_path / "cut"))
    for name in ("model.safetensors", checkpoint.STATE_TENSORS):
        assert (x / name).read_bytes() == (y / name).read_bytes(), name

    # the checkpoint is a one-process checkpoint: one process continues it with --allow-config-change
    r = launch(
        [sys.executable, "-m", "finetrack", "train", str(cut), "train.max_steps=32", "train.grad_accum_steps=2", "--allow-config-change"],
        tmp_path,
    )
    assert r.returncode == 0 and "done: 32 steps" in r.stdout + r.stderr, r.stderr[-2000:]


ZERO_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
mixed_precision: '{precision}'
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: {offload}
  offload_param_device: none
  zero3_init_flag: false
{extra}"""


@pytest.mark.parametrize(
    "settings, args, expected",
    [
        ({"stage": 3}, [], "DeepSpeed ZeRO stage 3: not supported"),
        ({"offload": "cpu"}, [], "DeepSpeed offload_optimizer_device: cpu: not supported"),
        ({"precision": "bf16"}, [], "DeepSpeed's bf16 engine: not supported"),
        ({"extra": "  gradient_accumulation_steps: 4\n"}, [], "the DeepSpeed config sets gradient_accumulation_steps: 4"),
        ({}, ["model.method=qlora"], "model.method qlora under DeepSpeed"),
    ],
)
def test_deepspeed_launches_finetrack_cannot_run_are_refused(tmp_path, tiny_model_dir, chat_file, settings, args, expected):
    """Through the real launcher and an accelerate config: one error line per process, no run directory."""
    accelerate_config = tmp_path / "zero.yaml"
    accelerate_config.write_text(ZERO_CONFIG.format(**{"stage": 2, "offload": "none", "precision": "no", "extra": "", **settings}))
    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "out")
    r = launch(zero2(str(config), *args, config=accelerate_config), tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(expected in line for line in errors), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
