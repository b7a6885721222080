"""Everything the report shows, read from one run directory (the run-directory contract, nothing else).

Unreadable lines and files are not skipped silently: each is counted in `RunData.problems` and shown
at the top of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import rundir
from . import records


@dataclass
class CheckpointInfo:
    step: int
    folder: str
    size_bytes: int
    resumable: bool  # still holds optimizer / RNG state
    meta: dict
    problem: str = ""  # what verifying it found wrong ("": complete)

    @property
    def complete(self) -> bool:
        """MANIFEST.json present and every listed file has its size."""
        return not self.problem


@dataclass
class RunData:
    path: Path
    name: str
    config: dict
    data_report: dict | None
    metrics: list[dict]
    evals: list[dict]  # eval/step-*.json records, by step
    responses: dict[int, list[dict]]  # step -> answers of the judge suites
    samples: list[dict]  # samples.jsonl: answers on fixed prompts during training
    checkpoints: list[CheckpointInfo]
    trackers: dict
    problems: list[str] = field(default_factory=list)
    remote: dict | None = None  # remote.json from the uploader: {"url", "uploaded_steps", "failed_steps"}
    best: dict | None = None  # checkpoints/best.json: {"step", "metric", "mode", "value", "checkpoint"}; None when absent or garbled

    def resolved(self, key: str, default=None):
        """A value `resolve()` decided (steps_per_epoch, total_steps, checkpoint_steps, ...)."""
        entry = (self.config.get("resolved") or {}).get(key)
        return entry.get("value", default) if isinstance(entry, dict) else default

    @property
    def versions(self) -> dict:
        return self.newest_meta().get("versions", {})

    def newest_meta(self) -> dict:
        return self.checkpoints[-1].meta if self.checkpoints else {}

    @property
    def stop_reason(self) -> dict | None:
        """Why the run stopped before its planned end (early stopping, a callback): the `stop_reason` of the newest
        checkpoint whose meta.json could be read; None when that one has none (a run resumed past a stop has none)."""
        meta = next((c.meta for c in reversed(self.checkpoints) if c.meta), {})
        reason = meta.get("stop_reason")
        return reason if isinstance(reason, dict) else None

    def suite_rates(self) -> dict[str, dict[str, str]]:
        """Judge suite name -> its named rates ('misaligned': 'aligned < 30 and coherent > 50')."""
        return rundir.judge_rates(self.config)


def load_run(path: Path, name: str | None = None) -> RunData:
    """Read a run directory; raises ConfigError when it is not one (no config.resolved.yaml)."""
    path = rundir.require_run_dir(Path(path), "report")
    problems: list[str] = []
    config = rundir.read_config(path)
    limit = records.step_limit(config)  # no record of the run can be past its last step
    run = RunData(
        path=path,
        name=name or path.resolve().name,
        config=config,
        data_report=_json_file(path / "data_report.json", problems),
        metrics=_jsonl(path / "metrics.jsonl", problems, lambda r: records.metrics_line(r, limit)),
        evals=[r for p in rundir.eval_files(path).values() if (r := _eval_record(p, problems, limit)) is not None],
        responses={},
        samples=_jsonl(path / "samples.jsonl", problems, lambda r: _whole(records.sample_line(r, limit), r)),
        checkpoints=_checkpoints(path),
        trackers=_json_file(path / "trackers.json", problems) or {},
        problems=problems,
        remote=_remote_record(path / "remote.json", problems),
        best=_best(path, problems),
    )
    for p in sorted((path / "eval" / "responses").glob("step-*.jsonl")):
        step = rundir.parse_step(p.stem)
        if step is not None:
            run.responses[step] = _jsonl(p, problems, lambda r: _whole(records.response_line(r), r))
    run.evals.sort(key=lambda r: r.get("step", 0))
    run.problems += [f"checkpoint {c.folder}: {c.problem}" for c in run.checkpoints if c.problem]
    if run.best is not None and not any(c.step == run.best["step"] and c.complete for c in run.checkpoints):
        run.problems.append(
            f"checkpoints/{rundir.BEST_FILE}: names step {run.best['step']}, whose checkpoint is gone or incomplete "
            "(the best step is still marked)"
        )
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Short labels for runs: the folder name, with parent folders added until the labels differ."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    out = []
    for step, folder in rundir.step_folders(run_dir):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        problem, meta, resumable = "", {}, False
        try:
            manifest = rundir.verify(folder, full=False)  # sizes only: a report must not re-hash gigabytes
            resumable = rundir.is_resumable(manifest)
            meta = rundir.read_meta(folder)
        except rundir.CheckpointError as e:
            problem = str(e)
        out.append(CheckpointInfo(step, folder.name, size, resumable, meta, problem))
    return out


def _best(run_dir: Path, problems: list[str]) -> dict | None:
    """checkpoints/best.json; a garbled one is a problem shown, and no step is marked best."""
    try:
        return rundir.read_best(run_dir)
    except rundir.CheckpointError as e:
        problems.append(
            f"checkpoints/{rundir.BEST_FILE}: {str(e).removeprefix(str(rundir.best_path(run_dir)) + ': ')}; no step marked best"
        )
        return None


def _remote_record(path: Path, problems: list[str]) -> dict | None:
    """The uploader's record of which checkpoint steps are on the remote; one of another shape is a problem."""
    record = _json_file(path, problems)
    if record is None:
        return None
    steps_ok = all(
        isinstance(record.get(k), list) and all(isinstance(s, int) for s in record[k]) for k in ("uploaded_steps", "failed_steps")
    )
    if not isinstance(record.get("url"), str) or not steps_ok:
        problems.append(
            f'{path.name}: expected {{"url": text, "uploaded_steps": [steps], "failed_steps": [steps]}}; upload status left out'
        )
        return None
    return record


def _json_file(path: Path, problems: list[str]) -> dict | None:
    """A small JSON object file of the run (data report, trackers, remote record); an unreadable one is a problem shown."""
    if not path.is_file():
        return None
    try:
        value = rundir.read_json(path)
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: unreadable ({' '.join(str(e).split())[:160]}); left out")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: holds a JSON {type(value).__name__}, not an object; left out")
        return None
    return value


def _eval_record(path: Path, problems: list[str], limit: int) -> dict | None:
    """One eval/step-*.json; a garbled one (or one of its values of the wrong type) is shown as a problem, with the
    command that rewrites it, not fatal."""
    from ..evaluate.spec import EvalError

    try:
        record, wrong = records.eval_record(rundir.read_eval(path), limit)
    except EvalError as e:
        problems.append(f"eval/{path.name}: {str(e).removeprefix(str(path) + ': ')}")
        return None
    again = f"delete it and re-run `finetrack eval {path.parent.parent}`"
    if record is None:
        problems.append(f"eval/{path.name}: {wrong[0]}; left out; {again}")
    elif wrong:
        problems.append(f"eval/{path.name}: {_listed(wrong)} left out of the charts; {again}")
    return record


Check = Callable[[dict], tuple[dict | None, list[str]]]  # a line -> (the line as shown or None, what was wrong)


def _whole(why: str, record: dict) -> tuple[dict | None, list[str]]:
    """A check that keeps or leaves out a whole line, as a Check."""
    return (None, [why]) if why else (record, [])


def _jsonl(path: Path, problems: list[str], check: Check) -> list[dict]:
    """The JSON lines of a file, each checked for the shape the page reads; a line cut short (a run killed mid-write),
    a line of the wrong shape and a field of the wrong type are each counted with their line numbers, not fatal."""
    unreadable: list[int] = []
    rows, left_out, fields = [], [], []
    for number, row in rundir.read_jsonl_numbered(path, unreadable):
        kept, wrong = check(row)
        if kept is None:
            left_out.append(f"line {number}: {wrong[0]}")
        else:
            rows.append(kept)
            fields += [f"line {number}: {w}" for w in wrong]
    where = "/".join(path.parts[-3:]) if path.parent.name == "responses" else path.name
    if unreadable:
        problems.append(f"{where}: {len(unreadable)} unreadable line(s) left out (line {_listed(list(map(str, unreadable)))})")
    if left_out:
        problems.append(f"{where}: {len(left_out)} line(s) of the wrong shape left out ({_listed(left_out, '; ')}); fix or delete them")
    if fields:
        problems.append(f"{where}: {len(fields)} value(s) of the wrong type left out of the charts ({_listed(fields, '; ')}); fix them")
    return rows


def _listed(items: list[str], sep: str = ", ") -> str:
    """The first five of a list of problems, '...' for the rest: a line of the page, however many there are."""
    return sep.join(items[:5]) + (f"{sep}..." if len(items) > 5 else "")
