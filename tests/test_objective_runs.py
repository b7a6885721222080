"""Runs with the regression and contrastive objectives on the tiny model: the accumulation invariant per target and per
triplet, bit-exact resume (also after kill -9), which parameters train with a head for every method, and the
objective as configuration (recorded, checked on resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import kill_9_when, read_jsonl, tiny_run
from safetensors.torch import load_file

from finetrack import objectives
from finetrack.config import ConfigError, load_config
from finetrack.resume import Request

# the head's dropout makes the RNG state matter on resume
REGRESSION = ("objective.kind=regression", "objective.regression.level=step", "objective.regression.head.hidden_sizes=[8]")
HEAD_DROPOUT = "objective.regression.head.dropout=0.1"  # on resume: the RNG state must matter (not in the accumulation test)
CONTRASTIVE = ("objective.kind=contrastive", "objective.contrastive.lambda_task=0.5", "objective.contrastive.tau=0.5")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model.safetensors", "adapter_model.safetensors", "head.safetensors"):
        if (folder / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(folder / name).items()})
    return out


@pytest.mark.parametrize("kind", ["regression", "contrastive"])
def test_accumulation_invariant_per_target_and_per_triplet(tmp_path, tiny_model_dir, steps_file, triplet_file, kind):
    """micro-batch 4 x accumulation 1 == micro-batch 1 x accumulation 4: step-level rows carry 1-4 targets each, so a
    per-micro-batch mean would weigh them differently; triplets weigh each triplet once."""
    data, extra = (steps_file, REGRESSION) if kind == "regression" else (triplet_file, CONTRASTIVE)
    common = ("model.method=full", "train.max_steps=3", *extra)
    a, ma = tiny_run(tmp_path, tiny_model_dir, data, *common, "train.micro_batch_size=4", name="a")
    b, mb = tiny_run(tmp_path, tiny_model_dir, data, *common, "train.micro_batch_size=1", "train.grad_accum_steps=4", name="b")
    keys = [k for k in ma[0] if k.startswith(("loss", "stability", "separation", "discrimination", "grad_norm"))]
    assert len(keys) >= (2 if kind == "regression" else 6), keys
    for x, y in zip(ma, mb):
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], rel=1e-4, abs=1e-5)
    wa, wb = _weights(a.final_checkpoint), _weights(b.final_checkpoint)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kind, method", [("regression", "lora"), ("regression", "full"), ("contrastive", "lora"), ("contrastive", "qlora")]
)
def test_resume_is_bit_exact(tmp_path, tiny_model_dir, steps_file, triplet_file, kind, method):
    data, extra = (steps_file, (*REGRESSION, HEAD_DROPOUT)) if kind == "regression" else (triplet_file, CONTRASTIVE)
    lora = ("model.lora.dropout=0.1",) if method != "full" else ()
    common = (f"model.method={method}", *lora, "checkpoint.every_steps=3", "train.max_steps=6", *extra)
    ref, ref_metrics = tiny_run(tmp_path, tiny_model_dir, data, *common, name="ref")
    shutil.copytree(ref.run_dir, tmp_path / "cut")
    for d in (tmp_path / "cut/checkpoints").glob("step-*"):
        if int(d.name[5:]) > 3:
            shutil.rmtree(d)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, data, *common, name="cut")
    assert result.resumed_from_step == 3
    measured = ("time", "tokens_per_s", "peak_mem_mib")  # of the machine, not of the training

    def numbers(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in measured} for m in records]

    assert numbers(metrics) == numbers(ref_metrics)
    a, b = _weights(ref.final_checkpoint), _weights(result.final_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "regression":
        assert any(k.startswith("head.safetensors") for k in a)


class Capture:
    """Trains with the config's objective and keeps the model the run trains, with its parameters before step 1."""

    def __init__(self, objective) -> None:
        self.objective, self.model, self.initial = objective, None, {}

    def __call__(self, model, batch):
        if self.model is None:
            self.model = model
            self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        return self.objective(model, batch)


@pytest.mark.parametrize("method, freeze", [("full", False), ("lora", False), ("qlora", False), ("lora", True), ("full", True)])
def test_which_parameters_train_with_a_head(tmp_path, tiny_model_dir, regression_file, method, freeze):
    """full: the model and the head; LoRA / QLoRA: the adapters and the head (the base frozen); freeze_backbone: the
    head alone. Every trainable tensor moves, no frozen one does."""
    overrides = (
        f"model.method={method}",
        *(("model.lora.r=4",) if method != "full" else ()),
        "objective.kind=regression",
        f"objective.regression.freeze_backbone={str(freeze).lower()}",
    )
    cfg = load_config(None, ["objective.kind=regression", f"objective.regression.freeze_backbone={str(freeze).lower()}"])
    seen = Capture(objectives.build(cfg.objective))
    result, _ = tiny_run(tmp_path, tiny_model_dir, regression_file, *overrides, "train.max_steps=2", objective=seen)
    params = dict(seen.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    head = {n for n in params if n.startswith("head.")}
    assert head and head <= trainable
    if freeze:
        expected = head
    elif method == "full":
        expected = set(params)
    else:
        expected = head | {n for n in params if "lora_" in n}
    assert trainable == expected
    moved = {n for n in params if not torch.equal(params[n].detach(), seen.initial[n])}
    # the output layer trains but no regression loss reaches it (lm_weight is 0): it gets no gradient and stays
    assert moved == trainable - {"lm.lm_head.weight"}
    saved = load_file(result.final_checkpoint / "head.safetensors")
    assert torch.equal(saved["layers.1.weight"], params["head.layers.1.weight"].detach())


def test_objective_is_configuration_recorded_and_checked_on_resume(tmp_path, tiny_model_dir, regression_file):
    """A config written by hand -> train -> config.resolved.yaml and meta.json hold the objective; a resume with another
    objective is refused, naming the setting; the resolved config trains again as it is."""
    config = tmp_path / "verifier.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_model_dir), "method": "lora", "lora": {"r": 4}},
                "data": {"path": str(regression_file), "eval_split": 0.25},
                "objective": {"kind": "regression", "regression": {"pool": "mean", "loss": "huber", "normalize_targets": True}},
                "train": {"max_steps": 2, "micro_batch_size": 4},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    proc = subprocess.run([sys.executable, "-m", "finetrack", "train", str(config)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "run/config.resolved.yaml").read_text())
    assert resolved["objective"] == {
        "kind": "regression",
        "regression": {**resolved["objective"]["regression"], "pool": "mean", "loss": "huber", "normalize_targets": True},
    }
    assert "contrastive" not in resolved["objective"]
    meta = json.loads((tmp_path / "run/checkpoints/step-000002/meta.json").read_text())
    assert meta["config"]["objective"]["regression"]["loss"] == "huber"
    head = json.loads((tmp_path / "run/checkpoints/step-000002/head.json").read_text())
    assert head["pool"] == "mean" and head["normalize_targets"] is True and head["target_std"] > 0
    metrics = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert "eval_loss" in metrics[-1] and "eval_ppl" not in metrics[-1]
    # a longer run of the same directory with another loss: refused, naming it
    proc = subprocess.run(
        [sys.executable, "-m", "finetrack", "train", str(config), "train.max_steps=3", "objective.regression.loss=mse"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "objective.regression.loss: huber -> mse" in proc.stderr, proc.stderr[-2000:]
    # the resolved config is a config: it continues the run (3 steps) with the same objective
    proc = subprocess.run(
        [sys.executable, "-m", "finetrack", "train", str(tmp_path / "run/config.resolved.yaml"), "train.max_steps=3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "resuming from" in proc.stderr, proc.stderr[-2000:]


def test_a_changed_python_objective_file_is_refused_on_resume(tmp_path, tiny_model_dir, chat_file):
    loss_file = tmp_path / "my_loss.py"
    loss_file.write_text(
        "from finetrack.objectives import Term, next_token_sum\ndef fn(model, batch):\n    return {'lm': Term(next_token_sum(model, batch), 'tokens')}\n"
    )
    common = ("model.method=full", "objective.kind=python", f"objective.python.function={loss_file}:fn", "checkpoint.every_steps=1")
    tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.max_steps=1")
    loss_file.write_text(loss_file.read_text() + "# changed\n")
    with pytest.raises(ConfigError, match="resolved.objective_sha256"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.max_steps=2")
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.max_steps=2", request=Request(allow_config_change=True))
    assert result.resumed_from_step == 1


@pytest.mark.parametrize(
    "function, message",
    [
        ("nowhere.py:fn", "no such file nowhere.py"),
        ("no_such_module_xyz:fn", "no module no_such_module_xyz"),
        ("{f}:missing", "defines no function or class 'missing'"),
        ("{f}:returns_float", "returned float: it must return {name: finetrack.objectives.Term}"),
        ("{f}:bad_unit", "term 'x' has unit 'parsecs'"),
    ],
)
def test_python_objective_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, chat_file, function, message):
    f = tmp_path / "loss.py"
    f.write_text(
        "from finetrack.objectives import Term, next_token_sum\n"
        "def returns_float(model, batch):\n    return 1.0\n"
        "def bad_unit(model, batch):\n    return {'x': Term(next_token_sum(model, batch), 'parsecs')}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetrack",
            "train",
            f"model.name={tiny_model_dir}",
            f"data.path={chat_file}",
            f"output.dir={tmp_path / 'run'}",
            "model.method=full",
            "train.max_steps=1",
            "objective.kind=python",
            f"objective.python.function={function.format(f=f)}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["regression", "contrastive"])
def test_kill_9_then_the_same_command_gives_identical_weights(tmp_path, tiny_model_dir, steps_file, triplet_file, kind):
    data, extra = (steps_file, (*REGRESSION, HEAD_DROPOUT)) if kind == "regression" else (triplet_file, CONTRASTIVE)
    argv = [
        sys.executable,
        "-m",
        "finetrack",
        "train",
        f"model.name={tiny_model_dir}",
        f"data.path={data}",
        "model.lora.r=4",
        "model.lora.dropout=0.1",
        "train.max_steps=12",
        "train.micro_batch_size=2",
        "checkpoint.every_steps=2",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run([*argv, f"output.dir={tmp_path / 'ref'}"], capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    kill_9_when([*argv, f"output.dir={out}"], out / "checkpoints/step-000004", env)
    again = subprocess.run([*argv, f"output.dir={out}"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "resuming from" in again.stderr, again.stderr[-2000:]
    assert [m["loss"] for m in read_jsonl(out / "metrics.jsonl")] == [m["loss"] for m in read_jsonl(tmp_path / "ref/metrics.jsonl")]
    a, b = _weights(tmp_path / "ref/checkpoints/step-000012"), _weights(out / "checkpoints/step-000012")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
