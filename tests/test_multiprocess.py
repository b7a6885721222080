"""Data-parallel training on CPU (gloo) through the real launchers: `accelerate launch --multi_gpu` and `torchrun` start
2 processes of `finetrack train CONFIG` (a config written by hand, the tiny model). The 2-process run gives the
1-process trajectory at the same global batch, writes each checkpoint once in the same format, samples and validates
once; kill -9 of the launcher stops its workers and the same command resumes bit for bit; another process count is
refused on resume; a launch that would quietly train one process is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl

from finetrack import checkpoint

BIN = Path(sys.executable).parent
QUESTIONS = "- id: a\n  question: alpha beta\n- id: b\n  question: gamma delta\n"


def write_config(tmp_path: Path, model_dir: Path, data: Path, out: Path, **train) -> Path:
    """The config a user writes: LoRA on the tiny model, held-out loss, samples, a judge suite validated during training."""
    questions = tmp_path / "questions.yaml"
    questions.write_text(QUESTIONS)
    config = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_length": 512, "eval_split": 0.25},
        "train": {
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "max_steps": 6,
            "lr": 1e-2,
            "warmup_steps": 0,
            "log_every_steps": 1,
            "sample_every_steps": 3,
            "sample_prompts": ["alpha beta gamma"],
            "sample_generation": {"max_new_tokens": 4},
            **train,
        },
        "checkpoint": {"every_steps": 2},
        "eval": {
            "loss_every_steps": 2,
            "every_steps": 3,
            "suites": [
                {
                    "name": "qa",
                    "kind": "judge",
                    "questions": str(questions),
                    "generation": {"max_new_tokens": 4, "temperature": 0},
                    "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
                }
            ],
        },
        "output": {"dir": str(out)},
    }
    if config["train"]["sample_every_steps"] is None:  # no samples: none of their settings
        config["train"] = {k: v for k, v in config["train"].items() if not k.startswith("sample_")}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(n: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", free_port(), "-m", "finetrack", "train", *args]


def accelerate_launch(accelerate_config: Path, *args: str) -> list[str]:
    """`accelerate launch --config_file FILE` of `finetrack train ARGS` on 2 processes (the README's FSDP / DeepSpeed commands)."""
    return [str(BIN / "accelerate"), "launch", "--config_file", str(accelerate_config), "--num_processes", "2"] + [
        "--main_process_port",
        free_port(),
        "-m",
        "finetrack",
        "train",
        *args,
    ]


def with_method(config: Path, model_dir: Path, method: str) -> Path:
    """The config at `config` with model.method set (write_config's configs are LoRA)."""
    config.write_text(config.read_text().replace(f"name: {model_dir}", f"name: {model_dir}\n  method: {method}"))
    return config


def assert_refused_before_loading(tmp_path: Path, config: Path, args: list[str], env: dict[str, str], expected: str) -> None:
    """`finetrack train CONFIG ARGS` with what a launcher sets (`env`): exit 2 with one `error:` line holding `expected`,
    no traceback, before any model is loaded or the run directory (tmp_path/out) exists."""
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


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def untimed_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step without the timing fields (they differ between any two runs)."""
    timing = ("tokens_per_s", "peak_mem_mib", "time")
    return {step: {k: v for k, v in row.items() if k not in timing} for step, row in metrics(run_dir).items()}


def assert_same_trajectory(one: Path, two: Path, num_steps: int, rel: float = 1e-5) -> None:
    """Every logged loss, gradient norm, token count, held-out loss and validation metric of run `two` within `rel` of
    run `one`'s, at every step, and the same keys logged."""
    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == list(range(num_steps + 1))
    for step in range(1, num_steps + 1):
        for key in ("loss", "grad_norm", "tokens", "target_tokens", "eval_loss", "val/qa.has_a"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)
    assert {k for r in a.values() for k in r} == {k for r in b.values() for k in r}


def assert_killed_launcher_resumes_bit_for_bit(
    command: Callable[[Path], list[str]], tmp_path: Path, full: Path, cut: Path, kill_after_step: int, last_step: int, weights: str
) -> None:
    """`command(config)` launches several processes. An uninterrupted run of `full`; a run of `cut` whose launcher alone
    is SIGKILLed once checkpoint `kill_after_step` exists, then the same command: no worker outlived its launcher, the
    resume is said once, and every metrics line and the last checkpoint's `weights` and optimizer state are
    byte-identical to the uninterrupted run's."""
    r = launch(command(full), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(command(cut), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (checkpoint.checkpoint_dir(tmp_path / "cut", kill_after_step) / "MANIFEST.json").is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers must not train on
    proc.wait()
    time.sleep(5)
    workers = subprocess.run(["pgrep", "-f", f"finetrack train {cut}"], capture_output=True, text=True).stdout.split()
    assert workers == [], "the workers outlived their launcher"
    assert not checkpoint.checkpoint_dir(tmp_path / "cut", last_step).exists(), "the run finished before it was cut off"
    r = launch(command(cut), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("resuming from") == 1  # said once, by the main process
    a, b = (untimed_metrics(tmp_path / d) for d in ("full", "cut"))
    assert a == b
    for name in (weights, checkpoint.STATE_TENSORS):
        x, y = (checkpoint.checkpoint_dir(tmp_path / d, last_step) / name for d in ("full", "cut"))
        assert x.read_bytes() == y.read_bytes(), name


def assert_same_checkpoints(one: Path, two: Path, steps: tuple[int, ...], method: str, model_dir: Path, weights_atol: float = 1e-6) -> None:
    """Run `two`'s checkpoints (several processes, sharded or partitioned) against run `one`'s (one process, the same
    global batch): the same files, written once, verified; weights within rtol 1e-4 / `weights_atol`; the optimizer state
    in the one-process layout with the same tree and values; the last checkpoint loads where its library loads it,
    without finetrack (plain transformers for a full fine-tune, PEFT for an adapter)."""
    import torch
    from safetensors.torch import load_file

    for step in steps:
        x, y = checkpoint.checkpoint_dir(one, step), checkpoint.checkpoint_dir(two, step)
        checkpoint.verify(y)
        assert sorted(p.relative_to(x).as_posix() for p in x.rglob("*")) == sorted(p.relative_to(y).as_posix() for p in y.rglob("*"))
    x, y = checkpoint.checkpoint_dir(one, steps[-1]), checkpoint.checkpoint_dir(two, steps[-1])
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(x / weights), load_file(y / weights)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=weights_atol), k
    oa, ob = load_file(x / checkpoint.STATE_TENSORS), load_file(y / checkpoint.STATE_TENSORS)  # tensor names: parameter positions
    assert sorted(oa) == sorted(ob) and len(oa) > 2
    for k in oa:
        assert oa[k].dtype == ob[k].dtype and torch.allclose(oa[k], ob[k], rtol=1e-4, atol=1e-7), k
    ta, tb = (json.loads((d / checkpoint.STATE_JSON).read_text())["optimizer"] for d in (x, y))
    assert ta == tb  # param_groups (hyperparameters, positions) and the state's keys
    from transformers import AutoModelForCausalLM

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(y)
        assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])
    else:
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), y)


def test_two_processes_give_the_one_process_trajectory(tmp_path, tiny_model_dir, chat_file):
    one = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "one", grad_accum_steps=2)
    two = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "two")
    r = launch([sys.executable, "-m", "finetrack", "train", str(one)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    r = launch([*accelerate, "-m", "finetrack", "train", str(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global_batch_size = 8 (micro_batch_size 4 x grad_accum_steps 1 x 2 process(es))" in r.stderr
    assert r.stderr.count("global_batch_size = 8") == 1 and r.stdout.count("done: 6 steps") == 1  # the main process reports
    # stated tolerance: rel 1e-5 (gloo sums the two processes' gradients as accumulation sums the micro-batches; measured
    # bit-identical here, but another reduction order may round differently)
    assert_same_trajectory(tmp_path / "one", tmp_path / "two", num_steps=6)
    # each checkpoint written once, same files, same format, the weights equal
    for step in (2, 4, 6):
        x, y = checkpoint.checkpoint_dir(tmp_path / "one", step), checkpoint.checkpoint_dir(tmp_path / "two", step)
        checkpoint.verify(y)
        assert sorted(p.relative_to(x).as_posix() for p in x.rglob("*")) == sorted(p.relative_to(y).as_posix() for p in y.rglob("*"))
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "checkpoints/step-000006/adapter_model.safetensors") for d in (tmp_path / "one", tmp_path / "two"))
    assert all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)
    # samples and validation once per step, from the unwrapped model, as in one process
    samples = [(s["step"], s["prompt"]) for s in read_jsonl(tmp_path / "two/samples.jsonl")]
    assert samples == [(0, "alpha beta gamma"), (3, "alpha beta gamma"), (6, "alpha beta gamma")]
    assert [s["answer"] for s in read_jsonl(tmp_path / "two/samples.jsonl")] == [
        s["answer"] for s in read_jsonl(tmp_path / "one/samples.jsonl")
    ]


def test_killed_launcher_stops_its_workers_and_the_same_command_resumes_bit_for_bit(tmp_path, tiny_model_dir, chat_file):
    settings = {"max_steps": 40, "micro_batch_size": 2, "sample_every_steps": None}
    full = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "full", **settings)
    cut = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "cut", **settings)
    command = lambda config: torchrun(2, str(config))  # noqa: E731
    assert_killed_launcher_resumes_bit_for_bit(command, tmp_path, full, cut, 8, 40, "adapter_model.safetensors")

    # another process count: refused, saying why; --allow-config-change continues (same global batch)
    r = launch([sys.executable, "-m", "finetrack", "train", str(cut), "train.max_steps=44"], tmp_path)
    assert r.returncode == 2 and "it was trained by 2 process(es), this launch has 1" in r.stderr, r.stderr[-2000:]
    assert "not continue bit for bit" in r.stderr and "torchrun --nproc_per_node 2" in r.stderr
    r = launch(
        [sys.executable, "-m", "finetrack", "train", str(cut), "train.max_steps=44", "train.grad_accum_steps=2", "--allow-config-change"],
        tmp_path,
    )
    assert r.returncode == 0 and "done: 44 steps" in r.stdout + r.stderr, r.stderr[-2000:]


def test_accelerate_launch_cpu_that_would_start_one_process_is_refused(tmp_path, tiny_model_dir, chat_file):
    """`accelerate launch --cpu --num_processes 2` runs one process (accelerate's simple launcher): it would train with
    half the global batch and say nothing. finetrack stops before creating the run directory."""
    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "out")
    argv = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "-m", "finetrack", "train", str(config)]
    r = launch(argv, tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "asked for several processes but started one" in errors[0] and "torchrun --nproc_per_node N" in errors[0]
    assert not (tmp_path / "out").exists()


def test_eval_shares_the_steps_between_processes(tmp_path, tiny_model_dir, chat_file):
    """`torchrun --nproc_per_node 2 -m finetrack eval RUN`: each process evaluates every other step; the step files and
    eval/summary.csv are those of a one-process eval, the table printed once."""
    import shutil

    config = write_config(tmp_path, tiny_model_dir, chat_file, tmp_path / "run", sample_every_steps=None)
    r = launch([sys.executable, "-m", "finetrack", "train", str(config)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(tmp_path / "run/eval")  # validation during training wrote some steps: evaluate all of them here
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    one = launch([sys.executable, "-m", "finetrack", "eval", str(tmp_path / "run")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "-m", "finetrack", "eval", str(tmp_path / "copy")],
        tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for step in (0, 2, 4, 6):
        a, b = (json.loads((d / f"eval/step-{step:06d}.json").read_text()) for d in (tmp_path / "run", tmp_path / "copy"))
        assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-6) and b["counts"] == a["counts"], step
    assert (tmp_path / "copy/eval/summary.csv").read_text().splitlines()[0] == (tmp_path / "run/eval/summary.csv").read_text().splitlines()[
        0
    ]
    assert two.stdout.count("step  phase") == one.stdout.count("step  phase") == 1  # the table, by the main process only
    for step in (0, 2, 4, 6):  # every step's answers, whichever process wrote them
        assert (tmp_path / f"copy/eval/responses/step-{step:06d}.jsonl").read_text() == (
            tmp_path / f"run/eval/responses/step-{step:06d}.jsonl"
        ).read_text()
