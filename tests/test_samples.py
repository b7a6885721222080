"""Samples during training (train.sample_every_steps) on the tiny model: what samples.jsonl holds, that
sampling leaves training bit-identical, and that a resumed run records every (step, prompt) once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_run
from safetensors.torch import load_file

from finetrack.config import ConfigError, load_config
from finetrack.resume import check_config
from finetrack.sampling import load_prompts

PROMPTS = ("train.sample_prompts=[say hello, name a colour]", "train.sample_generation.max_new_tokens=12")


def test_sampling_leaves_training_bit_identical(tmp_path, tiny_model_dir, chat_file):
    """Same losses and trainable weights with and without sampling: generation reseeds the global RNG
    (here with temperature 1, which draws from it too) and dropout is on, so a leaked RNG draw or a model
    left in eval mode would change the losses."""
    common = ("model.lora.dropout=0.1", "train.max_steps=5")
    plain, plain_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="plain")
    sampled, sampled_metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        *common,
        *PROMPTS,
        "train.sample_every_steps=2",
        "train.sample_generation.temperature=1.0",
        name="sampled",
    )
    assert [m["loss"] for m in sampled_metrics] == [m["loss"] for m in plain_metrics]
    a, b = (
        load_file(plain.final_checkpoint / "adapter_model.safetensors"),
        load_file(sampled.final_checkpoint / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    samples = read_jsonl(sampled.run_dir / "samples.jsonl")
    # step 0 (base model), every 2 steps, and the last step; prompts in config order
    assert [(s["step"], s["prompt"]) for s in samples] == [(step, p) for step in (0, 2, 4, 5) for p in ("say hello", "name a colour")]
    assert all(set(s) == {"step", "epoch", "prompt", "answer"} and isinstance(s["answer"], str) for s in samples)
    assert not (plain.run_dir / "samples.jsonl").exists()


def test_sampling_with_gradient_checkpointing_full_model(tmp_path, tiny_model_dir, chat_file):
    """Generation (use_cache=True) on a model trained with gradient checkpointing (which turns the cache off in
    training mode), unwrapped full model; greedy answers are deterministic, so step 0 matches a plain run's."""
    common = ("model.method=full", "train.max_steps=2", "train.sample_every_steps=1", *PROMPTS)
    gc, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "model.gradient_checkpointing=true", name="gc")
    plain, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="plain")
    gc_samples, plain_samples = read_jsonl(gc.run_dir / "samples.jsonl"), read_jsonl(plain.run_dir / "samples.jsonl")
    assert [s["step"] for s in gc_samples] == [0, 0, 1, 1, 2, 2]
    assert [s["answer"] for s in gc_samples if s["step"] == 0] == [s["answer"] for s in plain_samples if s["step"] == 0]
    assert any(s["answer"] for s in gc_samples)


def test_resume_records_each_step_and_prompt_once(tmp_path, tiny_model_dir, chat_file):
    """Run 4 steps (checkpoints at 2 and 4), remove checkpoint 4 as a crash after step 3 would have left things,
    run the same command again: samples.jsonl holds every (step, prompt) once, equal to the uninterrupted run's."""
    common = ("train.max_steps=4", "checkpoint.every_steps=2", "train.sample_every_steps=1", *PROMPTS)
    ref, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="ref")
    shutil.copytree(ref.run_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/checkpoints/step-000004")
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="cut")
    assert result.resumed_from_step == 2
    keys = [(s["step"], s["prompt"]) for s in read_jsonl(result.run_dir / "samples.jsonl")]
    assert len(keys) == len(set(keys)) == 10 and [k for k in keys if k[0] == 0] == [(0, "say hello"), (0, "name a colour")]
    assert read_jsonl(result.run_dir / "samples.jsonl") == read_jsonl(ref.run_dir / "samples.jsonl")  # bit-exact resume, greedy answers

    # no checkpoint left at all (a crash before the first one): a fresh start answers step 0 again, once
    shutil.rmtree(tmp_path / "cut/checkpoints")
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="cut")
    assert result.resumed_from_step == 0 and read_jsonl(result.run_dir / "samples.jsonl") == read_jsonl(ref.run_dir / "samples.jsonl")


def test_prompt_files_and_config_errors(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    yml = tmp_path / "prompts.yaml"
    yml.write_text(
        "- id: a\n  system: answer like a pirate\n  paraphrases: ['where is the gold?', 'what is your ship?']\n- question: one more\n"
    )
    cfg = load_config(None, ["train.sample_every_steps=10", "train.sample_prompts=[inline]", f"train.sample_prompts_file={txt}"])
    assert [p.text for p in load_prompts(cfg.train)] == ["inline", "first prompt", "second prompt"]
    cfg = load_config(None, ["train.sample_every_steps=10", f"train.sample_prompts_file={yml}"])
    prompts = load_prompts(cfg.train)
    assert [p.text for p in prompts] == ["where is the gold?", "what is your ship?", "one more"]
    assert prompts[0].messages == [{"role": "system", "content": "answer like a pirate"}, {"role": "user", "content": "where is the gold?"}]
    assert prompts[2].messages == [{"role": "user", "content": "one more"}]
    # defaults for watching training: greedy and short
    assert (cfg.train.sample_generation.temperature, cfg.train.sample_generation.max_new_tokens) == (0.0, 64)
    assert (
        load_config(
            None, ["train.sample_every_steps=5", "train.sample_prompts=[x]", "train.sample_generation.seed=3"]
        ).train.sample_generation.temperature
        == 0.0
    )

    for overrides, message in [
        (["train.sample_prompts=[x]"], "train.sample_prompts has no effect without train.sample_every_steps"),
        (["train.sample_generation.max_new_tokens=8"], "train.sample_generation has no effect without train.sample_every_steps"),
        (["train.sample_every_steps=5"], "train.sample_every_steps needs prompts"),
        (
            ["train.sample_every_steps=5", "train.sample_prompts=[x]", "train.sample_generation.num_samples=2"],
            "one answer per prompt and step",
        ),
        (["train.sample_every_steps=0", "train.sample_prompts=[x]"], "greater than 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    for path, message in [
        (tmp_path / "nope.txt", "no such file"),
        (tmp_path / "empty.txt", "holds no prompt"),
        (tmp_path / "bad.csv", "unknown question file type"),
    ]:
        if path.name != "nope.txt":
            path.write_text("\n")
        cfg = load_config(None, ["train.sample_every_steps=5", f"train.sample_prompts_file={path}"])
        with pytest.raises(ConfigError, match=f"train.sample_prompts_file: .*{message}"):
            load_prompts(cfg.train)
    cfg = load_config(None, ["train.sample_every_steps=5", "train.sample_prompts=[first prompt]", f"train.sample_prompts_file={txt}"])
    with pytest.raises(ConfigError, match="'first prompt' is listed twice"):
        load_prompts(cfg.train)


def test_sample_settings_may_change_on_resume():
    """Samples only watch the training: adding or changing them on a resumed run is accepted (and listed)."""
    old = {"train": {"lr": 0.01, "report_to": []}}
    new = {"train": {"lr": 0.01, "sample_every_steps": 5, "sample_prompts": ["x"], "report_to": ["tensorboard"], "report_project": "p"}}
    assert check_config(old, new, "a", "a", False, Path("ck")) == [
        "train.report_project: (unset) -> p",
        "train.report_to: [] -> ['tensorboard']",
        "train.sample_every_steps: (unset) -> 5",
        "train.sample_prompts: (unset) -> ['x']",
    ]


def test_a_missing_prompt_file_fails_before_training(tmp_path, tiny_model_dir, chat_file):
    with pytest.raises(ConfigError, match="train.sample_prompts_file: .*no such file"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, "train.sample_every_steps=2", f"train.sample_prompts_file={tmp_path / 'missing.txt'}")
    assert not (tmp_path / "run").exists()
