"""model.init_from (a warm start): a new run at step 0 from a checkpoint's weights, with a fresh optimizer and schedule;
its first loss is the source checkpoint's loss on the same batch; the source is recorded; mistakes are one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import read_jsonl, tiny_run

from finetrack import batches, data, models, objectives, rundir
from finetrack.cli import main
from finetrack.config import Environment, load_config, resolve_model
from finetrack.heads import attach

HELD_OUT = ("data.eval_split=0.25",)


def _source_loss_on_first_batch(cfg_overrides: list[str], folder) -> float:
    """The loss of the checkpoint `folder` on step 1's rows of a run configured by `cfg_overrides`, computed here from
    finetrack's parts (the data order, the batch builder, the objective), not by training."""
    cfg, _ = resolve_model(load_config(None, cfg_overrides), Environment("cpu", False, 1, 0))
    tokenizer = models.load_tokenizer(cfg.model)
    prepared = data.prepare(cfg.data, tokenizer, cfg.train.seed, cfg.objective)
    device = torch.device("cpu")
    model = attach(models.build_model(cfg.model, device), cfg.objective, [], cfg.train.seed)
    models.load_weights(model, folder)
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    _, step_rows = batches.step_rows(len(prepared.train), rows_per_step, cfg.train.seed, 0, cfg.data.shuffle)
    make_batch = batches.batch_builder(tokenizer.pad_token_id, False, None, model)
    batch = make_batch([prepared.train[i] for i in step_rows])
    model.train()
    with torch.no_grad():
        terms = objectives.build(cfg.objective)(model, batch)
    return float(objectives.weighted_loss(terms, batch.units))


def test_a_lora_warm_start_begins_where_the_source_ended(tmp_path, tiny_model_dir, chat_file):
    """The new run's first loss is the source checkpoint's loss on that batch; its step 0 held-out loss is the
    source's last; step, optimizer and schedule are the new run's; the source is in config.resolved.yaml and every
    checkpoint's meta.json."""
    source, source_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *HELD_OUT, name="source")
    spec = f"{source.run_dir}:latest"
    suites = "eval.suites=[{name: held, kind: loss, micro_batch_size: 4}]"
    warm, metrics = tiny_run(
        tmp_path, tiny_model_dir, chat_file, *HELD_OUT, f"model.init_from={spec}", suites, "eval.every_steps=2", name="warm"
    )
    assert warm.total_steps == 4 and warm.resumed_from_step == 0  # a new run: its own 4 steps, not a continuation
    assert metrics[0]["step"] == 0 and metrics[0]["val/held.loss"] == pytest.approx(source_metrics[-1]["eval_loss"], rel=1e-6)
    overrides = [f"model.name={tiny_model_dir}", f"data.path={chat_file}", "data.max_length=512", "train.micro_batch_size=4", *HELD_OUT]
    expected = _source_loss_on_first_batch(overrides, source.final_checkpoint)
    assert warm.first_loss == pytest.approx(expected, rel=1e-5)
    assert warm.first_loss < source_metrics[0]["loss"] - 0.1  # not the base model's first loss
    manifest_sha = __import__("hashlib").sha256((source.final_checkpoint / rundir.MANIFEST).read_bytes()).hexdigest()
    record = {"from": spec, "folder": str(source.final_checkpoint.resolve()), "step": 4, "manifest_sha256": manifest_sha}
    assert yaml.safe_load((warm.run_dir / "config.resolved.yaml").read_text())["resolved"]["init_from"]["value"] == record
    assert json.loads((warm.final_checkpoint / "meta.json").read_text())["init_from"] == record
    state = json.loads((warm.final_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["first_loss"] == pytest.approx(warm.first_loss)
    # eval/'s step 0 is the base model (what `finetrack eval` computes there), not the warm start: not written by training
    assert not rundir.eval_path(warm.run_dir, 0).exists() and rundir.eval_path(warm.run_dir, 4).exists()
    from finetrack.report import write_report

    page = write_report([warm.run_dir]).read_text()
    assert "warm start" in page and f"from {spec} (step 4 · " in page and manifest_sha[:12] in page
    # resuming the warm-started run keeps its record; another source on resume is a changed run, refused
    again, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        *HELD_OUT,
        f"model.init_from={spec}",
        suites,
        "eval.every_steps=2",
        "train.max_steps=6",
        name="warm",
    )
    assert again.resumed_from_step == 4
    assert json.loads((again.final_checkpoint / "meta.json").read_text())["init_from"] == record


def test_a_regression_head_and_full_weights_come_from_the_best_checkpoint(tmp_path, tiny_model_dir, regression_file):
    """A full fine-tune with a head, warm-started from the source's best checkpoint: at a learning rate too small to
    move anything, the new run's held-out loss is the source's at its best step (the head and all weights loaded)."""
    common = ("model.method=full", "objective.kind=regression", "objective.regression.head.hidden_sizes=[8]", *HELD_OUT)
    source, source_metrics = tiny_run(
        tmp_path, tiny_model_dir, regression_file, *common, "eval.loss_every_steps=1", "checkpoint.best={}", name="source"
    )
    best = rundir.read_best(source.run_dir)
    best_loss = next(m["eval_loss"] for m in source_metrics if m["step"] == best["step"])
    warm, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        regression_file,
        *common,
        f"model.init_from={source.run_dir}:best",
        "train.lr=1e-12",
        "train.max_steps=1",
        name="warm",
    )
    assert metrics[-1]["eval_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert json.loads((warm.final_checkpoint / "meta.json").read_text())["init_from"]["step"] == best["step"]


def test_a_remote_checkpoint_is_a_source(tmp_path, tiny_model_dir, chat_file, s3):
    """URL/checkpoints/step-N: downloaded and verified into RUN_DIR/init_from/, never into the new run's checkpoints/."""
    source, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, f"checkpoint.remote={s3}", name="source")
    warm, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, f"model.init_from={s3}/checkpoints/step-000004", name="warm")
    assert (warm.run_dir / "init_from/checkpoints/step-000004/MANIFEST.json").is_file()
    assert [p.name for p in (warm.run_dir / "checkpoints").glob("step-*")] == ["step-000004"]  # its own final one only
    local, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, f"model.init_from={source.final_checkpoint}", name="local")
    assert warm.first_loss == local.first_loss  # the same weights, whether fetched or local


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model.init_from={run}:7"], ["model.init_from", "no checkpoint of step 7", "[4]"]),
        (["model.init_from={run}:best"], ["model.init_from", "best.json", "checkpoint.best"]),
        (["model.init_from={tmp}/nowhere"], ["model.init_from", "no such run directory"]),
        (["model.init_from={run}", "model.method=full"], ["model.init_from", "no full model", "model.method=lora"]),
        (["model.init_from={run}", "model.lora.r=4"], ["model.init_from", "do not fit this model", "LoRA shape"]),
        (["model.init_from=s3://bucket/run"], ["model.init_from", "/checkpoints/step-NNNNNN"]),
    ],
    ids=["missing_step", "no_best", "no_path", "adapter_for_full", "other_rank", "remote_not_a_checkpoint"],
)
def test_bad_warm_start_is_one_error_line(extra, expected, tmp_path, tiny_model_dir, chat_file, capsys):
    source, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, name="source")
    capsys.readouterr()
    argv = ["train", f"model.name={tiny_model_dir}", f"data.path={chat_file}", f"output.dir={tmp_path / 'new'}", "train.max_steps=2"]
    argv += [e.format(run=source.run_dir, tmp=tmp_path) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not list((tmp_path / "new").glob("checkpoints/step-*"))


def test_warm_start_reads_the_source_and_resume_refuses_another(tmp_path, tiny_model_dir, chat_file, capsys):
    """A resumed warm-started run must name the same source: another one is a changed run (refused, naming the key)."""
    source, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, name="source")
    other, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "train.seed=7", name="other")
    tiny_run(tmp_path, tiny_model_dir, chat_file, f"model.init_from={source.run_dir}", "train.max_steps=2", name="warm")
    capsys.readouterr()
    argv = ["train", f"model.name={tiny_model_dir}", f"data.path={chat_file}", f"output.dir={tmp_path / 'warm'}", "data.max_length=512"]
    argv += ["train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0", "train.max_steps=4", f"model.init_from={other.run_dir}"]
    assert main(argv) == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("error:"))
    assert "model.init_from" in line
    assert read_jsonl(tmp_path / "warm/metrics.jsonl")[-1]["step"] == 2  # nothing trained by the refused command
