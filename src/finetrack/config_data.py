"""The `data` section of the config: where rows come from and how they are read (column names, a sample, the
held-out split, lengths, packing). Part of the schema: config.py imports it; split off to keep each module one stage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from .schema import Knob, Section, is_file_source

# The row fields finetrack reads (data.columns keys): chat and text rows, then the objectives' (objective_data.py).
DATA_COLUMNS = ("messages", "prompt", "completion", "text", "target", "steps", "labels", "anchor", "positive", "negative")
DEFAULT_PATH = "builtin:demo-chat"
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")
# a number written as text (a CSV cell, a quoted YAML value)
NUMBER_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _fraction_or_path(value: float | str | None) -> float | str | None:
    # a quoted '0.1' stayed text and was looked for as a data file named 0.1
    if isinstance(value, str) and NUMBER_TEXT.fullmatch(value):
        raise ValueError(f"{value!r} is text: write the fraction unquoted (eval_split: {value.strip()}), or give a file path")
    return value


EvalSplit = Annotated[float | str | None, AfterValidator(_fraction_or_path)]


class SourceConfig(Section):
    """One source of a weighted mixture (data.sources). A setting left unset takes the data section's value."""

    name: str | None = Field(
        None,
        description="Name in metrics (source/<name>.loss), reports and errors: letters, digits, _ and -. Default: the file name "
        "without its suffix.",
    )
    path: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="This source's rows: file(s), a folder of them, a `datasets` name or builtin:demo-chat."
    )
    # bounded: weights of 1e308 summed to inf (every target share 0.0), and one of 1e-320 was never drawn
    weight: float = Field(
        ge=1e-6, le=1e6, description="Share of the rows of every optimizer step, relative to the other sources' weights (1e-6 to 1e6)."
    )
    split: Annotated[
        str | None,
        Knob(
            lambda s, _: s.split is None or not all(is_file_source(p) for p in s.paths()),
            "on files (it picks a split of a `datasets` source): remove it",
        ),
    ] = Field(None, description="Split of a `datasets` source (default: data.split).")
    columns: dict[str, str] | None = Field(None, description="Field names of this source's rows, as data.columns (default: data.columns).")
    max_rows: int | None = Field(
        None, gt=0, description="Sample at most this many of this source's rows, as data.max_rows (default: data.max_rows)."
    )
    eval_split: EvalSplit = Field(
        None, description="This source's held-out rows: a fraction of them or a file (default: data.eval_split when a fraction)."
    )

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def label(self) -> str:
        """The source's name: its own, or its (first) file's name without the suffix."""
        if self.name:
            return self.name
        stem = Path(self.paths()[0].removeprefix("builtin:")).name.split(".")[0]
        return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "source"


class DataConfig(Section):
    path: str | Annotated[list[str], Field(min_length=1)] = Field(
        DEFAULT_PATH,
        description="Training data: file(s) (.jsonl .json .csv .parquet), a directory of them, a `datasets` hub name, "
        "or 'builtin:demo-chat' (the chat set shipped with finetrack). One source; several weighted ones: data.sources.",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="A weighted mixture instead of data.path: [{name, path, weight, split, columns, max_rows, eval_split}]. "
        "Every optimizer step takes each source's share of its rows (exactly, by a fixed rule); a source's unset settings "
        "take this section's.",
    )
    on_source_end: Annotated[Literal["repeat", "stop"], Knob(lambda d, _: bool(d.sources), "without data.sources: remove it")] = Field(
        "repeat",
        description="A mixture source whose rows are all used: repeat = reshuffle and go on (counted as its epochs), "
        "stop = the run ends at the last step before any source would repeat.",
    )
    split: Annotated[
        str,
        Knob(
            lambda d, _: not all(is_file_source(s) for s in d.locations()),
            "on files or builtin data (it picks a split of a `datasets` source): remove it",
        ),
    ] = Field("train", description="Split to read from a `datasets` source.")
    eval_split: EvalSplit = Field(None, description="Held-out rows for eval loss: a fraction in (0, 1) of the data, or a file path.")
    max_length: int = Field(2048, gt=0, description="Maximum tokens per row.")
    on_overflow: Literal["truncate", "drop", "error"] = Field("truncate", description="What to do with a row longer than max_length.")
    on_error: Literal["error", "skip"] = Field("error", description="Malformed rows: stop with file/line/field, or skip and count.")
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant",
        description="Which tokens of a chat row carry loss: every assistant turn, every token, or only the last assistant turn "
        "(a plain text row trains on every token).",
    )
    pack: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free batches (rows concatenated, boundaries kept by position_ids); "
        "auto = on when the model's attention is verified to respect the boundaries.",
    )
    pack_row_tokens: Annotated[int | None, Knob(lambda d, _: d.pack is not False, "with data.pack=false: remove it or enable packing")] = (
        Field(
            None,
            gt=0,
            description="Packed row width in tokens. None: chosen per micro-batch to compute least (attention cost grows with "
            "the square of the row on sdpa/eager). Set a large value (e.g. 8192) with flash_attention_2, whose cost does not.",
        )
    )
    shuffle: bool = Field(True, description="Shuffle rows every epoch (deterministic by train.seed).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Which field of your rows holds each field finetrack reads ({our name: your field}), e.g. {prompt: "
        "question, completion: answer}: rows are read without rewriting the dataset. Keys: " + ", ".join(DATA_COLUMNS) + ".",
    )
    max_rows: int | None = Field(
        None,
        gt=0,
        description="Train on at most this many rows, drawn by train.seed from all rows read, before tokenizing and before "
        "data.eval_split's fraction is cut (a quick trial on a sample; an eval_split file is read whole).",
    )

    def locations(self) -> list[str]:
        """Every data location named: the training path(s) (of every source) and eval_split files."""
        paths = [self.path] if isinstance(self.path, str) else list(self.path)
        if self.sources:
            paths = [p for s in self.sources for p in s.paths()]
            paths += [s.eval_split for s in self.sources if isinstance(s.eval_split, str)]
        return paths + ([self.eval_split] if isinstance(self.eval_split, str) else [])

    def has_held_out(self) -> bool:
        """Are there held-out rows: data.eval_split, or a source's own eval_split?"""
        return self.eval_split is not None or any(s.eval_split is not None for s in self.sources)

    @model_validator(mode="after")
    def _checks(self) -> DataConfig:
        if isinstance(self.eval_split, float) and not 0 < self.eval_split < 1:
            raise ValueError(f"data.eval_split={self.eval_split}: a fraction must be in (0, 1), or give a file path")
        _check_columns(self.columns, "data.columns")
        self._check_sources()
        if self.pack is not False and self.pack_row_tokens is not None and self.pack_row_tokens < self.max_length:
            raise ValueError(
                f"data.pack_row_tokens={self.pack_row_tokens} < data.max_length={self.max_length}: a row could not fit; "
                "raise pack_row_tokens or lower max_length"
            )
        return self

    def _check_sources(self) -> None:
        if not self.sources:
            return
        if self.path != DEFAULT_PATH:
            raise ValueError("data.path and data.sources are both set: give the rows either as one data.path or as data.sources")
        if isinstance(self.eval_split, str):
            raise ValueError(
                f"data.eval_split={self.eval_split}: with data.sources a held-out file belongs to one source: set eval_split on "
                "that source (data.sources.N.eval_split), or give a fraction here (cut from every source)"
            )
        names: dict[str, int] = {}
        for i, s in enumerate(self.sources):
            name = s.label()
            if s.name is not None and not _SOURCE_NAME.fullmatch(s.name):
                raise ValueError(f"data.sources.{i}.name={s.name!r}: use letters, digits, _ and - only (it names metrics)")
            if name in names:
                raise ValueError(f"data.sources.{i} and data.sources.{names[name]} are both named '{name}': give each a distinct name")
            names[name] = i
            if isinstance(s.eval_split, float) and not 0 < s.eval_split < 1:
                raise ValueError(f"data.sources.{i}.eval_split={s.eval_split}: a fraction must be in (0, 1), or give a file path")
            _check_columns(s.columns or {}, f"data.sources.{i}.columns")


def _check_columns(columns: dict[str, str], key: str) -> None:
    for ours, theirs in columns.items():
        if ours not in DATA_COLUMNS:
            raise ValueError(f"{key}.{ours}: not a field finetrack reads; known: {', '.join(DATA_COLUMNS)}")
        if not theirs.strip():
            raise ValueError(f"{key}.{ours} is empty: give the name of the field that holds {ours}")
        if other := next((k for k, v in columns.items() if v == theirs and k != ours), None):
            raise ValueError(f"{key}.{ours} and {key}.{other} both name field '{theirs}'; map each to its own field")
