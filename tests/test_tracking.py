"""Trackers (train.report_to) for real on the tiny model: TensorBoard event files, W&B offline run files and an
MLflow file store are read back and compared with metrics.jsonl / samples.jsonl, across a resume too."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_run

from finetrack.config import ConfigError, Resolved, load_config
from finetrack.tracking import check_installed, config_params, markdown_table

SAMPLING = ("train.sample_every_steps=2", "train.sample_prompts=[say hello, name a colour]", "train.sample_generation.max_new_tokens=12")
RESUMABLE = ("train.max_steps=4", "checkpoint.every_steps=2", *SAMPLING)


def by_step(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["step"], []).append(r)
    return out


def cut_and_rerun(tmp_path: Path, tiny_model_dir: Path, chat_file: Path, *overrides: str):
    """Run 4 steps (checkpoints 2 and 4), then remove checkpoint 4 as a crash after step 3 would have left the run
    directory (its trackers already hold steps 3-4), and run the same command again. Returns (ref, resumed) results."""
    ref, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *RESUMABLE, *overrides, name="run")
    shutil.copytree(ref.run_dir, tmp_path / "ref")
    shutil.rmtree(ref.run_dir / "checkpoints/step-000004")
    again, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *RESUMABLE, *overrides, name="run")
    assert again.resumed_from_step == 2
    return tmp_path / "ref", again.run_dir


# ------------------------------------------------------------------------------------------ TensorBoard
def tensorboard_values(run_dir: Path, tag: str) -> list[tuple[int, object]]:
    """(step, value) of one tag as TensorBoard shows it: its plugin event accumulator (the legacy EventAccumulator
    does not apply purges to text) reads every event file of the folder and applies the purges they ask for."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir / "tensorboard/finetrack"))
    events.Reload()
    return [(e.step, make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]


def float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()  # TensorBoard stores scalars as float32


def assert_tensorboard_matches(run_dir: Path) -> None:
    """Every metrics.jsonl number once per step (as float32), every step's samples once as a markdown table."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert tensorboard_values(run_dir, key) == [(m["step"], float32(m[key])) for m in metrics], key
    texts = [(step, text.decode()) for step, text in tensorboard_values(run_dir, "samples/text_summary")]
    assert texts == [(step, markdown_table(rows)) for step, rows in by_step(read_jsonl(run_dir / "samples.jsonl")).items()]


def test_tensorboard_gets_metrics_samples_and_config(tmp_path, tiny_model_dir, chat_file):
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "train.report_to=[tensorboard]", *SAMPLING)
    assert_tensorboard_matches(result.run_dir)
    assert [step for step, _ in tensorboard_values(result.run_dir, "samples/text_summary")] == [0, 2, 4]
    assert json.loads((result.run_dir / "trackers.json").read_text()) == {
        "tensorboard": {"project": "finetrack", "logdir": "tensorboard/finetrack"}
    }
    # accelerate writes the config as hparams (a YAML copy beside it); config.resolved.yaml stays the record
    (hparams,) = (result.run_dir / "tensorboard/finetrack").glob("*/hparams.yml")
    assert "train.lr: 0.01" in hparams.read_text() and "resolved.total_steps: 4" in hparams.read_text()


def test_tensorboard_resume_logs_each_step_once(tmp_path, tiny_model_dir, chat_file):
    """The rerun opens TensorBoard with purge_step=3: what the first attempt logged for steps 3-4 is discarded
    and logged again, so each step's loss and samples appear once (and equal the uninterrupted run's)."""
    ref, run_dir = cut_and_rerun(tmp_path, tiny_model_dir, chat_file, "train.report_to=[tensorboard]")
    assert len(list((run_dir / "tensorboard/finetrack").glob("events.out.tfevents.*"))) == 2  # one per attempt
    assert_tensorboard_matches(run_dir)
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["loss"] == read_jsonl(ref / "metrics.jsonl")[-1]["loss"]
    # no checkpoint left (a crash before the first one): the fresh start discards everything, step 0 included
    shutil.rmtree(run_dir / "checkpoints")
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *RESUMABLE, "train.report_to=[tensorboard]", name="run")
    assert result.resumed_from_step == 0
    assert_tensorboard_matches(run_dir)


# -------------------------------------------------------------------------------------------------- W&B
def wandb_records(path: Path):
    """The protobuf records of a W&B offline run file (`run-<id>.wandb`): a 7-byte header, then a LevelDB-style log
    of 32 KiB blocks, each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> tuple[str, str, list[dict]]:
    """(run id, project, history rows) of one offline run file."""
    run_id = project = ""
    rows = []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, project = record.run.run_id, record.run.project
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return run_id, project, rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_CONSOLE": "off",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
    }.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_wandb_offline_resume_continues_the_same_run(tmp_path, tiny_model_dir, chat_file, wandb_offline):
    ref, run_dir = cut_and_rerun(tmp_path, tiny_model_dir, chat_file, "train.report_to=[wandb]")
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids == json.loads((ref / "trackers.json").read_text())  # the rerun reused the id chosen by the first attempt
    run_id = ids["wandb"]["id"]
    attempts = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(attempts) == 2  # `wandb sync RUN_DIR/wandb/offline-run-*` uploads both into run `run_id`
    first, second = (wandb_history(p) for p in attempts)
    assert first[:2] == second[:2] == (run_id, "finetrack")
    metrics = {m["step"]: m for m in read_jsonl(run_dir / "metrics.jsonl")}
    logged = [row for _, _, rows in (first, second) for row in rows]
    for row in logged:
        if "loss" in row:
            assert row["loss"] == metrics[row["_step"]]["loss"] and row["lr"] == metrics[row["_step"]]["lr"]
    assert sorted(row["_step"] for row in first[2] if "loss" in row) == [1, 2, 3, 4]
    assert sorted(row["_step"] for row in second[2] if "loss" in row) == [3, 4]  # the steps after the resumed checkpoint
    tables = [(row["_step"], row["samples/_type"]) for row in logged if "samples/_type" in row]
    assert tables == [(0, "table-file"), (2, "table-file"), (4, "table-file"), (4, "table-file")]
    samples = by_step(read_jsonl(run_dir / "samples.jsonl"))
    table = json.loads(next((attempts[1].parent / "files/media/table").glob("samples_4_*.table.json")).read_text())
    assert table["columns"] == ["step", "prompt", "answer"] and table["data"] == [[4, r["prompt"], r["answer"]] for r in samples[4]]


# ----------------------------------------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no SQL store; a file store is enough here
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    return uri


def test_mlflow_resume_continues_the_same_run(tmp_path, tiny_model_dir, chat_file, mlflow_store, monkeypatch):
    import mlflow

    ref, run_dir = cut_and_rerun(tmp_path, tiny_model_dir, chat_file, "train.report_to=[mlflow]")
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids == json.loads((ref / "trackers.json").read_text()) and ids["mlflow"]["tracking_uri"] == mlflow_store
    client = mlflow.MlflowClient()
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.run_name == "run" and run.data.params["train.lr"] == "0.01" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "finetrack"
    metrics = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    history = client.get_metric_history(run.info.run_id, "loss")
    # MLflow keeps every value it was sent: steps 3-4 twice (equal: the resume is bit-exact), none missing
    assert sorted(h.step for h in history) == [1, 2, 3, 3, 4, 4] and all(h.value == metrics[h.step] for h in history)
    samples = by_step(read_jsonl(run_dir / "samples.jsonl"))
    for step, rows in samples.items():
        artifact = Path(client.download_artifacts(run.info.run_id, f"samples/step-{step:06d}.jsonl", str(tmp_path / "dl")))
        assert read_jsonl(artifact) == rows

    if importlib.util.find_spec("sqlalchemy") is None:  # mlflow-skinny: MLflow's default local database is out of reach
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
        with pytest.raises(ConfigError, match="a database that mlflow-skinny cannot write .* set MLFLOW_TRACKING_URI"):
            tiny_run(tmp_path, tiny_model_dir, chat_file, *RESUMABLE, "train.report_to=[mlflow]", name="run")

    # MLflow pointed elsewhere: continuing would silently start a second run; say how to reach the first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
    with pytest.raises(ConfigError, match=f"points at .*elsewhere: set MLFLOW_TRACKING_URI={mlflow_store}"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *RESUMABLE, "train.report_to=[mlflow]", "train.max_steps=6", name="run")


# ------------------------------------------------------------------------------------------------ units
def test_config_params_are_flat_scalars_without_secrets():
    cfg = load_config(None, ["checkpoint.remote=s3://user:hunter2@bucket/run", "train.report_to=[tensorboard]"])
    res = Resolved()
    res.set("total_steps", 7, "why")
    res.set("checkpoint_steps", {7: "last"}, "why")
    params = config_params(cfg, res)
    assert all(isinstance(v, (bool, int, float, str)) for v in params.values())
    assert params["checkpoint.remote"] == "s3://bucket/run" and "hunter2" not in json.dumps(params)
    assert params["train.report_to"] == '["tensorboard"]' and params["train.max_steps"] == "null"
    assert params["resolved.total_steps"] == 7 and "resolved.checkpoint_steps" not in params


def test_a_missing_tracker_package_names_the_install_command(monkeypatch):
    check_installed(["tensorboard"])  # a test dependency
    # as on a machine without it: not importable from any path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError, match=r"train.report_to: tensorboard not installed: pip install 'finetrack\[tensorboard\]'"):
        check_installed(["tensorboard"])


def test_report_settings_are_validated():
    for overrides, message in [
        (["train.report_project=mine"], "train.report_project has no effect without train.report_to"),
        (["train.report_to=[wandb, wandb]"], "a tracker is listed twice"),
        (["train.report_to=[comet]"], "Input should be 'tensorboard', 'wandb' or 'mlflow'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
