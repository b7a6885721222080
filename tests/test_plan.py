"""`finetrack plan`: the same data, schedule and step order as `train` (checked against a real run of
the tiny model), FLOPs arithmetic by hand, sizes, targets, the fit verdict with ranked changes, cost,
--measure and the CLI with --json."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_ARCH, chat_rows, folder_bytes, read_jsonl, tiny_run, write_chat_jsonl

from finetrack.config import Config, ConfigError, load_config
from finetrack.memory import Architecture
from finetrack.plan import CHECKPOINT_SMALL_FILES_BYTES, Target, flops_per_micro_batch_tokens, make_plan, parse_bytes, render, target_for
from finetrack.plan_export import EXPORT_STARTUP_S, EXPORT_WORK_FACTOR, export_size, wait_at_end

TINY = TINY_ARCH


def tiny_cfg(tmp_path: Path, model_dir: Path, data: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={data}",
            f"output.dir={tmp_path / 'run'}",
            "data.max_length=512",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "text, expected", [("24GB", 24 * 2**30), ("80GiB", 80 * 2**30), ("16000MB", 16000 * 2**20), ("1.5 tb", int(1.5 * 2**40)), ("512B", 512)]
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "24"])  # a bare number: bytes or GiB? it was read as 24 bytes
def test_parse_bytes_error(text):
    with pytest.raises(ConfigError, match="write a size with its unit, such as 24GB"):
        parse_bytes(text)


def test_length_histogram():
    from finetrack.plan import length_histogram

    assert length_histogram([1, 2, 3, 4, 5, 64, 65, 600]) == [(1, 1), (2, 1), (4, 2), (8, 1), (64, 1), (128, 1), (1024, 1)]


@pytest.mark.parametrize(
    "lengths, pack, expected",
    [
        ([3, 3], False, (2, 3, False)),  # equal rows: no padding, no mask
        ([3, 2], False, (2, 3, True)),  # padded
        ([6], True, (1, 6, False)),  # one sample, one row
        ([3, 3], True, (1, 6, True)),  # two samples share a row: attention keeps them apart with a mask
    ],
)
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


@pytest.mark.parametrize(
    "name, memory_bytes, key",
    [
        ("NVIDIA A100-SXM4-80GB", None, "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", None, "A100-40GB"),
        ("NVIDIA A100-SXM4", 40 * 2**30, "A100-40GB"),
        ("NVIDIA A10", None, "A10"),
        ("NVIDIA L4", None, "L4"),
        ("NVIDIA L40S", None, "L40S"),
        ("NVIDIA H100 80GB HBM3", None, "H100"),
        ("NVIDIA H200", None, "H200"),
        ("Tesla T4", None, "T4"),
        ("NVIDIA GeForce RTX 4090", None, None),
    ],
)
def test_gpu_key_matches_the_model_as_a_word(name, memory_bytes, key):
    from finetrack.plan import _gpu_key

    assert _gpu_key(name, memory_bytes) == key


def test_a_gpu_named_like_this_one_is_not_this_machine(monkeypatch):
    """--gpu A10 on an A100 (or L4 on an L40S) plans for another machine: a --measure here must not replace its estimate."""
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    assert [target_for(gpu, None).this_machine for gpu in ("A10", "A100-40GB", "A100-80GB")] == [False, False, True]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA L40S")
    assert [target_for(gpu, None).this_machine for gpu in ("L4", "L40S")] == [False, True]


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
    overrides = (
        "train.grad_accum_steps=2",
        "checkpoint.every_steps=4",
        "checkpoint.steps=[1]",
        f"data.pack={str(pack).lower()}",
        "data.eval_split=0.25",
        "eval.loss_every_steps=2",
        "train.log_every_steps=1",
    )
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
    assert plan.data["per_source"] == {
        str(chat_file): {
            "read": 48,
            "rows": 36,
            "held_out": 12,
            "dropped": 0,
            "tokens": report["train"]["tokens"]["total"],
            "trainable_tokens": report["train"]["trainable_tokens"],
        }
    }
    # one checkpoint folder (adapter, optimizer state, tokenizer files, JSON) within 5% of what train wrote
    assert plan.time["checkpoint_bytes"] == pytest.approx(folder_bytes(result.run_dir / "checkpoints" / "step-000006"), rel=0.05)


def test_checkpoint_size_full_bfloat16(tmp_path, tiny_model_dir, chat_file):
    """torch's AdamW keeps its two states in the parameters' dtype: a bf16 full checkpoint is ~3 x 2 B per parameter."""
    overrides = ("model.method=full", "model.dtype=bfloat16", "data.pack=false", "train.max_steps=2")
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file, *overrides), target_for(None, None))
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *overrides)
    folder = result.run_dir / "checkpoints" / "step-000002"
    tokenizer_files = sum((folder / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    num_params = 2 * vocab * 64 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) + 5 * 64  # embeddings + lm_head, 2 layers' linears, 5 norms
    assert plan.time["checkpoint_bytes"] == 2 * num_params + 2 * 2 * num_params + tokenizer_files + CHECKPOINT_SMALL_FILES_BYTES
    assert plan.time["checkpoint_bytes"] == pytest.approx(folder_bytes(folder), rel=0.05)


def test_per_source_read_kept_held_out_dropped(tmp_path, tiny_model_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    write_chat_jsonl(folder / "a.jsonl", chat_rows(12))
    rows = chat_rows(6, seed=1)
    rows[1] = {"messages": "not a list"}  # malformed: skipped
    rows[2] = {"messages": [{"role": "user", "content": "x" * 600}, {"role": "assistant", "content": "y"}]}  # > 512 tokens: dropped
    write_chat_jsonl(folder / "b.jsonl", rows)
    plan = make_plan(
        tiny_cfg(tmp_path, tiny_model_dir, folder, "data.on_error=skip", "data.on_overflow=drop", "data.eval_split=0.25"),
        target_for("L4", None),
    )
    a, b = (plan.data["per_source"][str(folder / name)] for name in ("a.jsonl", "b.jsonl"))
    assert (a["read"], a["dropped"], b["read"], b["dropped"]) == (12, 0, 6, 2)
    assert a["rows"] + a["held_out"] == 12 and b["rows"] + b["held_out"] == 4
    assert a["held_out"] + b["held_out"] == plan.data["train"]["held_out_for_eval"] == 4  # 0.25 x 16 kept rows
    assert a["rows"] + b["rows"] == plan.data["train"]["rows_kept"]
    assert f"b.jsonl: 6 read, {b['rows']} to train on ({b['held_out']} held out, 2 dropped)" in render(plan)


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


def test_eval_phase_is_costed_on_a_line_of_its_own(tmp_path, tiny_model_dir, chat_file):
    from finetrack.evaluate.cost import GENERATION_EFFICIENCY, MODEL_READ_BYTES_PER_S, forward_flops

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?"}) + "\n" for i in range(3)))
    suites = [
        {"name": "heldout", "kind": "loss"},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"max_new_tokens": 16, "num_samples": 2},
            "judges": [{"kind": "pattern", "metric": "m", "pattern": "a"}],
        },
    ]
    cfg = tiny_cfg(
        tmp_path, tiny_model_dir, chat_file, "data.eval_split=0.25", "checkpoint.every_steps=2", f"eval.suites={json.dumps(suites)}"
    )
    plan = make_plan(cfg, target_for("H100", None), price_per_hour=3.80)
    e, rate = plan.time["eval_phase"], plan.time["flops_per_s"]
    assert e["num_steps"] == 1 + plan.time["num_checkpoints"] == 4  # the base model and checkpoints 2, 4, 6
    arch = Architecture.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    # LoRA: the base loaded once, in bfloat16 (what dtype=auto resolves to on an H100)
    assert e["load_s"] == pytest.approx(arch.num_params * 2 / MODEL_READ_BYTES_PER_S)
    heldout, qa = e["suites"]
    assert heldout["seconds"] > 0 and "rows" in heldout["per_step"]
    assert qa["per_step"].startswith("6 answers of <= 16 tokens")  # 3 questions x 2 samples
    # by hand: each answer is a forward over its prompt and 16 new tokens, at the decoding share of the rate
    assert qa["seconds"] > 4 * 6 * forward_flops(arch, 16, 16) / (rate * GENERATION_EFFICIENCY)
    assert e["total_s"] == pytest.approx(e["load_s"] + heldout["seconds"] + qa["seconds"])
    assert e["cost"] == pytest.approx(e["total_s"] / 3600 * 3.80)
    line = next(x for x in render(plan).splitlines() if x.strip().startswith("eval phase"))
    assert "base model + 3 checkpoint(s)" in line and "qa (judge: 6 answers" in line and "at 3.80/h" in line
    assert any("decoding is memory-bound" in a for a in plan.assumptions)
    # a config without suites says so instead of a zero
    assert "eval phase: no eval.suites" in render(make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for("H100", None)))


def test_validation_during_training_is_costed_in_the_run_time(tmp_path, tiny_model_dir, chat_file):
    """eval.every_steps: each validation of a suite costs one evaluated step of the eval phase, counted at steps 0, every
    N and the last; a suite with every_steps 0 is not run during training."""
    suites = [{"name": "heldout", "kind": "loss"}, {"name": "other", "kind": "loss", "every_steps": 0}]
    common = ("data.eval_split=0.25", "checkpoint.every_steps=2", f"eval.suites={json.dumps(suites)}")
    without = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file, *common), target_for("H100", None)).time
    assert without["validation_s"] == 0 and without["num_validations"] == {"heldout": 0, "other": 0}
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file, *common, "eval.every_steps=4"), target_for("H100", None))
    t = plan.time
    total_steps = plan.schedule["total_steps"]
    expected = len({0, *range(4, total_steps + 1, 4), total_steps})
    assert t["num_validations"] == {"heldout": expected, "other": 0}
    heldout = t["eval_phase"]["suites"][0]
    assert t["validation_s"] == pytest.approx(expected * heldout["seconds"] / t["eval_phase"]["num_steps"]) and t["validation_s"] > 0
    assert t["total_s"] == pytest.approx(t["train_s"] + t["eval_loss_s"] + t["checkpoint_s"] + t["validation_s"])
    assert f"+ {expected} suite validation(s)" in render(plan)


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


def test_ranked_changes_start_from_the_largest_micro_batch_of_every_step(tmp_path, tiny_model_dir, chat_file):
    """30 steps are 2.5 epochs, and the largest packed micro-batch is not in the first: a change that keeps the
    micro-batches (gradient checkpointing) predicts the plan's own "on" figure, from the same largest micro-batch."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, chat_file, "data.pack=true", "train.max_steps=30")
    peak = make_plan(cfg, target_for("L4", None)).memory["peak_bytes"]
    mem = make_plan(cfg, target_for("L4", f"{peak - 1}B")).memory
    (checkpointing,) = [c for c in mem["changes"] if c["overrides"] == ["model.gradient_checkpointing=true"]]
    assert checkpointing["peak_bytes"] == mem["gradient_checkpointing"]["on"]["peak_bytes"] < peak
    assert all(c["fits"] == (c["peak_bytes"] <= peak - 1) for c in mem["changes"])


def test_activations_with_and_without_gradient_checkpointing(tmp_path, tiny_model_dir, chat_file):
    off = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for("L4", None))
    on = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file, "model.gradient_checkpointing=true"), target_for("L4", None))
    g = off.memory["gradient_checkpointing"]
    assert g["off"]["configured"] and not g["on"]["configured"]
    # the other setting's figures are those of a plan made with it
    assert g["off"]["peak_bytes"] == off.memory["peak_bytes"] and g["on"]["peak_bytes"] == on.memory["peak_bytes"]
    assert on.memory["gradient_checkpointing"]["on"] == {**g["on"], "configured": True}
    off_terms, on_terms = ({t["name"]: t["bytes"] for t in p.memory["terms"]} for p in (off, on))
    assert g["off"]["activation_bytes"] == off_terms["activations"]
    assert g["on"]["activation_bytes"] == on_terms["activations (checkpointed)"] + on_terms["activations (one layer recomputed)"]
    assert g["on"]["activation_bytes"] < g["off"]["activation_bytes"]
    text = render(off)
    assert f"activations with gradient checkpointing on : {g['on']['activation_bytes'] / 2**20:.1f} MiB" in text
    assert "(the other setting)" in text and "(as configured)" in text


def test_measure_times_only_this_machine(tmp_path, tiny_model_dir, chat_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, chat_file)
    here = make_plan(cfg, target_for(None, None), measure_steps=3)
    m = here.time["measured"]
    assert m["steps"] == 3 and m["tokens_per_s"] > 0 and m["peak_mem_mib"] > 0 and m["device"] == "cpu"
    assert here.time["from_measurement"] and here.time["train_s"] == pytest.approx(here.time["train_tokens"] / m["tokens_per_s"])
    assert "time and cost (measured on this machine)" in render(here)
    assert not (tmp_path / "run").exists()  # the trial ran in a scratch directory
    # another device (an H100 this machine does not have): the FLOPs estimate stays, the measurement is shown apart
    elsewhere = make_plan(cfg, dataclasses.replace(target_for("H100", None), this_machine=False), measure_steps=2)
    t = elsewhere.time
    assert not t["from_measurement"] and t["train_s"] == pytest.approx(t["train_flops"] / t["flops_per_s"])
    assert t["measured"]["train_s_here"] == pytest.approx(t["train_tokens"] / t["measured"]["tokens_per_s"])
    text = render(elsewhere)
    assert "time and cost (estimated from FLOPs)" in text and "NOT used for H100" in text
    assert any("not used for H100" in a for a in elsewhere.assumptions)


def test_processes_multiply_the_rate_on_gpus_not_on_a_cpu(tmp_path, tiny_model_dir, chat_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, chat_file)
    one, two = (make_plan(cfg, target_for("H100", None, n)) for n in (1, 2))
    assert two.time["flops_per_s"] == pytest.approx(2 * one.time["flops_per_s"])
    assert two.time["train_s"] == pytest.approx(two.time["train_flops"] / (2 * 989e12 * 0.40))
    # two GPUs like the one measured: the one-process rate times 2 (the trial itself runs here, on the CPU)
    two_here = make_plan(cfg, Target("cuda", "this GPU", 989e12, 80 * 2**30, True, num_processes=2, this_machine=True), measure_steps=2)
    tps = two_here.time["measured"]["tokens_per_s"]
    assert two_here.time["train_s"] == pytest.approx(two_here.time["train_tokens"] / (2 * tps))
    assert any("x 2 GPUs (data parallel)" in a for a in two_here.assumptions)
    # processes on one CPU share its cores: no speed-up assumed
    assert any("the 2 processes share it" in a for a in make_plan(cfg, target_for(None, None, 2)).assumptions)
    # the memory is per process, a full replica each: said where the memory is, and only with several processes
    assert "each of the 2 holds a full replica (data parallel)" in render(two)
    assert "full replica" not in render(one)


def test_measure_steps_must_be_positive(tmp_path, tiny_model_dir, chat_file):
    with pytest.raises(ConfigError, match="--measure-steps 0: measure at least 1"):
        make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for(None, None), measure_steps=0)


def test_plan_cli_prints_and_writes_json(tmp_path, tiny_model_dir, chat_file):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "data": {"path": str(chat_file), "max_length": 512}}))
    args = ["train.micro_batch_size=4", "train.max_steps=6", "checkpoint.every_steps=2"]
    # --measure is a flag: the config path after it stays the config (the step count is --measure-steps)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetrack",
            "plan",
            "--measure",
            str(config),
            *args,
            "--measure-steps",
            "2",
            "--gpu",
            "A10",
            "--device-memory",
            "1MB",
            "--price-per-hour",
            "2",
            "--json",
            str(tmp_path / "plan.json"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for part in (
        "data: 48 rows read, 48 to train on",
        "schedule: 6 optimizer steps",
        "3 checkpoints: every 2 steps (every_steps: steps 2, 4, 6)",
        "memory on A10 (cuda)",
        "predicted peak",
        "DOES NOT FIT",
        "activations with gradient checkpointing on ",
        "changes, best first",
        "time and cost (estimated from FLOPs)",
        "NOT used for A10",
        "at 2.00/h:",
        "assumptions:",
    ):
        assert part in out, part
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["memory"]["fits"] is False and saved["target"]["memory_bytes"] == 2**20 and saved["time"]["price_per_hour"] == 2
    assert saved["time"]["measured"]["steps"] == 2 and saved["time"]["from_measurement"] is False
    assert saved["memory"]["gradient_checkpointing"]["on"]["peak_bytes"] < saved["memory"]["gradient_checkpointing"]["off"]["peak_bytes"]


def test_plan_runs_trains_checks_that_need_no_weights(tmp_path, tiny_model_dir, chat_file, capsys, monkeypatch):
    """A missing model folder is the error train gives (not a tokenizer's); an output.dir that train would refuse here
    is a warning (the plan may be for another machine); flash-attn is the training machine's business."""
    from finetrack.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", f"model.name={tmp_path / 'nope'}", f"data.path={chat_file}"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "nope" in err and "Traceback" not in err and "tokenizer" not in err, err
    (tmp_path / "afile").write_text("x")
    args = [f"model.name={tiny_model_dir}", f"data.path={chat_file}", "data.max_length=256", "train.micro_batch_size=4"]
    assert main(["plan", *args, f"output.dir={tmp_path / 'afile'}", "model.attn_implementation=flash_attention_2"]) == 0
    err = capsys.readouterr().err
    assert "warning: output.dir=" in err and "is a file" in err and "error:" not in err, err
    # a warm start train would refuse now: a warning too (the run it names may be one still to train)
    assert main(["plan", *args, f"model.init_from={tmp_path / 'phase1'}:best"]) == 0
    err = capsys.readouterr().err
    assert f"warning: model.init_from={tmp_path / 'phase1'}:best: no such run directory" in err and "would refuse it now" in err, err


# ------------------------------------------------------------------------------------------ objectives
def test_flops_of_a_frozen_backbone_and_a_head():
    from finetrack.target import flops_per_hidden_read

    arch = Architecture.from_hf_config(TINY)
    linear = 2 * 36864
    # freeze_backbone: the forward only; with checkpointing the frozen base runs forward, recomputation and backward
    assert flops_per_micro_batch_tokens(arch, "lora", False, frozen=True) == (2 * linear, 2 * 300 * 64, 4 * 2 * 64)
    assert flops_per_micro_batch_tokens(arch, "full", True, frozen=True) == (2 * linear * 3, 2 * 300 * 64 * 3, 4 * 2 * 64 * 3)
    # the head: 2 x params forward, x 3 with its backward; the pooling product 2 x hidden per cell, twice with a gradient
    assert flops_per_hidden_read(arch, 65, True) == (6 * 65, 4 * 64) and flops_per_hidden_read(arch, 65, False) == (6 * 65, 2 * 64)


def test_regression_head_adds_exactly_its_parameters(tmp_path, tiny_model_dir, chat_file, regression_file):
    causal = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for("L4", None))
    head = ("objective.kind=regression", "objective.regression.head.hidden_sizes=[16]")
    reg = make_plan(tiny_cfg(tmp_path, tiny_model_dir, regression_file, *head), target_for("L4", None))
    size = 64 * 16 + 16 + 16 + 1  # Linear(64, 16) + Linear(16, 1)
    assert reg.objective["head_params"] == size
    assert reg.objective["trainable_params"] == causal.objective["trainable_params"] + size
    c, r = ({t["name"]: t["bytes"] for t in p.memory["terms"]} for p in (causal, reg))
    assert r["regression head"] == (size + 2) * 4 and r["gradients"] == c["gradients"] + size * 4
    assert r["optimizer state"] == c["optimizer state"] + 2 * size * 4
    # lm_weight 0: no logits at the answer tokens; their labels are counted (train logs them) but carry no loss
    assert reg.memory["largest_micro_batch"]["target_tokens"] == 0 and reg.time["target_tokens"] > 0
    assert reg.time["hidden_state_reads"] == 6 * 4  # one read per row, 6 steps of 4 rows
    assert reg.time["checkpoint_bytes"] - causal.time["checkpoint_bytes"] == (size + 2) * 4 + 2 * size * 4  # head.safetensors + its state


def test_freeze_backbone_changes_optimizer_state_and_flops(tmp_path, tiny_model_dir, regression_file):
    plans = [
        make_plan(
            tiny_cfg(tmp_path, tiny_model_dir, regression_file, "objective.kind=regression", f"objective.regression.freeze_backbone={f}"),
            target_for("L4", None),
        )
        for f in ("false", "true")
    ]
    trained, frozen = ({t["name"]: t["bytes"] for t in p.memory["terms"]} for p in plans)
    assert frozen["optimizer state"] == 2 * 65 * 4 < trained["optimizer state"] and frozen["gradients"] == 65 * 4
    assert "activations (frozen backbone: none kept)" in frozen and frozen["hidden states (output_hidden_states)"] > 0
    assert plans[1].objective["freeze_backbone"] and plans[1].objective["trainable_params"] == 65
    # LoRA's backward is 1x the forward: a forward-only backbone computes about half
    assert plans[1].time["train_flops"] == pytest.approx(plans[0].time["train_flops"] / 2, rel=0.05)
    assert any("freeze_backbone: only the head trains" in a for a in plans[1].assumptions)


@pytest.mark.parametrize("pack", [True, False])
def test_contrastive_workload_counts_every_sequence(tmp_path, tiny_model_dir, tiny_tokenizer, triplet_file, pack):
    """A triplet micro-batch is 3 x micro_batch_size sequences in one forward: plan's workload equals a causal run whose
    micro-batches hold the same anchors, positives and negatives, and the largest micro-batch is the one collate builds."""
    from finetrack.batches import attn_tokens_for, collate, micro_batches, step_rows
    from finetrack.config import Environment, resolve
    from finetrack.data import prepare
    from finetrack.plan import workload

    overrides = (f"data.pack={str(pack).lower()}", "data.shuffle=false", "train.max_steps=4")
    cfg, _ = resolve(
        tiny_cfg(tmp_path, tiny_model_dir, triplet_file, "objective.kind=contrastive", *overrides), Environment("cpu", False, 1, 32)
    )
    arch = Architecture.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    rows = prepare(cfg.data, tiny_tokenizer, cfg.train.seed, cfg.objective).train
    work = workload(rows, cfg, arch, 4, 1)
    # the same sequences as causal rows: each micro-batch of 4 triplets becomes 12 rows, laid out as collate does
    flat = [dataclasses.replace(e.sequences()[k], pair=None) for j in range(0, 16, 4) for k in range(3) for e in rows[j : j + 4]]
    causal_cfg = cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"kind": "causal_lm"})})
    causal_cfg = causal_cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 12})})
    same = workload(flat, causal_cfg, arch, 4, 1)
    for key in ("train_tokens", "computed_tokens", "target_tokens", "attention_cells", "num_reads", "read_cells"):
        assert getattr(work, key) == getattr(same, key), key
    assert work.largest == dataclasses.replace(same.largest, num_reads=work.largest.num_reads) and work.largest.num_reads == 12
    anchors = workload([dataclasses.replace(e, pair=None) for e in rows], causal_cfg.model_copy(update={"train": cfg.train}), arch, 4, 1)
    assert work.train_tokens > anchors.train_tokens and work.largest_sequences == 12
    if not pack:
        assert work.largest.num_rows == 3 * anchors.largest.num_rows == 12
    # the largest micro-batch as collate builds it
    biggest = max(
        (
            collate(mb, tiny_tokenizer.pad_token_id, pack, None, attn_tokens_for(64))
            for step in range(4)
            for mb in micro_batches(rows, step_rows(len(rows), 4, cfg.train.seed, step, False)[1], 4)
        ),
        key=lambda b: b.targets.numel(),
    )
    assert (work.largest.micro_batch_tokens, work.largest.num_rows, work.largest.num_reads) == (
        biggest.targets.numel(),
        biggest.targets.shape[0],
        biggest.pool.shape[0],
    )


def test_contrastive_plan_matches_what_train_does(tmp_path, tiny_model_dir, triplet_file):
    overrides = ("objective.kind=contrastive", "train.log_every_steps=1", "train.max_steps=4")
    plan = make_plan(tiny_cfg(tmp_path, tiny_model_dir, triplet_file, *overrides), target_for("L4", None))
    _, metrics = tiny_run(tmp_path, tiny_model_dir, triplet_file, *overrides)
    assert plan.time["train_tokens"] == metrics[-1]["tokens"]  # anchors, positives and negatives
    assert plan.time["target_tokens"] == sum(m["target_tokens"] for m in metrics)


@pytest.mark.parametrize("kind", ["regression", "contrastive"])
def test_plan_cli_for_an_objective(tmp_path, tiny_model_dir, regression_file, triplet_file, kind):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    config = tmp_path / "my.yaml"
    objective = {"kind": kind, kind: {"head": {"hidden_sizes": [8]}} if kind == "regression" else {"lambda_task": 0.5}}
    data = regression_file if kind == "regression" else triplet_file
    config.write_text(
        yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "data": {"path": str(data), "max_length": 512}, "objective": objective})
    )
    args = [sys.executable, "-m", "finetrack", "plan", str(config), "train.micro_batch_size=4", "--json", str(tmp_path / "plan.json")]
    r = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["objective"]["kind"] == kind and r.stdout.startswith(f"objective: {kind} (")
    names = {t["name"] for t in saved["memory"]["terms"]}
    assert {"hidden states (output_hidden_states)", "pooling matrices", "hidden-state reads"} <= names
    if kind == "regression":
        assert saved["objective"]["head_params"] == 64 * 8 + 8 + 8 + 1 and "regression head" in names
        assert "no next-token loss (lm_weight 0)" in r.stdout and "logits and loss" not in names
    else:
        assert saved["objective"]["sequences_per_row"] == 3 and "next-token loss x 0.5 on the anchors' answers" in r.stdout
        assert "sequences: anchors, positives, negatives)" in r.stdout and "logits and loss" in names
        assert any("triplets: a micro-batch of B rows runs 3B sequences" in a for a in saved["assumptions"])


@pytest.mark.parametrize("pool, max_length", [("mean", 45), ("last", 60)])
def test_capped_triplets_are_what_prepare_gives(tmp_path, tiny_model_dir, tiny_tokenizer, triplet_file, pool, max_length):
    """A shorter data.max_length (a change plan ranks) cuts every sequence of a triplet and drops the rows left without a
    read position, as the data stage does."""
    from finetrack.data import prepare
    from finetrack.plan import capped

    cfg = tiny_cfg(tmp_path, tiny_model_dir, triplet_file, "objective.kind=contrastive", f"objective.contrastive.pool={pool}")
    shorter = tiny_cfg(
        tmp_path,
        tiny_model_dir,
        triplet_file,
        "objective.kind=contrastive",
        f"objective.contrastive.pool={pool}",
        f"data.max_length={max_length}",
    )
    shape = lambda rows: [([len(s.input_ids) for s in e.sequences()], [s.pools for s in e.sequences()]) for e in rows]
    cut = capped(prepare(cfg.data, tiny_tokenizer, 0, cfg.objective).train, shorter)
    assert 0 < len(cut) and shape(cut) == shape(prepare(shorter.data, tiny_tokenizer, 0, shorter.objective).train)


# ------------------------------------------------------------------------------------------ mixtures
MIX_WEIGHTS = {"a": 1, "b": 2, "c": 1}  # of 4 rows per step: exactly 1, 2 and 1 rows of each source every step
MIX_ROWS = {"a": 12, "b": 10, "c": 20}


def mixture_config(tmp_path: Path, model_dir: Path, **data) -> dict:
    sources = []
    for name, weight in MIX_WEIGHTS.items():
        path = write_chat_jsonl(tmp_path / f"{name}.jsonl", chat_rows(MIX_ROWS[name], seed=len(sources)))
        sources.append({"name": name, "path": str(path), "weight": weight})
    return {
        "model": {"name": str(model_dir)},
        "data": {"sources": sources, "max_length": 512, **data},
        "train": {"micro_batch_size": 4, "max_steps": 9, "lr": 1e-2, "warmup_steps": 0, "log_every_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_plan_cli_of_a_mixture_shows_each_sources_share_over_the_run(tmp_path, tiny_model_dir):
    """9 steps of 4 rows: every step takes 1, 2, 1 rows of a, b, c (weights 1 : 2 : 1), so 9, 18, 9 over the run;
    b (10 rows) goes 1.8 times through its rows. Printed and in --json, beside the tokens the drawn rows hold."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump(mixture_config(tmp_path, tiny_model_dir)))
    args = [sys.executable, "-m", "finetrack", "plan", str(config), "--json", str(tmp_path / "plan.json")]
    r = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "plan.json").read_text())
    total = sum(MIX_WEIGHTS.values())
    assert saved["data"]["mixture"] == {
        "rows_per_step": 4,
        "total_steps": 9,
        "on_source_end": "repeat",
        "steps_before_repeat": None,
        "shortened": False,
    }
    sources = {s["name"]: s for s in saved["data"]["sources"]}
    assert list(sources) == list(MIX_WEIGHTS)
    lines = r.stdout.splitlines()
    header = next(
        i for i, x in enumerate(lines) if x.startswith("mixture of 3 sources (data.sources); over the planned 9 steps x 4 rows = 36 rows")
    )
    assert lines[header + 1].split() == [
        "source",
        "weight",
        "target",
        "share",
        "rows",
        "tokens",
        "rows",
        "drawn",
        "realized",
        "share",
        "epochs",
        "tokens",
        "drawn",
    ]
    for i, (name, weight) in enumerate(MIX_WEIGHTS.items()):
        s, drawn = sources[name], 9 * 4 * weight // total
        assert s["target_share"] == pytest.approx(weight / total) and s["rows_kept"] == MIX_ROWS[name]
        used = s["over_the_run"]
        assert (used["steps"], used["rows_drawn"], used["realized_share"]) == (9, drawn, pytest.approx(weight / total))
        assert used["epochs"] == pytest.approx(drawn / MIX_ROWS[name], abs=1e-4)
        assert lines[header + 2 + i].split() == [
            name,
            str(weight),
            f"{100 * weight / total:.2f}%",
            str(MIX_ROWS[name]),
            f"{s['tokens']:,}",
            str(drawn),
            f"{100 * weight / total:.2f}%",
            f"{drawn / MIX_ROWS[name]:.2f}",
            f"{used['tokens_drawn']:,}",
        ]
    # the drawn rows' tokens are what the plan's walk of the steps trains on (the mixture's order, not one source's)
    assert sum(s["over_the_run"]["tokens_drawn"] for s in sources.values()) == saved["time"]["train_tokens"]
    assert "data.on_source_end" not in r.stdout


def test_mixture_plan_with_on_source_end_stop_matches_what_train_does(tmp_path, tiny_model_dir):
    """data.on_source_end=stop: b (10 rows, 2 a step) would repeat at step 6, so the 9 planned steps become 5; train
    stops there too, takes the tokens the plan counts, and writes the same per-source figures."""
    from finetrack.train import run

    tree = mixture_config(tmp_path, tiny_model_dir, on_source_end="stop")
    plan = make_plan(Config.model_validate(tree), target_for("L4", None))
    assert plan.schedule["total_steps"] == 5 and plan.data["mixture"]["shortened"] is True
    assert plan.data["mixture"]["steps_before_repeat"] == 5
    assert [s["over_the_run"]["rows_drawn"] for s in plan.data["sources"]] == [5 * 4 * w // 4 for w in MIX_WEIGHTS.values()]
    assert "  data.on_source_end=stop shortened the run to 5 steps: step 6 would give a source's row a second time" in render(plan)

    result = run(Config.model_validate(tree))
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    assert metrics[-1]["step"] == 5 and plan.time["train_tokens"] == metrics[-1]["tokens"]
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["sources"] == plan.data["sources"]

    # a plan that does not fit ranks its changes over the mixture's steps too
    tight = make_plan(Config.model_validate(tree), target_for("L4", f"{plan.memory['peak_bytes'] - 1}B"))
    assert tight.memory["changes"] and all(c["peak_bytes"] < plan.memory["peak_bytes"] for c in tight.memory["changes"])


# ------------------------------------------------------------------------------------------ checkpoint.export
EXPORT_ENTRIES = ("merged", "onnx", "onnx:int8", "gguf", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m")


def test_export_sizes_by_format():
    """Each checkpoint.export entry's bytes, by hand for the tiny architecture: 2 layers of 36,864 linear weights, embeddings
    and an untied lm_head of 300 x 64, 5 norms of 64."""
    arch = Architecture.from_hf_config(TINY)
    n, linear, tokenizer_files = 2 * 36864 + 2 * 300 * 64 + 5 * 64, 2 * 36864 + 300 * 64, 1000
    assert arch.num_params == n
    assert {e: export_size(e, arch, 0, tokenizer_files)[0] for e in EXPORT_ENTRIES} == {
        "merged": 4 * n + tokenizer_files,  # float32
        "onnx": 4 * n + tokenizer_files,
        "onnx:int8": linear + 4 * (n - linear) + tokenizer_files,  # 1 B per linear-layer weight, 4 B per other parameter
        "gguf": 2 * n,  # f16, the default type
        "gguf:f16": 2 * n,
        "gguf:q8_0": round(n * 34 / 32),  # 32 int8 + one f16 scale per block of 32
        "gguf:q4_k_m": round(n * 4.84 / 8),  # llama.cpp's average bits per weight
    }
    # a regression head is exported beside the merged weights (float32, with the target mean and std)
    assert export_size("merged", arch, 521, tokenizer_files)[0] == 4 * n + 4 * (521 + 2) + tokenizer_files


def test_the_run_waits_for_the_exports_still_queued():
    """One checkpoint's exports at a time from when it is saved (checkpoints 10, 20, 30 of 30 steps at 100, 200, 300 s)."""
    assert wait_at_end([10, 20, 30], 30, 300.0, 50.0) == pytest.approx(50.0)  # they keep up: the last checkpoint's only
    # 150 s each: done at 250, 400, 550 s: the run waits 250 s after its last step
    assert wait_at_end([30, 10, 20], 30, 300.0, 150.0) == pytest.approx(250.0)


def test_plan_cli_costs_checkpoint_exports(tmp_path, tiny_model_dir, chat_file):
    """checkpoint.export [merged, gguf:q4_k_m] over 3 scheduled checkpoints, through `finetrack plan --json`: each entry's
    bytes from the model's parameter count (torch's), x 3 (retention never deletes exports); each export's time by its
    model (reads, writes, verification FLOPs); the run waits for the exports still queued at its end, in its time."""
    from transformers import AutoModelForCausalLM

    from finetrack.evaluate.cost import GENERATION_EFFICIENCY, MODEL_READ_BYTES_PER_S
    from finetrack.export.verify import MAX_NEW_TOKENS, probe_ids
    from finetrack.models import load_tokenizer
    from finetrack.plan import CHECKPOINT_WRITE_BYTES_PER_S

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    config = tmp_path / "export.yaml"
    tree = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(chat_file), "max_length": 512},
        "checkpoint": {"every_steps": 2, "export": ["merged", "gguf:q4_k_m"]},
    }
    config.write_text(yaml.safe_dump(tree))
    args = ["train.micro_batch_size=4", "train.max_steps=6", "--json", str(tmp_path / "plan.json")]
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "plan", str(config), *args], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "plan.json").read_text())
    x, t = saved["exports"], saved["time"]

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    tokenizer = load_tokenizer(load_config(config).model)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer_files = folder_bytes(tmp_path / "tokenizer")
    merged, q4 = x["entries"]
    assert (merged["entry"], merged["bytes"]) == ("merged", 4 * n + tokenizer_files)
    assert (q4["entry"], q4["bytes"]) == ("gguf:q4_k_m", round(n * 4.84 / 8))
    assert x["num_checkpoints"] == t["num_checkpoints"] == 3
    assert all(e["num_exports"] == 3 and e["total_bytes"] == 3 * e["bytes"] for e in (merged, q4))
    assert x["total_bytes"] == 3 * (merged["bytes"] + q4["bytes"])

    # time of one export: LoRA reads the trained model and the base again to merge, then loads the export back; writes
    # the merged folder (gguf: a scratch one, llama.cpp's f16 input, the file); verification: logits over every probe
    # position and greedy answers, by the trained model and by the export
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    probes = [len(ids) for ids in probe_ids(tokenizer)]  # no train.sample_prompts: the built-in prompts
    assert x["probe_tokens"] == probes
    per_token, per_logit = 2 * 2 * 36864, 2 * vocab * 64
    logits = 2 * sum((per_token + per_logit) * p for p in probes)
    greedy = 2 * sum(per_token * (p + MAX_NEW_TOKENS) + per_logit * MAX_NEW_TOKENS for p in probes)
    rate = x["cpu_flops_per_s"]
    assert t["flops_per_s"] == rate  # a plan for this CPU: its rate
    for e, read, written in ((merged, 3 * 4 * n, merged["bytes"]), (q4, 2 * 4 * n + q4["bytes"], 4 * n + 2 * n + q4["bytes"])):
        assert (e["read_bytes"], e["written_bytes"]) == (read, written)
        assert (e["verify_logits_flops"], e["verify_greedy_flops"]) == pytest.approx((logits, greedy))
        work = (
            read / MODEL_READ_BYTES_PER_S + written / CHECKPOINT_WRITE_BYTES_PER_S + logits / rate + greedy / (GENERATION_EFFICIENCY * rate)
        )
        assert e["seconds"] == pytest.approx(EXPORT_STARTUP_S + EXPORT_WORK_FACTOR * work)

    # the run waits for the exports still queued after its last step (checkpoints 2, 4, 6 of 6 steps), counted in its time
    run_s = t["train_s"] + t["eval_loss_s"] + t["checkpoint_s"] + t["validation_s"]
    per_checkpoint = merged["seconds"] + q4["seconds"]
    assert x["seconds_per_checkpoint"] == pytest.approx(per_checkpoint)
    done = 0.0
    for step in (2, 4, 6):
        done = max(done, run_s * step / 6) + per_checkpoint
    assert x["wait_s"] == t["export_wait_s"] == pytest.approx(done - run_s) and x["wait_s"] >= per_checkpoint
    assert t["total_s"] == pytest.approx(run_s + x["wait_s"])

    out = r.stdout
    for part in (
        "checkpoint.export: 3 checkpoint(s) x 2 export(s), all kept (retention deletes checkpoints, not exports)",
        "+ waiting for the last exports ",
        "gguf:q4_k_m",
        "conversion (not counted)",
        "estimate for the CPU: exports run in the background beside training",
    ):
        assert part in out, part
    assumptions = " ".join(saved["assumptions"])
    assert "32 int8 + one f16 scale per block of 32" in assumptions and "llama.cpp's published ~4.84 bits per weight" in assumptions
    # without checkpoint.export: nothing to cost, nothing waited for
    plain = make_plan(tiny_cfg(tmp_path, tiny_model_dir, chat_file), target_for(None, None))
    assert plain.exports == {} and plain.time["export_wait_s"] == 0 and "checkpoint.export" not in render(plain)


def test_plan_refuses_lora_layers_the_model_does_not_have(tmp_path, tiny_model_dir, chat_file):
    """As train does once the model is built (PEFT's own error blamed the module names), before any time is spent."""
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={chat_file}", "model.lora.layers_to_transform=[0, 99]"])
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[0, 99\]: .* has \d+ decoder layers \(indices 0\.\.\d+\)"):
        make_plan(cfg, target_for("H100", None))
