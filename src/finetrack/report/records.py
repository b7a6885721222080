"""The shape of each record the report reads from a run's JSON files (metrics.jsonl, samples.jsonl,
eval/responses/step-*.jsonl, eval/step-*.json).

Valid JSON of the wrong types (a hand edit, another tool's line, a bad merge) must not reach the charts: there
it would crash the page deep inside a sort or a format, or (a step of 10^23) ask for an axis of 10^23 epochs. Each
check here says what is wrong in words a problem line can quote; collect.py leaves the line (or the field) out and
counts it with its file and line number, as it does for lines that are not JSON at all.
"""

from __future__ import annotations

import json
import math

from ..rundir import is_step

MAX_STEPS = 10**9  # a step beyond this is garbage whatever the config says: no run trains a billion optimizer steps
_QUOTED = 40  # characters of a bad value quoted in a problem line: enough to recognise it, never a whole blob


def is_number(value: object) -> bool:
    """An int or float (JSON's NaN and Infinity included: the charts skip those), never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_limit(config: dict) -> int:
    """The largest step a record of the run may carry: config.resolved.yaml's total_steps when it gives one (a run
    never logs, samples or evaluates past its last step), else MAX_STEPS."""
    resolved = config.get("resolved")
    entry = resolved.get("total_steps") if isinstance(resolved, dict) else None
    total = entry.get("value") if isinstance(entry, dict) else None
    return total if is_step(total) and 0 < total <= MAX_STEPS else MAX_STEPS


def quoted(value: object) -> str:
    """A bad value as a problem line shows it: JSON-like, cut to a few dozen characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**_QUOTED:
        return f"a {math.floor(math.log10(abs(value))) + 1}-digit number"  # its str() is slow, long and unread
    try:
        text = json.dumps(value, ensure_ascii=False)  # as the file holds it: "x", null, [1]
    except (TypeError, ValueError):  # not from a JSON file after all
        text = repr(value)
    return text if len(text) <= _QUOTED else text[: _QUOTED - 3] + "..."


def step_problem(record: dict, limit: int) -> str:
    """'' when the record's "step" is one the run could have logged; else what is wrong with it."""
    if "step" not in record:
        return "no step"
    step = record["step"]
    if not is_step(step):
        return f"step {quoted(step)} is not a step number (a whole number >= 0)"
    if step > limit:
        what = f"the run's {limit} planned steps (config.resolved.yaml total_steps)" if limit < MAX_STEPS else f"{MAX_STEPS:,} steps"
        return f"step {quoted(step)} is beyond {what}"
    return ""


def metrics_line(record: dict, limit: int) -> tuple[dict | None, list[str]]:
    """A metrics.jsonl line as the charts may read it: (None, [why]) when its step is unusable; else the line without
    its fields that are neither a number nor null, and one text per field left out."""
    why = step_problem(record, limit)
    if why:
        return None, [why]
    bad = [k for k, v in record.items() if k != "step" and v is not None and not is_number(v)]
    return {k: v for k, v in record.items() if k not in bad}, [f"{k} {quoted(record[k])} is not a number" for k in bad]


def sample_line(record: dict, limit: int) -> str:
    """'' for a samples.jsonl line the answer table can show (a step, a prompt and its answer as text); else why not."""
    why = step_problem(record, limit)
    if why:
        return why
    for key in ("prompt", "answer"):
        if not isinstance(record.get(key), str):
            return f"no {key}" if key not in record else f"{key} {quoted(record[key])} is not text"
    return ""


def response_line(record: dict) -> str:
    """'' for an eval/responses line the answer table can show; else why not. Keys may be missing (the table shows
    '?' or nothing), but a key present must have the type eval writes."""
    kinds = {  # key -> (accepted, what it must be)
        "suite": (lambda v: isinstance(v, str), "text"),
        "question_id": (lambda v: isinstance(v, str) or is_step(v), "text"),
        "paraphrase": (lambda v: v is None or is_step(v), "a whole number >= 0"),
        "question": (lambda v: isinstance(v, str), "text"),
        "answer": (lambda v: v is None or isinstance(v, str), "text or null"),
        "scores": (lambda v: isinstance(v, dict) and all(s is None or is_number(s) for s in v.values()), "{metric: number or null}"),
    }
    for key, (ok, what) in kinds.items():
        if key in record and not ok(record[key]):
            return f"{key} {quoted(record[key])} is not {what}"
    return ""


def eval_record(record: dict, limit: int) -> tuple[dict | None, list[str]]:
    """An eval/step-*.json record (already an object with an int step and a metrics object) as the trajectory may read
    it: (None, [why]) when its step is unusable; else the record without its values of the wrong type (a metric or a
    count that is not a number, an epoch that is not a number, counts that are not an object), one text per value."""
    why = step_problem(record, limit)
    if why:
        return None, [why]
    out, problems = dict(record), []
    metrics = record.get("metrics", {})
    bad = [k for k, v in metrics.items() if v is not None and not is_number(v)]
    if bad:
        out["metrics"] = {k: v for k, v in metrics.items() if k not in bad}
        problems += [f"metric {k} {quoted(metrics[k])} is not a number" for k in bad]
    counts = record.get("counts", {})
    if not isinstance(counts, dict):
        out["counts"] = {}
        problems.append(f"counts {quoted(counts)} is not an object")
    elif bad := [k for k, v in counts.items() if not (is_number(v) and math.isfinite(v))]:
        out["counts"] = {k: v for k, v in counts.items() if k not in bad}
        problems += [f"count {k} {quoted(counts[k])} is not a number" for k in bad]
    if "epoch" in record and not (is_number(record["epoch"]) and math.isfinite(record["epoch"])):
        del out["epoch"]
        problems.append(f"epoch {quoted(record['epoch'])} is not a number")
    return out, problems
