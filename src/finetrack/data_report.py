"""What the data stage counts: rows read, sampled, kept, dropped (and why), truncated, held out; tokens; files and
message keys left out. Written to data_report.json and summed up in one log line; nothing is left out silently."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import Example
    from .data_columns import Sample

log = logging.getLogger("finetrack")
_MAX_REASONS = 5


@dataclass
class DataReport:
    rows_read: int = 0
    rows_read_by_source: dict[str, int] = field(default_factory=dict)  # file path or dataset name -> rows read
    rows_not_sampled: int = 0  # rows read but not drawn into the data.max_rows sample (never validated)
    rows_not_sampled_by_source: dict[str, int] = field(default_factory=dict)
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"malformed": 0, "too_long": 0, "no_trainable_tokens": 0})
    truncated_rows: int = 0
    held_out: int = 0  # rows moved to the eval split (data.eval_split as a fraction)
    first_reasons: list[str] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)
    trainable_tokens: int = 0
    skipped_files: list[str] = field(default_factory=list)  # 'path (reason)' of files in data folders that were not read
    ignored_message_keys: Counter = field(default_factory=Counter)  # message key -> messages whose key was dropped

    def note(self, reason: str) -> None:
        if len(self.first_reasons) < _MAX_REASONS:
            self.first_reasons.append(reason)

    def count_sample(self, sample: Sample) -> None:
        """Count the rows data.max_rows left out as read and not sampled (parsed_rows counts the drawn ones as read)."""
        drawn = Counter(row.source for row in sample.rows)
        for source, n in sample.read_by_source.items():
            self.rows_read_by_source[source] = self.rows_read_by_source.get(source, 0) + n - drawn[source]
            self.rows_not_sampled_by_source[source] = n - drawn[source]
        self.rows_not_sampled = sum(self.rows_not_sampled_by_source.values())
        self.rows_read += self.rows_not_sampled

    def finish(self, examples: list[Example]) -> None:
        self.rows_kept = len(examples)
        lengths = sorted(sum(len(s.input_ids) for s in e.sequences()) for e in examples)  # a triplet: its three sequences
        if lengths:
            p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
            self.tokens = {
                "total": sum(lengths),
                "min": lengths[0],
                "mean": round(sum(lengths) / len(lengths), 1),
                "p95": p95,
                "max": lengths[-1],
            }
        self.trainable_tokens = sum(e.num_trainable_tokens for e in examples)

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_read_by_source": dict(self.rows_read_by_source),
            "rows_not_sampled": self.rows_not_sampled,
            "rows_not_sampled_by_source": dict(self.rows_not_sampled_by_source),
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "truncated_rows": self.truncated_rows,
            "held_out_for_eval": self.held_out,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "first_reasons": list(self.first_reasons),
            "skipped_files": list(self.skipped_files),
            "ignored_message_keys": dict(sorted(self.ignored_message_keys.items())),
        }


def report_line(report: dict) -> str:
    """One line for the log: what was read, kept, dropped and truncated."""
    t = report["train"]
    dropped = ", ".join(f"{k} {v}" for k, v in t["dropped"].items() if v) or "none"
    tok = t["tokens"] or {}
    held = ""
    if t["held_out_for_eval"]:
        held = f"; {t['held_out_for_eval']} more rows held out for eval loss"
    elif "eval" in report:
        held = f"; {report['eval']['rows_kept']} eval rows from data.eval_split"
    notes = ""
    if t.get("skipped_files"):
        notes += f"; {len(t['skipped_files'])} files in data folders not read (see data_report.json)"
    if t.get("ignored_message_keys"):
        notes += "; message keys not trained on: " + ", ".join(f"{k} ({n})" for k, n in t["ignored_message_keys"].items())
    sampled = f"{t['rows_not_sampled']} not in the data.max_rows sample, " if t.get("rows_not_sampled") else ""
    return (
        f"{t['rows_read']} rows read, {sampled}{t['rows_kept']} to train on (dropped: {dropped}; truncated: {t['truncated_rows']}); "
        f"tokens/row min {tok.get('min')} mean {tok.get('mean')} p95 {tok.get('p95')} max {tok.get('max')}; "
        f"{t['trainable_tokens']} trainable tokens{held}{notes}"
    )


def warn_left_out(split: str, report: dict) -> None:
    """Say by name what was not read or not trained on: files in data folders, message keys."""
    skipped = report.get("skipped_files") or []
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        log.warning("data (%s): %d files in data folders not read: %s", split, len(skipped), shown)
    keys = report.get("ignored_message_keys") or {}
    if keys:
        counts = ", ".join(f"{k} in {n} messages" for k, n in keys.items())
        log.warning("data (%s): message keys other than role and content are not trained on (dropped): %s", split, counts)
