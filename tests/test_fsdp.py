"""Sharded training (accelerate's FSDP2 plugin) on CPU with gloo, through the real launcher and the accelerate config a
user copies (examples/accelerate/fsdp2.yaml): LoRA, full fine-tuning and a regression head give the one-process trajectory at the same
global batch; checkpoints are gathered and written as one process writes them (same files, the optimizer state in the
one-process layout), loadable by plain transformers / PEFT; kill -9 of the launcher and the same command resumes bit for
bit; a one-process run continues from a sharded run's checkpoint; FSDP1 and QLoRA under FSDP are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl
from safetensors.torch import load_file
from test_multiprocess import (
    accelerate_launch,
    assert_killed_launcher_resumes_bit_for_bit,
    assert_refused_before_loading,
    assert_same_checkpoints,
    assert_same_trajectory,
    launch,
    metrics,
    with_method,
    write_config,
)

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "examples/accelerate/fsdp2.yaml"


def fsdp(*args: str) -> list[str]:
    """The command the README gives for sharded training, 2 processes."""
    return accelerate_launch(ACCELERATE_CONFIG, *args)


# the slow ones (20-70 s each, README "Tests"): run with -m slow; the suite keeps the LoRA trajectory and the refusals
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=SLOW)])
def test_fsdp_gives_the_one_process_trajectory_and_checkpoints(tmp_path, tiny_model_dir, chat_file, method):
    one = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "one", grad_accum_steps=2)
    two = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "two")
    for path in (one, two):
        text = with_method(path, tiny_model_dir, method).read_text()
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


@SLOW
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


@SLOW
def test_fsdp_killed_launcher_resumes_bit_for_bit_and_one_process_continues(tmp_path, tiny_model_dir, chat_file):
    settings = {"max_steps": 30, "micro_batch_size": 2, "sample_every_steps": None}
    full = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "full", **settings)
    cut = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "cut", **settings)
    for path in (full, cut):
        with_method(path, tiny_model_dir, "full")
    assert_killed_launcher_resumes_bit_for_bit(lambda config: fsdp(str(config)), tmp_path, full, cut, 6, 30, "model.safetensors")

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
    assert_refused_before_loading(tmp_path, config, args, env, expected)
