"""Checkpoint schedule arithmetic: rules -> explicit steps (shared by train and plan)."""

from __future__ import annotations

import math
import re

import pytest

from finetrack.config import ConfigError, Environment, load_config, resolve
from finetrack.schedule import checkpoint_steps, describe, evenly_spaced, log_spaced


def test_issue_example_first_epoch_and_per_epoch():
    # 2000 rows, micro batch 8, accumulation 2 -> 125 steps per epoch; 3 epochs
    cfg = load_config(
        None,
        [
            "train.micro_batch_size=8",
            "train.grad_accum_steps=2",
            "train.num_epochs=3",
            "checkpoint.num_first_epoch=4",
            "checkpoint.num_per_epoch=1",
        ],
    )
    _, res = resolve(cfg, Environment("cpu", False, 1, 2000))
    assert res["steps_per_epoch"] == 125 and res["total_steps"] == 375
    assert list(res["checkpoint_steps"]) == [31, 63, 94, 125, 250, 375]
    assert res["checkpoint_steps"][125] == "first_epoch+per_epoch" and res["checkpoint_steps"][375] == "per_epoch+last"
    assert res.reasons["checkpoint_steps"].startswith("6 checkpoints: 4 evenly spaced in epoch 1 (num_first_epoch: steps 31, 63, 94, 125)")
    # the typed run shape carries the same facts, the rules as tuples (config.resolved.yaml keeps "rule+rule")
    shape = res.shape
    assert (shape.steps_per_epoch, shape.total_steps, shape.warmup_steps, shape.global_batch_size) == (125, 375, round(0.03 * 375), 16)
    assert list(shape.checkpoint_steps) == [31, 63, 94, 125, 250, 375]
    assert shape.rules_at(125) == ["first_epoch", "per_epoch"] and shape.rules_at(375) == ["per_epoch", "last"] and shape.rules_at(7) == []
    assert {s: "+".join(r) for s, r in shape.checkpoint_steps.items()} == res["checkpoint_steps"]


def test_evenly_spaced_rounds_half_up():
    assert evenly_spaced(125, 4) == [31, 63, 94, 125]  # 31.25, 62.5, 93.75, 125
    assert evenly_spaced(10, 4) == [3, 5, 8, 10]  # 2.5 -> 3, 7.5 -> 8
    assert evenly_spaced(7, 7) == list(range(1, 8))
    for s in range(1, 60):
        for n in range(1, s + 1):
            got = evenly_spaced(s, n)
            assert got == [math.floor(k * s / n + 0.5) for k in range(1, n + 1)] and got[-1] == s and len(set(got)) == n


def test_log_spaced_is_distinct_dense_early_and_ends_at_last_step():
    assert log_spaced(1000, 4) == [1, 10, 100, 1000]
    for total in (5, 17, 100, 9999):
        for n in range(1, min(total, 30) + 1):
            got = log_spaced(total, n)
            assert len(got) == n and got == sorted(set(got)) and got[-1] == total and got[0] >= 1
    gaps = [b - a for a, b in zip(log_spaced(1000, 8), log_spaced(1000, 8)[1:])]
    assert gaps == sorted(gaps)  # spacing grows


def test_union_of_rules_remembers_which_rule_asked():
    plan = checkpoint_steps(
        steps_per_epoch=10, total_steps=25, every_steps=10, num_per_epoch=2, num_first_epoch=5, steps=[7, 20], num_log_spaced=3
    )
    assert plan == {
        1: ["log_spaced"],
        2: ["first_epoch"],
        4: ["first_epoch"],
        5: ["per_epoch", "log_spaced"],
        6: ["first_epoch"],
        7: ["steps"],
        8: ["first_epoch"],
        10: ["every_steps", "first_epoch", "per_epoch"],
        15: ["per_epoch"],
        20: ["every_steps", "per_epoch", "steps"],
        25: ["per_epoch", "log_spaced", "last"],
    }
    assert describe(plan, steps_per_epoch=10) == (
        "11 checkpoints: every 10 steps (every_steps: steps 10, 20); 5 evenly spaced in epoch 1 (num_first_epoch: steps 2, 4, 6, 8, 10); "
        "2 evenly spaced in every epoch (num_per_epoch: steps 5, 10, 15, 20, 25); the listed steps (steps: 7, 20); "
        "3 spaced evenly in log(step) (num_log_spaced: steps 1, 5, 25); and the last step, 25"
    )
    # no rule at all: only the last step
    assert checkpoint_steps(steps_per_epoch=10, total_steps=3) == {3: ["last"]}
    assert describe({3: ["last"]}) == "1 checkpoint: the last step, 3"


def test_describe_reads_as_rules_and_elides_long_lists():
    """The reason line of `resolved checkpoint_steps`: what each rule asked for, in words, not a count per rule."""
    plan = checkpoint_steps(steps_per_epoch=125, total_steps=375, num_first_epoch=4, num_per_epoch=1)
    assert describe(plan, 125) == (
        "6 checkpoints: 4 evenly spaced in epoch 1 (num_first_epoch: steps 31, 63, 94, 125); "
        "1 at the end of every epoch (num_per_epoch: steps 125, 250, 375); and the last step, 375"
    )
    long = describe(checkpoint_steps(steps_per_epoch=1000, total_steps=1000, every_steps=10), max_listed=6)
    assert long == "100 checkpoints: every 10 steps (every_steps: steps 10, 20, 30, ..., 980, 990, 1000); and the last step, 1000"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.num_first_epoch=11"], "checkpoint.num_first_epoch=11 but an epoch has only 10 optimizer steps"),
        (["checkpoint.steps=[5, 99]"], "checkpoint.steps [99] lie after the last step (20)"),
        (["checkpoint.num_log_spaced=21"], "checkpoint.num_log_spaced=21 but the run has only 20 steps"),
    ],
)
def test_impossible_rules_are_config_errors(overrides, message):
    cfg = load_config(None, ["train.micro_batch_size=4", "train.num_epochs=2", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(cfg, Environment("cpu", False, 1, 40))


def test_retention_settings_without_effect_are_errors():
    with pytest.raises(ConfigError, match="keep_schedule has no effect without checkpoint.num_keep_last"):
        load_config(None, ["checkpoint.keep_schedule=false"])
    with pytest.raises(ConfigError, match="steps are counted from 1"):
        load_config(None, ["checkpoint.steps=[0, 4]"])
