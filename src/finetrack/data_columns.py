"""Reading a dataset as it is: its field names (data.columns) and a sample of its rows (data.max_rows).

Both are functions of the rows and their own settings, not of the whole data config, so every data source can
carry its own `columns` and `max_rows`.

Column mapping: `columns: {prompt: question, completion: answer}` reads each row's `question` field as `prompt`
and `answer` as `completion`, for every file format and for the objectives' own fields (`target`, `steps`,
`labels`, `anchor`, `positive`, `negative`). The mapping is strict: a row field that happens to carry a mapped
name (`prompt` when prompt is read from `question`) is not read. An error about a renamed field names it as the
row has it and by its key: "field 'question' (data.columns.prompt) is missing".

Sampling: `max_rows: N` keeps at most N rows drawn by the seed (uniform, one pass, memory for N rows), in the
order they were read, before anything is validated or tokenized: rows left out are neither checked nor counted
as dropped, only as not sampled. The same rows and seed give the same sample.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import ObjectiveConfig
from .data_files import RawRow
from .schema import ConfigError

CHAT_FIELDS = ("messages", "prompt", "completion")


# ------------------------------------------------------------------------------------------ columns
def read_fields(objective: ObjectiveConfig | None) -> tuple[str, ...]:
    """The row fields an objective reads (the keys data.columns may map for it)."""
    kind = objective.kind if objective is not None else "causal_lm"
    if kind == "regression":
        assert objective is not None
        return ("prompt", "steps", "labels") if objective.regression.level == "step" else ("messages", "prompt", "completion", "target")
    if kind == "contrastive":
        return ("anchor", "positive", "negative", "completion")
    return (*CHAT_FIELDS, "text")  # causal_lm and python objectives read next-token rows


def check_columns(columns: dict[str, str], objective: ObjectiveConfig | None, key: str = "data.columns") -> None:
    """A ConfigError for a data.columns key the objective does not read (it would be ignored silently)."""
    fields = read_fields(objective)
    for name in columns:
        if name not in fields:
            kind = objective.kind if objective is not None else "causal_lm"
            what = f"objective.kind={kind}" + (f" (level={objective.regression.level})" if objective and kind == "regression" else "")
            hint = "; plain text rows train only next-token objectives (causal_lm)" if name == "text" else ""
            raise ConfigError(f"{key}.{name}: {what} reads no field '{name}' (it reads {', '.join(fields)}); remove it{hint}")


def column_fields(columns: dict[str, str], target_field: str = "target") -> dict[str, tuple[str, str]]:
    """our field -> (the row's field, data.columns key). The regression target is read under the name
    objective.regression.target_field: `columns.target` says which row field holds it."""
    return {(target_field if key == "target" else key): (theirs, key) for key, theirs in columns.items()}


def map_columns(rows: Iterable[RawRow], columns: dict[str, str], target_field: str = "target") -> Iterator[RawRow]:
    """The rows with their fields renamed by `columns` ({our name: the row's name}); records that are not objects
    (and unparseable lines) pass unchanged, for the row checks to report."""
    if not columns:
        yield from rows
        return
    fields = column_fields(columns, target_field)
    ours = {theirs: name for name, (theirs, _) in fields.items()}
    for row in rows:
        record = row.record
        if isinstance(record, dict):
            record = {ours.get(k, k): v for k, v in record.items() if k in ours or k not in fields}
        yield RawRow(row.source, row.line, record, fields)


def name_columns(message: str, fields: dict[str, tuple[str, str]]) -> str:
    """A row error's message with every renamed field named as the row has it and by its data.columns key:
    "field 'prompt' is missing" -> "field 'question' (data.columns.prompt) is missing"."""
    for name, (theirs, key) in fields.items():
        pattern = re.compile(rf"(field |no |/)'{re.escape(name)}((?:[\[.][^']*)?)'")
        message = pattern.sub(lambda m, t=theirs, k=key: f"{m.group(1)}'{t}{m.group(2)}' (data.columns.{k})", message)
    back = {name: theirs for name, (theirs, _) in fields.items()}
    return re.sub(r"\(found: ([^)]*)\)", lambda m: "(found: " + ", ".join(back.get(k, k) for k in m.group(1).split(", ")) + ")", message)


def is_text_row(record: Any, fields: tuple[str, ...] = CHAT_FIELDS) -> bool:
    """A plain text row: a `text` field and none of `fields` (a row with `messages` and `text` is a chat row).
    Parquet and `datasets` give every row every column, missing ones as None: only values count."""
    return isinstance(record, dict) and record.get("text") is not None and all(record.get(k) is None for k in fields)


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class Sample:
    rows: list[RawRow]  # the rows drawn, in the order they were read
    read_by_source: dict[str, int]  # every row read, drawn or not, per source in the order the sources came


def sample_rows(rows: Iterable[RawRow], max_rows: int, seed: int) -> Sample:
    """At most `max_rows` rows drawn uniformly by `seed` (reservoir sampling: one pass, memory for max_rows rows);
    all rows when there are no more. Deterministic: the same rows and seed give the same sample."""
    rng = random.Random(f"finetrack.max_rows.{seed}")  # a string seed hashes the same in every process
    kept: list[tuple[int, RawRow]] = []
    read: dict[str, int] = {}
    for i, row in enumerate(rows):
        read[row.source] = read.get(row.source, 0) + 1
        if i < max_rows:
            kept.append((i, row))
        elif (j := rng.randrange(i + 1)) < max_rows:
            kept[j] = (i, row)
    kept.sort(key=lambda t: t[0])
    return Sample([row for _, row in kept], read)
