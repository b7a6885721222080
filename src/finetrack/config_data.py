"""The `data` section of the config: where rows come from and how they are read (column names, a sample, the
held-out split, lengths, packing). Part of the schema: config.py imports it; split off to keep each module one stage."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .schema import Knob, Section, is_file_source

# The row fields finetrack reads (data.columns keys): chat and text rows, then the objectives' (objective_data.py).
DATA_COLUMNS = ("messages", "prompt", "completion", "text", "target", "steps", "labels", "anchor", "positive", "negative")


class DataConfig(Section):
    path: str | list[str] = Field(
        "builtin:demo-chat",
        description="Training data: file(s) (.jsonl .json .csv .parquet), a directory of them, a `datasets` hub name, "
        "or 'builtin:demo-chat' (the chat set shipped with finetrack).",
    )
    split: Annotated[
        str,
        Knob(
            lambda d, _: not all(is_file_source(s) for s in d.sources()),
            "on files or builtin data (it picks a split of a `datasets` source): remove it",
        ),
    ] = Field("train", description="Split to read from a `datasets` source.")
    eval_split: float | str | None = Field(
        None, description="Held-out rows for eval loss: a fraction in (0, 1) of the data, or a file path."
    )
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

    def sources(self) -> list[str]:
        """Every data source named: the training path(s) and an eval_split file."""
        return ([self.path] if isinstance(self.path, str) else self.path) + ([self.eval_split] if isinstance(self.eval_split, str) else [])

    @model_validator(mode="after")
    def _checks(self) -> DataConfig:
        if isinstance(self.eval_split, float) and not 0 < self.eval_split < 1:
            raise ValueError(f"data.eval_split={self.eval_split}: a fraction must be in (0, 1), or give a file path")
        for ours, theirs in self.columns.items():
            if ours not in DATA_COLUMNS:
                raise ValueError(f"data.columns.{ours}: not a field finetrack reads; known: {', '.join(DATA_COLUMNS)}")
            if not theirs.strip():
                raise ValueError(f"data.columns.{ours} is empty: give the name of the field that holds {ours}")
            if other := next((k for k, v in self.columns.items() if v == theirs and k != ours), None):
                raise ValueError(f"data.columns.{ours} and data.columns.{other} both name field '{theirs}'; map each to its own field")
        if self.pack is not False and self.pack_row_tokens is not None and self.pack_row_tokens < self.max_length:
            raise ValueError(
                f"data.pack_row_tokens={self.pack_row_tokens} < data.max_length={self.max_length}: a row could not fit; "
                "raise pack_row_tokens or lower max_length"
            )
        return self
