"""Experiment trackers (`train.report_to`: TensorBoard, W&B, MLflow) through accelerate's own integrations.

metrics.jsonl stays the record of a run; the trackers receive a copy of every metrics record (numbers
only), the samples as a table, and the effective config as flat scalars (URLs redacted).

One tracker run per run directory: RUN_DIR/trackers.json keeps the W&B run id (chosen up front) and the
MLflow run id (read back after it starts), so the same command on the same directory continues the same
tracker runs. TensorBoard writes RUN_DIR/tensorboard/<train.report_project>/ and is opened with
`purge_step`, so what an interrupted attempt logged after its last checkpoint is discarded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from pathlib import Path

from .config import Config, ConfigError, Resolved, effective_dump
from .schema import flatten

log = logging.getLogger("finetrack")

IDS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_KEY = "samples"  # the tracker key (TensorBoard tag, W&B table, MLflow artifact folder) of the samples


def check_installed(report_to: list[str]) -> None:
    """Fail before any work when a tracker's package is missing (accelerate would silently skip it)."""
    missing = [name for name in report_to if importlib.util.find_spec(name) is None]  # each tracker imports the module of its name
    if missing:
        extras = ",".join(missing)
        raise ConfigError(
            f"train.report_to: {', '.join(missing)} not installed: pip install 'finetrack[{extras}]' (or remove it from train.report_to)"
        )


def accelerator_kwargs(report_to: list[str], run_dir: Path) -> dict:
    """`Accelerator(**...)` arguments for the configured trackers ({} for none)."""
    check_installed(report_to)
    if not report_to:
        return {}
    if "mlflow" in report_to:
        _check_mlflow_store()
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": list(report_to),
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR)),
    }


class Trackers:
    """The started trackers of a run. Every method does nothing without train.report_to and off the main process."""

    def __init__(self, accelerator, names: list[str]) -> None:
        self.accelerator = accelerator
        self.names = names if accelerator.is_main_process else []

    def log_metrics(self, record: dict) -> None:
        """One metrics.jsonl record at its step (its numbers; not the step itself)."""
        if self.names:
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(values, step=record["step"])

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """One step's answers as a table: TensorBoard text (markdown), a W&B table, an MLflow JSONL artifact."""
        if "tensorboard" in self.names:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_text(SAMPLES_KEY, markdown_table(rows), global_step=step)
            writer.flush()
        if "wandb" in self.names:
            data = [[r["step"], r["prompt"], r["answer"]] for r in rows]
            self.accelerator.get_tracker("wandb").log_table(SAMPLES_KEY, columns=["step", "prompt", "answer"], data=data, step=step)
        if "mlflow" in self.names:
            import mlflow

            # one file per step: a resumed step overwrites its file instead of adding rows twice
            mlflow.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), f"{SAMPLES_KEY}/step-{step:06d}.jsonl")


def start(accelerator, cfg: Config, res: Resolved, run_dir: Path, kept_through_step: int) -> Trackers:
    """Start the configured trackers, or continue the tracker runs RUN_DIR/trackers.json names.

    kept_through_step: the last step whose logs this attempt keeps (the resumed step, or -1 on a fresh
    start); TensorBoard discards what it holds after it.
    """
    names = list(cfg.train.report_to)
    if not names:
        return Trackers(accelerator, [])
    project, main = cfg.train.report_project, accelerator.is_main_process
    ids = _read_ids(run_dir, project, names) if main else {}
    init_kwargs: dict[str, dict] = {}
    if "tensorboard" in names:
        init_kwargs["tensorboard"] = {"purge_step": kept_through_step + 1}
        ids["tensorboard"] = {"project": project, "logdir": f"{TENSORBOARD_DIR}/{project}"}
    if "wandb" in names:
        # chosen here, not by W&B: a resumed run must name it before W&B knows anything
        wandb_id = ids.get("wandb", {}).get("id") or uuid.uuid4().hex[:16]
        ids["wandb"] = {"project": project, "id": wandb_id}
        init_kwargs["wandb"] = {"id": wandb_id, "resume": "allow", "name": run_dir.name, "dir": str(run_dir)}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_id": _mlflow_run_to_continue(ids.get("mlflow")), "run_name": run_dir.name}
    if main:
        _write_ids(run_dir, ids)  # before starting: a crash inside W&B's start still leaves its id behind
    accelerator.init_trackers(project, init_kwargs=init_kwargs)
    if main:
        if "mlflow" in names:
            import mlflow

            run_id = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            ids["mlflow"] = {"project": project, "run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}
            _write_ids(run_dir, ids)
        _store_config(accelerator, config_params(cfg, res))
        log.info("trackers: %s", ", ".join(f"{k} {json.dumps(ids[k])}" for k in names))
    return Trackers(accelerator, names)


def config_params(cfg: Config, res: Resolved) -> dict[str, bool | int | float | str]:
    """The effective config and the resolved scalars, flattened to `section.key` -> a plain scalar (lists and
    None as JSON text, as TensorBoard's hparams and MLflow's params take no others), URLs without credentials."""
    from .storage import redact

    flat = flatten(effective_dump(cfg))
    flat.update({f"resolved.{k}": v for k, v in res.values.items() if not isinstance(v, (dict, list))})
    out: dict[str, bool | int | float | str] = {}
    for k, v in flat.items():
        if not isinstance(v, (bool, int, float, str)):
            v = json.dumps(v)
        out[k] = redact(v) if isinstance(v, str) else v
    return out


def markdown_table(rows: list[dict]) -> str:
    """Prompt | answer rows as a markdown table (TensorBoard renders its text plugin's markdown)."""

    def cell(text: str) -> str:
        return " ".join(text.replace("|", "\\|").split()) or " "

    return "| prompt | answer |\n|---|---|\n" + "".join(f"| {cell(r['prompt'])} | {cell(r['answer'])} |\n" for r in rows)


def _store_config(accelerator, params: dict) -> None:
    """The config as each tracker's hyperparameters. MLflow params cannot change once logged: a continued MLflow
    run gets only the keys it lacks (a harmless change accepted on resume keeps its first value there)."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            logged = mlflow.get_run(tracker.tracker.info.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
            if changed:
                log.info(
                    "MLflow keeps the first values of params %s (they cannot change; config.resolved.yaml has this attempt's)", changed
                )
            tracker.store_init_configuration({k: v for k, v in params.items() if k not in logged})
        else:
            tracker.store_init_configuration(params)


def _check_mlflow_store() -> None:
    """MLflow's default store is a local SQLite file, which mlflow-skinny (finetrack[mlflow]) cannot write."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    database = uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")
    if database and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"train.report_to: MLflow's tracking URI is {uri}, a database that mlflow-skinny cannot write (no SQLAlchemy): "
            "set MLFLOW_TRACKING_URI to your MLflow server (e.g. http://localhost:5000), or pip install mlflow for a local database"
        )


def _mlflow_run_to_continue(saved: dict | None) -> str | None:
    """The MLflow run id of trackers.json, after checking that MLflow points at the store that holds it."""
    if not saved:
        return None
    import mlflow

    uri = mlflow.get_tracking_uri()
    if saved.get("tracking_uri") and saved["tracking_uri"] != uri:
        raise ConfigError(
            f"{IDS_FILE}: the MLflow run {saved['run_id']} of this run directory is in {saved['tracking_uri']}, but MLflow now "
            f"points at {uri}: set MLFLOW_TRACKING_URI={saved['tracking_uri']} to continue it, or start over with --fresh"
        )
    return saved["run_id"]


def _read_ids(run_dir: Path, project: str, names: list[str]) -> dict:
    """trackers.json, less the tracker runs of another project (a changed report_project starts new runs)."""
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix it, or delete it to start new tracker runs") from None
    other = [k for k, v in ids.items() if v.get("project") != project]
    if set(other) & set(names):
        log.info("train.report_project is now %r: new tracker runs for %s", project, ", ".join(sorted(set(other) & set(names))))
    return {k: v for k, v in ids.items() if k not in other}


def _write_ids(run_dir: Path, ids: dict) -> None:
    from .checkpoint import write_atomic

    write_atomic(run_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n")
