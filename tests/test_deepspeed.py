"""DeepSpeed ZeRO (stages 1, 2 and 3) through accelerate on CPU with gloo, through the real launcher and the accelerate
config a user copies (examples/accelerate/deepspeed_zero2.yaml, its zero_stage changed): LoRA and full fine-tuning give
the one-process trajectory at the same global batch, with gradient accumulation; checkpoints hold the weights (ZeRO-3:
gathered) and the optimizer state gathered from the partitions in the one-process layout (no pickle); kill -9 of the
launcher and the same command resumes bit for bit; one process continues a ZeRO run's checkpoint; what finetrack
cannot checkpoint or whose settings contradict its config is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import read_jsonl
from test_multiprocess import (
    accelerate_launch,
    assert_killed_launcher_resumes_bit_for_bit,
    assert_refused_before_loading,
    assert_same_checkpoints,
    assert_same_trajectory,
    launch,
    with_method,
    write_config,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is part of the test extra (pip install -e '.[test]')")

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "examples/accelerate/deepspeed_zero2.yaml"


def zero(*args: str, config: Path = ACCELERATE_CONFIG) -> list[str]:
    """The command the README gives for DeepSpeed ZeRO, 2 processes."""
    return accelerate_launch(config, *args)


# the slow ones (10-80 s each, README "Tests"): run with -m slow; the suite keeps ZeRO-2 LoRA and ZeRO-3 full
# trajectories, the ZeRO-3 kill -9 resume and one refusal through the launcher
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "stage, method",
    [
        (2, "lora"),
        pytest.param(2, "full", marks=SLOW),
        pytest.param(1, "lora", marks=SLOW),
        pytest.param(3, "lora", marks=SLOW),
        (3, "full"),
    ],
)
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
    r = launch(zero(str(two), config=accelerate_config), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    partitioned = {1: "optimizer state", 2: "gradients and optimizer state", 3: "parameters, gradients and optimizer state"}[stage]
    assert f"DeepSpeed ZeRO-{stage}: {partitioned} partitioned over 2 processes" in r.stderr
    assert r.stderr.count("done: 6 steps") + r.stdout.count("done: 6 steps") == 1
    # stated tolerance: rel 1e-4. ZeRO reduces each micro-batch's gradients over the processes, then accumulates: the
    # sums run in another order than one process's (measured: the same to about 1e-7 through step 4; the lr 1e-2 spike
    # at step 5, grad norm 10, carries that to 3e-5 in step 6's grad norm; data parallel happens to sum in one order)
    assert_same_trajectory(tmp_path / "one", tmp_path / "two", num_steps=6, rel=1e-4)
    # weights: measured 5.5e-6 at most, on weights of size 0.1
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two", (2, 4, 6), method, tiny_model_dir, weights_atol=1e-5)
    y = tmp_path / "two/checkpoints"
    assert not list(y.rglob("*.pt")) and not list(y.rglob("*.bin"))  # nothing DeepSpeed pickles
    # samples: ZeRO-3 answers on every process in step (each forward gathers parameters), the main process writes
    assert [(s["step"], s["answer"]) for s in read_jsonl(tmp_path / "two/samples.jsonl")] == [
        (s["step"], s["answer"]) for s in read_jsonl(tmp_path / "one/samples.jsonl")
    ]


@pytest.mark.parametrize("stage", [pytest.param(2, marks=SLOW), 3])
def test_zero_killed_launcher_resumes_bit_for_bit_and_one_process_continues(tmp_path, tiny_model_dir, chat_file, stage):
    settings = {"max_steps": 30, "micro_batch_size": 2, "sample_every_steps": None}
    full = with_method(write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "full", **settings), tiny_model_dir, "full")
    cut = with_method(write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "cut", **settings), tiny_model_dir, "full")
    accelerate_config = tmp_path / "zero.yaml"
    accelerate_config.write_text(ACCELERATE_CONFIG.read_text().replace("zero_stage: 2", f"zero_stage: {stage}"))
    command = lambda config: zero(str(config), config=accelerate_config)  # noqa: E731
    assert_killed_launcher_resumes_bit_for_bit(command, tmp_path, full, cut, 6, 30, "model.safetensors")

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
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
{extra}"""


ZERO_JSON_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
deepspeed_config:
  deepspeed_config_file: {path}
  zero3_init_flag: false
"""


@pytest.mark.parametrize(
    "settings, expected",
    [
        pytest.param({"precision": "bf16"}, "DeepSpeed's bf16 engine: not supported", marks=SLOW),
        (
            {"extra": "  gradient_accumulation_steps: 4\n"},
            "the DeepSpeed config sets gradient_accumulation_steps: 4, but train.grad_accum_steps gives 1",
        ),
        pytest.param(
            {"json": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}},
            "the DeepSpeed config has an `optimizer` section: not supported",
            marks=SLOW,
        ),
    ],
)
def test_deepspeed_configs_that_contradict_finetrack_are_refused(tmp_path, tiny_model_dir, chat_file, settings, expected):
    """Through the real launcher and an accelerate config: one error line per process, no run directory."""
    accelerate_config = tmp_path / "zero.yaml"
    if "json" in settings:  # a DeepSpeed JSON config named by the accelerate config
        (tmp_path / "ds.json").write_text(json.dumps(settings["json"]))
        accelerate_config.write_text(ZERO_JSON_CONFIG.format(path=tmp_path / "ds.json"))
    else:
        accelerate_config.write_text(ZERO_CONFIG.format(**{"precision": "no", "extra": "", **settings}))
    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "out")
    r = launch(zero(str(config), config=accelerate_config), tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(expected in line for line in errors), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, [], "DeepSpeed ZeRO stage 0: not supported"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, [], "DeepSpeed offload_optimizer_device: cpu: not supported"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, [], "DeepSpeed offload_param_device: nvme: not supported"),
        ({}, ["model.method=qlora"], "model.method qlora under DeepSpeed"),
        ({"WORLD_SIZE": "1"}, [], "accelerate launch with DeepSpeed needs several processes"),
    ],
)
def test_deepspeed_launches_finetrack_cannot_run_are_refused(tmp_path, tiny_model_dir, chat_file, env, args, expected):
    """What accelerate launch sets for such a DeepSpeed config: one error line, before any model is loaded or the run
    directory exists."""
    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "out")
    assert_refused_before_loading(tmp_path, config, args, {"ACCELERATE_USE_DEEPSPEED": "true", **env}, expected)
