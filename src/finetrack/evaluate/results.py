"""Eval results on disk (the run-directory contract): one record per step, the answers behind it, eval/summary.csv,
and the table `finetrack eval` prints (rates in percent: it is read by people; the files keep fractions)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from .. import rundir
from ..rundir import write_atomic
from . import rates
from .spec import EvalError

log = logging.getLogger("finetrack")


def read_step(run_dir: Path, step: int) -> dict | None:
    """The step's record so far (its cached suite results), None when not evaluated yet.

    A garbled file is an EvalError naming it, not a silent re-evaluation: it may hold hours of judge results
    that a look (or a restore) would save."""
    path = rundir.eval_path(run_dir, step)
    if not path.is_file():
        return None
    record = rundir.read_eval(path, run_dir)
    if not isinstance(record.get("suites", {}), dict) or record["step"] != step:
        raise EvalError(f"{path}: not the eval record of step {step}; delete it and re-run `finetrack eval {run_dir}`")
    record.setdefault("suites", {})
    return record


def write_step(run_dir: Path, record: dict) -> None:
    path = rundir.eval_path(run_dir, record["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def flatten(record: dict) -> dict:
    """Fill a step record's `metrics` and `counts` ('<suite>.<name>') from its per-suite results; returns it."""
    suites = sorted(record["suites"].items())
    record["metrics"] = {f"{name}.{k}": v for name, r in suites for k, v in r["metrics"].items()}
    record["counts"] = {f"{name}.{k}": v for name, r in suites for k, v in r.get("counts", {}).items()}
    return record


def write_responses(run_dir: Path, step: int, suite: str, responses: list[dict] | None) -> None:
    """Replace this suite's answers in the step's responses file (other suites' lines stay)."""
    if responses is None:
        return
    path = rundir.responses_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad: list[int] = []
    kept = [row for row in rundir.read_jsonl(path, bad) if row.get("suite") != suite]
    if bad:
        log.warning("%s: %d unreadable line(s) dropped while rewriting it (line %s)", path, len(bad), ", ".join(map(str, bad[:5])))
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept) + "".join(json.dumps({"suite": suite, **r}) + "\n" for r in responses))


def write_summary(run_dir: Path) -> list[dict]:
    """eval/summary.csv from every step file: one row per step, one column per metric."""
    rows = [rundir.read_eval(p, run_dir) for p in rundir.eval_files(run_dir).values()]
    names = sorted({m for r in rows for m in r.get("metrics", {})})
    with open(run_dir / "eval" / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "fraction", *names])
        for r in rows:
            w.writerow(
                [
                    r["step"],
                    round(r.get("epoch", 0.0), 4),
                    round(r.get("fraction", 0.0), 4),
                    *("" if r.get("metrics", {}).get(n) is None else r["metrics"][n] for n in names),
                ]
            )
    return rows


def trajectory_table(rows: list[dict]) -> str:
    """Step, where in training, each metric and its change vs step 0 (rates in percent and points: a table for people)."""
    names = sorted({m for r in rows for m in r.get("metrics", {})})
    base = next((r.get("metrics", {}) for r in rows if r["step"] == 0), {})

    def cell(r: dict, n: str) -> str:
        v, b = r.get("metrics", {}).get(n), base.get(n)
        if v is None:
            return "-"
        # a layer index (representation suites' most-changed layer) has no meaningful change
        delta = "" if r["step"] == 0 or b is None or n.endswith(("_layer", ".layer")) else f" ({rates.show_change(v - b, n)})"
        return f"{rates.show(v, n)}{delta}"

    header = ["step", "phase", *names]
    body = [
        [
            str(r["step"]),
            "base" if r["step"] == 0 else f"epoch {r.get('epoch', 0):.2f} ({100 * r.get('fraction', 0):.0f}%)",
            *(cell(r, n) for n in names),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])
