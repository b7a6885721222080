"""Resume rules on the tiny model, in-process: same command continues, --fresh, --resume-from, config checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import chat_rows, tiny_run, write_chat_jsonl
from safetensors.torch import load_file

from finetrack import checkpoint
from finetrack.config import ConfigError
from finetrack.resume import Request

COMMON = ("checkpoint.every_steps=3", "model.lora.dropout=0.1", "train.max_steps=16")  # 12 steps per epoch


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    result, _ = tiny_run(tmp_path_factory.mktemp("ref"), tiny_model_dir, chat_file, *COMMON)
    return result.run_dir


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cut_after(src: Path, dst: Path, step: int) -> Path:
    """A copy of a finished run as a crash after `step` would have left it (later checkpoints never written)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step-*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    return dst


def test_mid_epoch_resume_continues_the_same_data_order_and_is_bit_exact(tmp_path, tiny_model_dir, chat_file, full_run):
    cut_after(full_run, tmp_path / "run", 9)  # step 9 of 12 in epoch 1: resume crosses the epoch boundary
    state = json.loads((tmp_path / "run/checkpoints/step-000009/trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (0, 9)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="run")
    assert result.resumed_from_step == 9
    ref = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 17))  # lines after step 9 were replaced, not duplicated
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref] and metrics[-1]["tokens"] == ref[-1]["tokens"]
    assert same_weights(full_run / "checkpoints/step-000016", result.final_checkpoint)


def test_a_checkpoint_kept_from_schema_1_code_resumes_bit_exact(tmp_path, tiny_model_dir, chat_file, caplog):
    """tests/data/checkpoint_v1: step 9 of this run written by the code before TrainState (trainer state schema /1), and
    the metrics.jsonl of that run uninterrupted. Logging every 4 steps, step 12's line averages steps 9-12: the window
    restored from the old file counts too."""
    v1 = Path(__file__).parent / "data/checkpoint_v1"
    shutil.copytree(v1 / "step-000009", tmp_path / "run/checkpoints/step-000009")
    with caplog.at_level("INFO", logger="finetrack"):
        # the run that wrote it lived in other temporary folders: its paths differ, nothing else
        result, metrics = tiny_run(
            tmp_path, tiny_model_dir, chat_file, *COMMON, "train.log_every_steps=4", request=Request(allow_config_change=True)
        )
    accepted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config change accepted on resume")]
    assert accepted and all(line.split(": ")[1] in ("model.name", "data.path", "output.dir") for line in accepted), accepted
    assert result.resumed_from_step == 9
    ref = [json.loads(x) for x in (v1 / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["tokens"]) for m in metrics] == [(m["step"], m["loss"], m["tokens"]) for m in ref if m["step"] > 9]


def test_harmless_changes_are_listed_others_refused(tmp_path, tiny_model_dir, chat_file, full_run, caplog):
    cut_after(full_run, tmp_path / "run", 12)
    with caplog.at_level("INFO", logger="finetrack"):
        result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON[:2], "train.max_steps=14", "train.log_every_steps=2", name="run")
    assert result.resumed_from_step == 12
    assert "config change accepted on resume: train.log_every_steps: 1 -> 2" in caplog.text
    assert "config change accepted on resume: train.max_steps: 16 -> 14" in caplog.text

    cut_after(full_run, tmp_path / "run2", 12)
    with pytest.raises(ConfigError) as e:
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, "train.lr=0.005", "model.lora.r=8", name="run2")
    msg = str(e.value)
    assert (
        "cannot resume from" in msg
        and "train.lr: 0.01 -> 0.005" in msg
        and "model.lora.r: 16 -> 8" in msg
        and "--allow-config-change" in msg
    )
    result, _ = tiny_run(
        tmp_path, tiny_model_dir, chat_file, *COMMON, "train.lr=0.005", name="run2", request=Request(allow_config_change=True)
    )
    assert result.resumed_from_step == 12

    other = write_chat_jsonl(tmp_path / "other.jsonl", chat_rows(48, seed=1))
    cut_after(full_run, tmp_path / "run3", 12)
    with pytest.raises(ConfigError, match="training data \\(tokenized rows\\) fingerprint"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, f"data.path={other}", name="run3")


def test_fresh_moves_the_old_run_aside(tmp_path, tiny_model_dir, chat_file, full_run, monkeypatch):
    cut_after(full_run, tmp_path / "run", 6)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, "train.max_steps=3", name="run", request=Request(fresh=True))
    assert result.resumed_from_step == 0 and [m["step"] for m in metrics] == [1, 2, 3]
    (aside,) = (tmp_path / "run/superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert (aside / "metrics.jsonl").is_file()
    # the same through the environment, for job systems where only env vars change
    monkeypatch.setenv("FINETRACK_FRESH", "1")
    request = Request.from_env()
    assert request.fresh
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, "train.max_steps=3", name="run", request=request)
    assert result.resumed_from_step == 0 and len(list((tmp_path / "run/superseded").iterdir())) == 2


def test_resume_from_another_runs_checkpoint_and_bad_paths(tmp_path, tiny_model_dir, chat_file, full_run):
    result, metrics = tiny_run(
        tmp_path, tiny_model_dir, chat_file, *COMMON, name="branch", request=Request(resume_from=str(full_run / "checkpoints/step-000012"))
    )
    assert result.resumed_from_step == 12 and [m["step"] for m in metrics] == [13, 14, 15, 16]
    assert same_weights(full_run / "checkpoints/step-000016", result.final_checkpoint)
    # a run directory means its newest resumable checkpoint
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="branch2", request=Request(resume_from=str(full_run)))
    assert result.resumed_from_step == 16

    with pytest.raises(ConfigError, match="no such checkpoint folder or run directory"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="bad", request=Request(resume_from=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    shutil.copytree(full_run / "checkpoints/step-000003", broken)
    (broken / "trainer_state.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="trainer_state.safetensors: 0 bytes"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="bad", request=Request(resume_from=str(broken)))
    assert not (tmp_path / "bad/checkpoints").exists()  # never a silent restart
    with pytest.raises(ConfigError, match="--fresh and --resume-from"):
        Request(fresh=True, resume_from="x")
    with pytest.raises(ConfigError, match="--delete-remote only goes with --fresh"):
        Request(delete_remote=True)


def test_no_usable_checkpoint_is_an_error_not_a_restart(tmp_path, tiny_model_dir, chat_file, full_run):
    cut_after(full_run, tmp_path / "run", 6)
    for d in (tmp_path / "run/checkpoints").iterdir():
        (d / "MANIFEST.json").unlink()
    with pytest.raises(ConfigError, match="holds 2 checkpoint\\(s\\) but none can be resumed.*--fresh"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="run")
    # only a crash before the first checkpoint finished (a temp folder): start again from step 0
    shutil.rmtree(tmp_path / "run/checkpoints")
    (tmp_path / "run/checkpoints/.tmp-step-000003-99").mkdir(parents=True)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, "train.max_steps=3", name="run")
    assert result.resumed_from_step == 0 and [m["step"] for m in metrics] == [1, 2, 3]
    assert not (tmp_path / "run/checkpoints/.tmp-step-000003-99").exists()  # its disk was freed


def test_already_finished_run_does_nothing(tmp_path, tiny_model_dir, chat_file, full_run):
    shutil.copytree(full_run, tmp_path / "run")
    before = (tmp_path / "run/metrics.jsonl").read_text()
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="run")
    assert result.resumed_from_step == 16 and result.final_checkpoint == tmp_path / "run/checkpoints/step-000016"
    assert (tmp_path / "run/metrics.jsonl").read_text() == before
    assert checkpoint.newest_resumable(tmp_path / "run").step == 16


@pytest.mark.parametrize(
    "method, extra", [("full", ("train.optimizer=adamw_8bit", "train.grad_accum_steps=2", "train.micro_batch_size=2")), ("qlora", ())]
)
def test_every_method_resumes_bit_exactly(tmp_path, tiny_model_dir, chat_file, method, extra):
    """N steps == N/2 + resume + N/2 for a full fine-tune (8-bit optimizer, accumulation) and QLoRA (4-bit base rebuilt)."""
    common = (f"model.method={method}", "checkpoint.every_steps=3", "train.max_steps=6", *extra)
    ref, ref_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="ref")
    cut_after(ref.run_dir, tmp_path / "cut", 3)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="cut")
    assert result.resumed_from_step == 3 and [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    a, b = load_file(ref.final_checkpoint / weights), load_file(result.final_checkpoint / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unusable_newer_checkpoints_are_moved_aside_and_retention_keeps_the_new_line(tmp_path, tiny_model_dir, chat_file, full_run, caplog):
    """A corrupt newest checkpoint is skipped on resume and moved to superseded/: it must not count as 'newest'
    for retention (which would then delete every checkpoint the resumed run writes)."""
    shutil.copytree(full_run, tmp_path / "run")
    for step in (12, 15, 16):
        data = bytearray((tmp_path / f"run/checkpoints/step-{step:06d}/adapter_model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / f"run/checkpoints/step-{step:06d}/adapter_model.safetensors").write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="finetrack"):
        result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, "checkpoint.num_keep_last=1", name="run")
    assert result.resumed_from_step == 9 and "moved 3 checkpoint(s) after step 9 that cannot be resumed" in caplog.text
    assert [p.name for p in sorted((tmp_path / "run/checkpoints").iterdir())] == ["step-000016"]
    assert same_weights(full_run / "checkpoints/step-000016", result.final_checkpoint)
    (aside,) = (tmp_path / "run/superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000012", "step-000015", "step-000016"]


def test_rerunning_a_resume_from_command_continues_its_own_checkpoints(tmp_path, tiny_model_dir, chat_file, full_run, caplog):
    request = Request(resume_from=str(full_run / "checkpoints/step-000006"))
    first, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON[:2], "train.max_steps=12", name="branch", request=request)
    assert first.resumed_from_step == 6
    with caplog.at_level("INFO", logger="finetrack"):
        again, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON, name="branch", request=request)
    assert again.resumed_from_step == 12 and "--resume-from ignored" in caplog.text


def test_logging_window_survives_resume(tmp_path, tiny_model_dir, chat_file):
    common = ("checkpoint.every_steps=3", "train.max_steps=8", "train.log_every_steps=4")
    ref, ref_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="ref")
    cut_after(ref.run_dir, tmp_path / "cut", 6)  # mid-window: steps 5-6 logged together with 7-8
    _, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="cut")
    assert [(m["step"], m["loss"], m["target_tokens"]) for m in metrics] == [
        (m["step"], m["loss"], m["target_tokens"]) for m in ref_metrics
    ]


def test_checkpoint_after_the_configured_end_is_an_error(tmp_path, tiny_model_dir, chat_file, full_run):
    shutil.copytree(full_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="is at step 16, after the last step of this config \\(10\\)"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *COMMON[:2], "train.max_steps=10", name="run")


def test_a_different_global_batch_is_refused():
    """A resume on another number of processes changes rows per step (and the data order position)."""
    from finetrack.resume import check_config

    with pytest.raises(ConfigError, match="resolved.global_batch_size: 8 -> 16"):
        check_config({"resolved": {"global_batch_size": 8}}, {"resolved": {"global_batch_size": 16}}, "a", "a", False, Path("ck"))
    assert check_config({"resolved": {"global_batch_size": 8}}, {"resolved": {"global_batch_size": 16}}, "a", "a", True, Path("ck")) == [
        "resolved.global_batch_size: 8 -> 16 (allowed by --allow-config-change)"
    ]


BASE = ("data.eval_split=0.1", "checkpoint.num_keep_last=2", "train.max_steps=10", "train.lr=0.0001")


@pytest.mark.parametrize(
    "key, value, harmless",
    [
        ("train.num_epochs", "3", True),
        ("train.max_steps", "20", True),
        ("eval.loss_every_steps", "5", True),
        ("checkpoint.num_keep_last", "4", True),
        ("train.log_every_steps", "5", True),
        ("model.name", "someone/another-model", False),
        ("model.method", "full", False),
        ("train.micro_batch_size", "2", False),
        ("train.lr", "0.0002", False),
        ("data.path", "other.jsonl", False),
    ],
)
def test_check_config_accepts_harmless_changes_and_refuses_the_others(key, value, harmless):
    """The rule by itself, on real config dumps: each change alone, listed as `key: old -> new`."""
    from finetrack.config import effective_dump, load_config
    from finetrack.resume import check_config
    from finetrack.schema import flatten

    saved = effective_dump(load_config(None, list(BASE)))
    current = effective_dump(load_config(None, [*BASE, f"{key}={value}"]))
    line = f"{key}: {flatten(saved).get(key, '(unset)')} -> {flatten(current)[key]}"
    assert flatten(saved).get(key) != flatten(current)[key]
    if harmless:
        assert check_config(saved, current, "fp", "fp", False, Path("ck")) == [line]
        return
    with pytest.raises(ConfigError, match="cannot resume from ck") as e:
        check_config(saved, current, "fp", "fp", False, Path("ck"))
    assert line in str(e.value) and "--allow-config-change" in str(e.value)
    assert f"{line} (allowed by --allow-config-change)" in check_config(saved, current, "fp", "fp", True, Path("ck"))


def test_fresh_through_the_command_line_and_the_environment(tmp_path, tiny_model_dir, chat_file):
    """`--fresh`, and FINETRACK_FRESH=1 for job systems where only env vars change: each run starts over at step 0
    (not "already complete") and moves the previous run's files to superseded/."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "finetrack",
        "train",
        f"model.name={tiny_model_dir}",
        f"data.path={chat_file}",
        f"output.dir={out}",
        "data.max_length=512",
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "checkpoint.every_steps=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "FINETRACK_FRESH"}
    for extra, fresh_env, moved in (([], None, 0), (["--fresh"], None, 1), ([], "1", 2)):
        r = subprocess.run(
            [*cmd, *extra], capture_output=True, text=True, timeout=600, env={**env, "FINETRACK_FRESH": fresh_env} if fresh_env else env
        )
        assert r.returncode == 0 and "\ndone: 2 steps" in r.stdout, r.stderr[-3000:]  # not "already complete"
        assert ("--fresh: moved the previous run's" in r.stderr) == bool(moved)
        asides = sorted((out / "superseded").iterdir()) if moved else []
        assert len(asides) == moved
        for aside in asides:
            assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
            assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_key_written_on_one_side_only_at_its_default_is_no_change(tmp_path):
    """A checkpoint written by a version whose dump kept data.split (no effect on files) resumes without
    --allow-config-change; a real difference on one side only still blocks."""
    from finetrack.config import Config, effective_dump
    from finetrack.resume import check_config

    current = effective_dump(Config())
    assert "split" not in current["data"]  # files: no effect, not written
    saved = {**current, "data": {**current["data"], "split": "train"}}
    assert check_config(saved, current, None, "x", allow_change=False, source=tmp_path) == []
    saved["data"]["split"] = "validation"
    with pytest.raises(ConfigError, match="data.split: validation -> \\(unset\\)"):
        check_config(saved, current, None, "x", allow_change=False, source=tmp_path)


def test_a_checkpoint_from_before_mixed_precision_existed_resumes_under_none():
    """model.mixed_precision came later: a checkpoint without it ran with no autocast, so `none` is no change; bf16 is."""
    from finetrack.resume import check_config

    saved = {"model": {"name": "m", "dtype": "float32"}}
    assert check_config(saved, {"model": {"name": "m", "dtype": "float32", "mixed_precision": "none"}}, None, "d", False, Path("c")) == []
    with pytest.raises(ConfigError, match=r"model.mixed_precision: \(unset\) -> bf16"):
        check_config(saved, {"model": {"name": "m", "dtype": "float32", "mixed_precision": "bf16"}}, None, "d", False, Path("c"))
