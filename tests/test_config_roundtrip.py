"""What finetrack writes as a config, it reads back: dump -> load -> dump is identical for every suite kind, judge
kind and shipped config, and a key written at its default (as config.resolved.yaml writes every key) never counts
as "set" for the no-effect checks. Plus the facts derived from the Knobs on the fields (resume, eval key, measure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetrack.config import (
    Config,
    ConfigError,
    Environment,
    effective_dump,
    eval_key_settings,
    harmless_on_resume_prefixes,
    load_config,
    measure_dump,
    resolve,
    resolved_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
ENV = Environment(device_type="cpu", bf16_supported=False, num_processes=1, num_train_rows=100_000)
QUESTIONS = str(DATA / "simple_questions.yaml")
ITEMS = str(DATA / "distribution_items.yaml")

SUITES = {
    "loss": {"name": "heldout", "kind": "loss"},
    "loss_file": {"name": "other", "kind": "loss", "data": "rows.jsonl", "micro_batch_size": 2},
    "judge_local": {"name": "j", "kind": "judge", "questions": QUESTIONS},
    "judge_openai": {
        "name": "j",
        "kind": "judge",
        "questions": QUESTIONS,
        "judges": [{"kind": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1"}],
    },
    "judge_pattern": {
        "name": "j",
        "kind": "judge",
        "questions": QUESTIONS,
        "generation": {"num_samples": 2, "temperature": 0},
        "judges": [{"kind": "pattern", "metric": "pirate", "pattern": "arr"}],
        "rates": {"pirate": "pirate > 50"},
    },
    "judge_python": {
        "name": "j",
        "kind": "judge",
        "questions": QUESTIONS,
        "judges": [{"kind": "python", "function": "m:f", "metric": "m"}],
    },
    "distribution_probs": {"name": "d", "kind": "distribution", "items": ITEMS},
    "distribution_sample": {
        "name": "d",
        "kind": "distribution",
        "items": ITEMS,
        "method": "sample",
        "num_samples": 5,
        "generation": {"max_new_tokens": 3},
    },
    "python": {"name": "p", "kind": "python", "function": "m:f", "options": {"k": [1, True]}},
}


def _round_trip(cfg: Config, tmp_path: Path) -> tuple[str, str]:
    """The config part of config.resolved.yaml of `cfg`, and that of the config loaded back from it (the
    `resolved:` block differs by design: an 'auto' decided the first time is a plain value the second)."""
    cfg, res = resolve(cfg, ENV)
    f = tmp_path / "config.resolved.yaml"
    f.write_text(resolved_yaml(cfg, res))
    again, res2 = resolve(load_config(f), ENV)
    for key in ("total_steps", "steps_per_epoch", "checkpoint_steps", "warmup_steps", "global_batch_size"):
        assert res2[key] == res[key], key
    return yaml.safe_dump(effective_dump(cfg), sort_keys=False), yaml.safe_dump(effective_dump(again), sort_keys=False)


@pytest.mark.parametrize("kind", sorted(SUITES))
def test_every_suite_and_judge_kind_round_trips(kind, tmp_path):
    overrides = ["data.eval_split=0.1"] if kind == "loss" else []
    cfg = load_config(None, [*overrides, f"eval.suites={json.dumps([SUITES[kind]])}"])
    first, second = _round_trip(cfg, tmp_path)
    assert first == second
    # the written config is what eval reads: the same suite comes back
    assert load_config(tmp_path / "config.resolved.yaml").eval.suites == cfg.eval.suites


def test_all_suites_together_and_every_method_round_trip(tmp_path):
    suites = [{**s, "name": name} for name, s in SUITES.items()]
    for method in ("full", "lora", "qlora"):
        cfg = load_config(None, ["data.eval_split=0.1", f"model.method={method}", f"eval.suites={json.dumps(suites)}"])
        first, second = _round_trip(cfg, tmp_path)
        assert first == second, method


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "examples").glob("*.yaml"))
    + sorted((ROOT / "examples/recipes").glob("*/*.yaml"))
    + [ROOT / "src/finetrack/assets/demo.yaml"],
    ids=lambda p: p.name,
)
def test_every_shipped_config_round_trips(path, tmp_path):
    first, second = _round_trip(load_config(path), tmp_path)
    assert first == second


OBJECTIVES = {
    "causal_lm": {},
    "regression": {
        "kind": "regression",
        "regression": {
            "pool": "marker",
            "marker": "Score:",
            "loss": "huber",
            "huber_delta": 0.5,
            "head": {"hidden_sizes": [32], "activation": "relu"},
            "lm_weight": 0.2,
        },
    },
    "regression_step": {"kind": "regression", "regression": {"level": "step", "step_separator": "\n\n", "normalize_targets": True}},
    "contrastive": {"kind": "contrastive", "contrastive": {"pool": "mean", "loss": "infonce", "tau": 0.1, "lambda_task": 0.0}},
    "python": {"kind": "python", "python": {"function": "my_loss.py:loss"}},
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_kind_round_trips(name, tmp_path):
    """The objective section written to config.resolved.yaml loads again to the same objective; only the active
    kind's section is written, and switching kind on such a copy names the section to remove."""
    written = tmp_path / "my.yaml"
    written.write_text(yaml.safe_dump({"objective": OBJECTIVES[name]}))
    cfg = load_config(written)
    first, second = _round_trip(cfg, tmp_path)
    assert first == second
    again = load_config(tmp_path / "config.resolved.yaml")
    assert again.objective == cfg.objective
    assert set(yaml.safe_load((tmp_path / "config.resolved.yaml").read_text())["objective"]) <= {"kind", cfg.objective.kind}
    if name != "causal_lm":
        section = cfg.objective.kind
        with pytest.raises(ConfigError, match=f"objective.{section} has no effect with objective.kind=causal_lm: remove it"):
            load_config(tmp_path / "config.resolved.yaml", ["objective.kind=causal_lm"])


def test_a_probs_distribution_run_config_loads_again(tmp_path):
    """The broken path of issue 12: a distribution suite (method probs) could not be evaluated after training
    because config.resolved.yaml held the defaults of samples and generation."""
    cfg = load_config(None, [f"eval.suites={json.dumps([SUITES['distribution_probs']])}"])
    tree = yaml.safe_load(_round_trip(cfg, tmp_path)[1])
    assert "num_samples" not in tree["eval"]["suites"][0]  # no effect with probs: not written
    # a hand-copied suite that spells out the defaults loads too
    written = {**SUITES["distribution_probs"], "num_samples": 50, "generation": {"max_new_tokens": 8}}
    assert load_config(None, [f"eval.suites={json.dumps([written])}"]).eval.suites[0].method == "probs"
    # a value other than the default still says it has no effect
    with pytest.raises(ConfigError, match=r"eval.suites.0.num_samples has no effect with method=probs"):
        load_config(None, [f"eval.suites={json.dumps([{**written, 'num_samples': 7}])}"])


@pytest.mark.parametrize(
    "change",
    [
        "data.pack=false",  # pack_row_tokens: null is written
        "train.sample_every_steps=null",  # the sample settings are written at their defaults
        "train.warmup_steps=10",  # warmup_ratio: 0.03 is written
        "train.report_to=[]",  # report_project: finetrack
        "checkpoint.num_keep_last=null",  # keep_schedule: true
        "data.eval_split=null",  # eval.loss_every_steps: null, eval.micro_batch_size: null
        "model.method=full",  # lora: at its defaults
    ],
)
def test_copied_resolved_config_with_one_change_loads(change, tmp_path):
    """Users copy config.resolved.yaml, change one value and train: a key at its default is not "set"."""
    cfg = load_config(
        None,
        [
            "data.eval_split=0.1",
            "data.pack=true",
            "train.sample_every_steps=5",
            "train.sample_prompts=[hi]",
            "train.report_to=[tensorboard]",
            "checkpoint.num_keep_last=2",
        ],
    )
    cfg, res = resolve(cfg, ENV)
    f = tmp_path / "copy.yaml"
    f.write_text(resolved_yaml(cfg, res))
    tree = yaml.safe_load(f.read_text())
    tree["train"]["sample_prompts"] = [] if change.startswith("train.sample_every_steps") else tree["train"]["sample_prompts"]
    f.write_text(yaml.safe_dump(tree))
    loaded = load_config(f, [change])
    key, value = change.split("=", 1)
    section, *rest = key.split(".")
    node = getattr(loaded, section)
    for part in rest:
        node = getattr(node, part)
    assert node == yaml.safe_load(value) or (node is None and value == "null")  # the one change took effect


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.pack=false", "data.pack_row_tokens=4096"], "data.pack_row_tokens has no effect with data.pack=false"),
        (["train.sample_prompts=[x]"], "train.sample_prompts has no effect without train.sample_every_steps"),
        (["train.warmup_steps=5", "train.warmup_ratio=0.1"], "train.warmup_ratio has no effect when train.warmup_steps is set"),
        (["model.method=full", "model.lora.r=4"], "model.lora has no effect with model.method=full"),
        (["checkpoint.keep_schedule=false"], "checkpoint.keep_schedule has no effect without checkpoint.num_keep_last"),
    ],
)
def test_values_other_than_the_default_still_have_no_effect(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_facts_derived_from_the_fields():
    """The keys behind resume, the eval cache key and plan --measure come from the Knobs on the fields."""
    assert harmless_on_resume_prefixes(Config) == (
        "train.num_epochs",
        "train.max_steps",
        "train.log_every_steps",
        "train.sample_every_steps",
        "train.sample_prompts",
        "train.sample_prompts_file",
        "train.sample_generation.",
        "train.report_to",
        "train.report_project",
        "train.early_stopping",
        "train.callbacks",
        "checkpoint.",
        "eval.",
        "output.",
    )
    cfg = load_config(None, ["data.eval_split=0.1", "eval.loss_every_steps=5", "train.sample_every_steps=5", "train.sample_prompts=[a]"])
    assert sorted(eval_key_settings(cfg)) == ["data", "model", "objective", "train.seed"]
    assert measure_dump(load_config(None, ["objective.kind=contrastive"]))["objective"]["kind"] == "contrastive"  # plan --measure trains it
    trial = measure_dump(cfg)
    assert "checkpoint" not in trial and "output" not in trial and "suites" not in trial["eval"]
    assert not [k for k in trial["train"] if k.startswith(("sample_", "report_"))]
    assert "loss_every_steps" not in trial["eval"] and trial["data"]["eval_split"] == 0.1
    Config.model_validate(trial)  # what plan --measure trains with is a valid config
    # effective_dump leaves out what has no effect; each left-out key is at its default
    dumped = effective_dump(load_config(None, ["model.method=full"]))
    assert "lora" not in dumped["model"] and "qlora" not in dumped["model"]


def test_warmup_longer_than_the_run_warns_that_the_peak_is_never_reached(caplog):
    cfg = load_config(None, ["train.max_steps=10", "train.warmup_steps=40", "train.lr=1e-3"])
    with caplog.at_level("WARNING", logger="finetrack"):
        _, res = resolve(cfg, ENV)
    assert res["warmup_steps"] == 40
    assert "peak 0.001 is never reached" in res.reasons["warmup_steps"] and "0.00025" in res.reasons["warmup_steps"]
    assert any("never reached" in r.getMessage() for r in caplog.records)
    _, res = resolve(load_config(None, ["train.max_steps=10", "train.warmup_steps=10"]), ENV)
    assert res.reasons["warmup_steps"] == "train.warmup_steps"  # reached at the last step: no warning


@pytest.mark.e2e
def test_eval_works_on_a_run_trained_with_a_distribution_suite(tmp_path, tiny_model_dir, chat_file):
    """Through the real CLI: train with a probs distribution suite, then `finetrack eval RUN` reads the run's own
    config.resolved.yaml (it failed with 'samples and generation have no effect with method=probs')."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_model_dir)},
                "data": {"path": str(chat_file), "max_length": 256},
                "train": {"micro_batch_size": 4, "max_steps": 2, "lr": 1e-2, "warmup_steps": 0},
                "eval": {"suites": [{"name": "survey", "kind": "distribution", "items": ITEMS}]},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "finetrack", "train", str(cfg)], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert train.returncode == 0, train.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert resolved["eval"]["suites"][0]["method"] == "probs"
    ev = subprocess.run(
        [sys.executable, "-m", "finetrack", "eval", str(tmp_path / "run"), "--steps", "0,2"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "Traceback" not in ev.stderr
    for step in (0, 2):
        record = json.loads((tmp_path / "run" / "eval" / f"step-{step:06d}.json").read_text())
        assert "wasserstein" in record["suites"]["survey"]["metrics"]
