"""Data stage: read -> validate -> chat template -> labels -> length policy -> report.

Rows are either chat (`messages`: a list of {role, content} with roles system/user/assistant) or
`prompt` / `completion` (prompt: a string or a list of messages). Every row that is dropped,
truncated or skipped is counted in the data report; a malformed row stops the run with its file,
line and field unless `data.on_error=skip`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .schema import DATA_FILE_SUFFIXES

ROLES = ("system", "user", "assistant")
BUILTIN_DATA = {"builtin:demo-chat": Path(__file__).parent / "assets" / "demo_chat.jsonl"}
_FILE_KINDS = {suffix: suffix[1:] for suffix in DATA_FILE_SUFFIXES}
_MAX_REASONS = 5


class DataError(ValueError):
    """A bad row or source; the message names file, line and field and what to do."""


@dataclass
class RawRow:
    source: str  # file path or dataset name
    line: int  # 1-based line (JSONL/CSV) or item number (JSON/Parquet/datasets)
    record: Any


@dataclass
class Example:
    """One tokenized row. labels == -100 where the token carries no loss."""

    input_ids: list[int]
    labels: list[int]
    source: str
    line: int

    @property
    def num_trainable_tokens(self) -> int:
        # position 0 is never predicted (nothing precedes it)
        return sum(1 for x in self.labels[1:] if x != -100)


@dataclass
class DataReport:
    rows_read: int = 0
    rows_read_by_source: dict[str, int] = field(default_factory=dict)  # file path or dataset name -> rows read
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"malformed": 0, "too_long": 0, "no_trainable_tokens": 0})
    truncated_rows: int = 0
    held_out: int = 0  # rows moved to the eval split (data.eval_split as a fraction)
    first_reasons: list[str] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)
    trainable_tokens: int = 0

    def note(self, reason: str) -> None:
        if len(self.first_reasons) < _MAX_REASONS:
            self.first_reasons.append(reason)

    def finish(self, examples: list[Example]) -> None:
        self.rows_kept = len(examples)
        lengths = sorted(len(e.input_ids) for e in examples)
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
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "truncated_rows": self.truncated_rows,
            "held_out_for_eval": self.held_out,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "first_reasons": list(self.first_reasons),
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
    return (
        f"{t['rows_read']} rows read, {t['rows_kept']} to train on (dropped: {dropped}; truncated: {t['truncated_rows']}); "
        f"tokens/row min {tok.get('min')} mean {tok.get('mean')} p95 {tok.get('p95')} max {tok.get('max')}; "
        f"{t['trainable_tokens']} trainable tokens{held}"
    )


# ---------------------------------------------------------------------------------------- read
def source_files(spec: str) -> list[Path] | None:
    """The files a path spec names, or None when it is not a local path (then it is a datasets source)."""
    if spec in BUILTIN_DATA:
        return [BUILTIN_DATA[spec]]
    p = Path(spec)
    if p.is_dir() and any((p / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return None  # a `datasets` save_to_disk directory
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _FILE_KINDS)
        if not files:
            raise DataError(f"{p}: no .jsonl/.json/.csv/.parquet files in this directory")
        return files
    if p.is_file():
        if p.suffix not in _FILE_KINDS:
            raise DataError(f"{p}: unknown file type '{p.suffix}'; use .jsonl, .json, .csv or .parquet")
        return [p]
    if p.suffix in _FILE_KINDS or spec.startswith((".", "/")):
        raise DataError(f"data file not found: {p}")
    return None


def read_rows(spec: str | list[str], split: str) -> Iterator[RawRow]:
    """Yield raw records with their location. Unparseable lines are yielded as DataError records."""
    for one in [spec] if isinstance(spec, str) else spec:
        files = source_files(one)
        if files is None:
            yield from _read_datasets(one, split)
            continue
        for f in files:
            yield from _read_file(f)


def _read_file(path: Path) -> Iterator[RawRow]:
    kind = _FILE_KINDS[path.suffix]
    if kind == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield RawRow(str(path), i, json.loads(line))
                except json.JSONDecodeError as e:
                    yield RawRow(str(path), i, DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})"))
    elif kind == "json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file must hold a list of rows") from None
        if isinstance(items, dict) and len(items) == 1 and isinstance(next(iter(items.values())), list):
            items = next(iter(items.values()))
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json file must hold a list of rows (or use .jsonl, one row per line)")
        for i, item in enumerate(items, 1):
            yield RawRow(str(path), i, item)
    elif kind == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for record in reader:
                # line_num is the reader's position after the row: the row's own (last) line
                yield RawRow(str(path), reader.line_num, dict(record))
    else:
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist(), 1):
            yield RawRow(str(path), i, record)


def _read_datasets(name: str, split: str) -> Iterator[RawRow]:
    import datasets

    p = Path(name)
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise DataError(f"data.path={name}: cannot load it as a file, directory or `datasets` source ({e})") from None
    for i, record in enumerate(ds, 1):
        yield RawRow(name, i, record)


# ------------------------------------------------------------------------------------ validate
def to_messages(row: RawRow) -> list[dict[str, str]]:
    """Validate one record and return it as chat messages; raises DataError naming file, line and field."""
    where = f"{row.source}:{row.line}"
    rec = row.record
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a row must be an object with 'messages' or 'prompt'/'completion', got {type(rec).__name__}")
    if "messages" in rec:
        messages = rec["messages"]
        if isinstance(messages, str):  # CSV cells hold JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise DataError(f"{where}: field 'messages' is text that is not a JSON list of messages") from None
        return _check_messages(messages, where, "messages", need_assistant=True)
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if key not in rec:
                raise DataError(f"{where}: field '{key}' is missing (prompt/completion rows need both)")
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: field 'prompt' is empty")
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = _check_messages(prompt, where, "prompt", need_assistant=False)
        completion = rec["completion"]
        if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
            completion = completion[0].get("content")
        if not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{where}: field 'completion' must be non-empty text")
        return msgs + [{"role": "assistant", "content": completion}]
    raise DataError(f"{where}: no 'messages' and no 'prompt'/'completion' field (found: {', '.join(map(str, rec)) or 'nothing'})")


def _check_messages(messages: Any, where: str, name: str, need_assistant: bool) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        f = f"{name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}' must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field '{f}.role' is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{f}.content' must be text")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: field '{f}.content' is an empty assistant answer")
        if role == "system" and j != 0:
            raise DataError(f"{where}: field '{f}.role' is 'system' but only the first message may be a system prompt")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field '{name}' has no assistant message: nothing to learn from")
    return out


# ------------------------------------------------------------------------------------ tokenize
def tokenize_chat(messages: list[dict[str, str]], tokenizer, train_on: str, where: str = "") -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; labels = token ids on trained spans, -100 elsewhere.

    Assistant spans are found by rendering each prefix of the conversation: the span of assistant turn
    i runs from the end of "messages[:i] + generation prompt" to the end of "messages[:i+1]", so it
    includes the turn's end-of-turn token. Whitespace after that token (e.g. the newline in ChatML)
    carries no loss: the model never has to produce it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the tokenizer has no chat template; use a chat model or set tokenizer.chat_template")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages, False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    if train_on == "all":
        return ids, list(ids)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else ""
        end = render(messages[: i + 1], False)
        if not (text.startswith(prefix) and text.startswith(end)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix, so assistant tokens cannot be "
                "located; use data.train_on=all or a template that does"
            )
        spans.append((len(prefix), len(end)))
    if train_on == "last_assistant":
        spans = spans[-1:]
    special = set(tokenizer.all_special_ids)
    labels = [-100] * len(ids)
    for start, end in spans:
        inside = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s >= start and e <= end]
        # drop trailing whitespace after the turn's last special token
        while len(inside) > 1 and ids[inside[-1]] not in special and not tokenizer.decode([ids[inside[-1]]]).strip():
            inside.pop()
        for j in inside:
            labels[j] = ids[j]
    return ids, labels


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: dict  # the data_report.json content

    def fingerprint(self) -> str:
        """Hash of the tokenized training rows in order (ids and loss masks): a resumed run checks it sees the same data."""
        h = hashlib.sha256()
        for e in self.train:
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes() + b"|" + np.asarray(e.labels, dtype=np.int64).tobytes() + b"\n")
        return h.hexdigest()[:16]


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate and tokenize the training (and held-out) rows; count everything left out."""
    train_report = DataReport()
    examples = _tokenize_all(read_rows(cfg.path, cfg.split), cfg, tokenizer, train_report)
    eval_examples: list[Example] = []
    eval_report = None
    if isinstance(cfg.eval_split, float):
        # A fixed permutation by seed decides which rows are held out, independent of the epoch order.
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        num_eval = max(1, round(cfg.eval_split * len(examples)))
        held = set(order[:num_eval])
        eval_examples = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
        train_report.held_out = len(eval_examples)
    elif isinstance(cfg.eval_split, str):
        eval_report = DataReport()
        eval_examples = _tokenize_all(read_rows(cfg.eval_split, cfg.split), cfg, tokenizer, eval_report)
    train_report.finish(examples)
    report = {"train": train_report.to_dict()}
    if eval_report is not None:
        eval_report.finish(eval_examples)
        report["eval"] = eval_report.to_dict()
    elif eval_examples:
        report["eval"] = {
            "rows_kept": len(eval_examples),
            "held_out_from_train": cfg.eval_split,
            "tokens_total": sum(len(e.input_ids) for e in eval_examples),
        }
    if not examples:
        raise DataError(f"no training rows left: {report_line(report)}; first reasons: {train_report.first_reasons}")
    return PreparedData(examples, eval_examples, report)


def _tokenize_all(rows: Iterator[RawRow], cfg: DataConfig, tokenizer, report: DataReport) -> list[Example]:
    from tqdm.auto import tqdm

    out = []
    for row in tqdm(rows, desc="tokenize", unit=" rows", leave=False, mininterval=1.0, disable=None):
        report.rows_read += 1
        report.rows_read_by_source[row.source] = report.rows_read_by_source.get(row.source, 0) + 1
        where = f"{row.source}:{row.line}"
        try:
            messages = to_messages(row)
        except DataError as e:
            if cfg.on_error == "error":
                raise DataError(f"{e} (set data.on_error=skip to skip and count such rows)") from None
            report.dropped["malformed"] += 1
            report.note(str(e))
            continue
        ids, labels = tokenize_chat(messages, tokenizer, cfg.train_on, where)
        if len(ids) > cfg.max_length:
            if cfg.on_overflow == "error":
                raise DataError(f"{where}: {len(ids)} tokens > data.max_length={cfg.max_length} (set data.on_overflow=truncate or drop)")
            if cfg.on_overflow == "drop":
                report.dropped["too_long"] += 1
                report.note(f"{where}: {len(ids)} tokens > max_length {cfg.max_length}, dropped")
                continue
            report.truncated_rows += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        ex = Example(ids, labels, row.source, row.line)
        if ex.num_trainable_tokens == 0:
            report.dropped["no_trainable_tokens"] += 1
            report.note(
                f"{where}: no token carries loss (train_on={cfg.train_on}" + (", after truncation)" if len(ids) == cfg.max_length else ")")
            )
            continue
        out.append(ex)
    return out
