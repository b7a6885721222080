"""`finetrack plan`: the same data, schedule and step order as `train` (checked against a real run of
the tiny model), FLOPs arithmetic by hand, sizes, targets, the fit verdict with ranked changes, cost,
--measure and the CLI with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run

from finetrack.config import ConfigError, load_config
from finetrack.memory import Architecture
from finetrack.plan import flops_per_micro_batch_tokens, make_plan, parse_bytes, target_for

TINY = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": False, "model_type": "llama"}


def tiny_cfg(tmp_path: Path, model_dir: Path, data: Path, *overrides: str):
    return load_config(None, [f"model.name={model_dir}", f"data.path={data}", f"output.dir={tmp_path / 'run'}", "data.max_length=512",
                              "train.micro_batch_size=4", "train.max_steps=6", "train.lr=1e-2", "train.warmup_steps=0", *overrides])


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 2**30), ("80GiB", 80 * 2**30), ("16000MB", 16000 * 2**20), ("1.5 tb", int(1.5 * 2**40)), ("512", 512)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_error():
    with pytest.raises(ConfigError, match="write a size such as 24GB"):
        parse_bytes("lots")


def test_length_histogram():
    from finetrack.plan import length_histogram

    assert length_histogram([1, 2, 3, 4, 5, 64, 65, 600]) == [(1, 1), (2, 1), (4, 2), (8, 1), (64, 1), (128, 1), (1024, 1)]


@pytest.mark.parametrize("lengths, pack, expected", [
    ([3, 3], False, (2, 3, False)),  # equal rows: no padding, no mask
    ([3, 2], False, (2, 3, True)),  # padded
    ([6], True, (1, 6, False)),  # one sample, one row
    ([3, 3], True, (1, 6, True)),  # two samples share a row: attention keeps them apart with a mask
])
def test_micro_batch_shape(lengths, pack, expected):
    from finetrack.batches import micro_batch_shape

    assert micro_batch_shape(lengths, pack, 6 if pack else None) == expected


def test_targets():
    t = target_for("h100", None)
    assert (t.device_type, t.name, t.peak_flops_per_s, t.memory_bytes, t.bf16) == ("cuda", "H100", 989e12, 80 * 2**30, True)
    assert target_for("T4", "12GB").memory_bytes == 12 * 2**30 and not target_for("T4", None).bf16
    with pytest.raises(ConfigError, match="known GPUs are H200, H100"):
        target_for("B9000", None)
    cpu = target_for(None, None)
    assert cpu.device_type == "cpu" and cpu.peak_flops_per_s is None and cpu.memory_bytes > 2**30  # this machine's RAM


def test_flops_by_hand():
    arch = Architecture.from_hf_config(TINY)
    # per layer: q 64x64 + k, v 64x32 each + o 64x64 + gate, up, down 64x128 each = 4096 + 4096 + 4096 + 24576 = 36864; 2 layers
    linear = 2 * 36864
    assert flops_per_micro_batch_tokens(arch, "full", False) == (2 * linear * 3, 2 * 300 * 64 * 3, 4 * 2 * 64 * 3)
    assert flops_per_micro_batch_tokens(arch, "lora", False) == (2 * linear * 2, 2 * 300 * 64 * 2, 4 * 2 * 64 * 2)
    assert flops_per_micro_batch_tokens(arch, "qlora", True) == (2 * linear * 3, 2 * 300 * 64 * 3, 4 * 2 * 64 * 3)


@pytest.mark.parametrize("pack", [True, False])
def test_plan_matches_what_train_does(tmp_path, tiny_model_dir, chat_file, pack):
    """Tokens, loss-carrying tokens, steps and checkpoint steps: plan walks the same order train trains in."""
    overrides = ("train.grad_accum_steps=2", "checkpoint.every_steps=4", "checkpoint.steps=[1]", f"data.pack={str(pack).lower()}",
                 "data.eval_split=0.25", "eval.loss_every_steps=2", "train.log_every_steps=1")
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file, *overrides), target_for("L4", None))
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *overrides, "train.max_steps=6")
    resolved = yaml.safe_load((result.run_dir / "config.resolved.yaml").read_text())["resolved"]
    assert plan.schedule["total_steps"] == 6 == resolved["total_steps"]["value"]
    assert plan.schedule["checkpoint_steps"] == resolved["checkpoint_steps"]["value"] == {1: "steps", 4: "every_steps", 6: "last"}
    assert plan.schedule["eval_loss_steps"] == [2, 4, 6] == [m["step"] for m in metrics if "eval_loss" in m]
    assert plan.time["train_tokens"] == metrics[-1]["tokens"]
    assert plan.time["target_tokens"] == sum(m["target_tokens"] for m in metrics)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert plan.data["train"] == report["train"]
    assert plan.data["per_source"] == {str(chat_file): {"rows": 36, "tokens": report["train"]["tokens"]["total"], "trainable_tokens": report["train"]["trainable_tokens"]}}


def test_time_and_cost_arithmetic(tmp_path, tiny_model_dir, chat_file):
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for("H100", None), price_per_hour=3.80)
    t = plan.time
    assert t["flops_per_s"] == pytest.approx(989e12 * 0.40)
    assert t["train_s"] == pytest.approx(t["train_flops"] / t["flops_per_s"])
    assert t["total_s"] == pytest.approx(t["train_s"] + t["eval_loss_s"] + t["checkpoint_s"])
    assert t["num_checkpoints"] == 1 and t["checkpoint_s"] == pytest.approx(t["checkpoint_bytes"] / 500e6)
    assert t["cost"] == pytest.approx(t["total_s"] / 3600 * 3.80)
    assert t["computed_tokens"] >= t["train_tokens"]  # padding, never less
    assert any("989 TFLOP/s" in a and "40%" in a for a in plan.assumptions)


def test_does_not_fit_lists_changes_that_do(tmp_path, tiny_model_dir, chat_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.micro_batch_size=8")
    fits = make_plan(cfg, target_for("L4", None))
    assert fits.memory["fits"] is True and fits.memory["changes"] == []
    peak = fits.memory["peak_bytes"]
    tight = make_plan(cfg, target_for("L4", f"{peak - 1}B"))
    assert tight.memory["fits"] is False
    changes = tight.memory["changes"]
    assert changes and all(c["peak_bytes"] < peak for c in changes)
    limit = (min(c["peak_bytes"] for c in changes) + peak) // 2  # some changes fit, others do not
    ranked = make_plan(cfg, target_for("L4", f"{limit}B")).memory["changes"]
    fits_first = [c["peak_bytes"] <= limit for c in ranked]
    assert fits_first[0] and not fits_first[-1] and fits_first == sorted(fits_first, reverse=True)


def test_measure_runs_real_steps(tmp_path, tiny_model_dir, chat_file):
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for(None, None), measure_steps=3)
    m = plan.time["measured"]
    assert m["steps"] == 3 and m["tokens_per_s"] > 0 and m["peak_mem_mb"] > 0 and m["device"] == "cpu"
    assert plan.time["train_s"] == pytest.approx(plan.time["train_tokens"] / m["tokens_per_s"])
    assert not (tmp_path / "run").exists()  # the trial ran in a scratch directory


def test_plan_cli_prints_and_writes_json(tmp_path, tiny_model_dir, chat_file):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    args = [f"model.name={tiny_model_dir}", f"data.path={chat_file}", "data.max_length=512", "train.micro_batch_size=4", "train.max_steps=6",
            "checkpoint.every_steps=2"]
    r = subprocess.run([sys.executable, "-m", "finetrack", "plan", *args, "--gpu", "A10", "--device-memory", "1MB", "--price-per-hour", "2",
                        "--json", str(tmp_path / "plan.json")], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for part in ("data: 48 rows read, 48 to train on", "schedule: 6 optimizer steps", "3 checkpoint(s) at steps 2, 4, 6", "memory on A10 (cuda)",
                 "predicted peak", "DOES NOT FIT", "changes, best first", "time and cost (estimated from FLOPs)", "at 2.00/h:", "assumptions:"):
        assert part in out, part
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["memory"]["fits"] is False and saved["target"]["memory_bytes"] == 2**20 and saved["time"]["price_per_hour"] == 2
