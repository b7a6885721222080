"""Data stage: read -> validate -> chat template -> labels -> length policy -> report.

Rows are either chat (`messages`: a list of {role, content} with roles system/user/assistant),
`prompt` / `completion` (prompt: a string or a list of messages), or plain text (`text`, for continued pre-training:
no chat template, loss on every token); one file may mix them. Field names may be mapped (data.columns) and a
sample drawn (data.max_rows) before anything is tokenized: data_columns.py. Every row that is dropped,
truncated or skipped is counted in the data report; a malformed row stops the run with its file,
line and field unless `data.on_error=skip`. Reading files is `data_files.py`.

Only `role` and `content` of a message are trained on: other message keys (`name`, `tool_calls`,
`weight`, ...) are dropped and counted per key in the data report (`ignored_message_keys`), with a
warning. Text holding the tokenizer's special tokens (e.g. `<|im_end|>` in a message) is refused:
tokenized, it would become a real turn boundary (a prompt injection into the training data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import DataConfig, ObjectiveConfig
from .config_data import SourceConfig
from .data_columns import check_columns, is_text_row, map_columns, name_columns, sample_rows
from .data_files import BUILTIN_DATA, DataError, RawRow, json_type, read_rows, source_files
from .data_report import DataReport, report_line, warn_left_out
from .mixture import Mixture
from .schema import ConfigError

__all__ = [
    "BUILTIN_DATA",
    "DataError",
    "Example",
    "PreparedData",
    "RawRow",
    "prepare",
    "read_rows",
    "report_line",
    "source_files",
    "tokenize_chat",
]

log = logging.getLogger("finetrack")
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized row. labels == -100 where the token carries no loss.

    Rows of the regression and contrastive objectives (objective_data.py) also say where the model's hidden state is
    read (`pools`: each a list of token positions whose states are averaged) and, for regression, the target of each."""

    input_ids: list[int]
    labels: list[int]
    source: str
    line: int
    pools: list[list[int]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # regression: one target per pool
    pair: tuple[Example, Example] | None = None  # contrastive: this anchor's (positive, negative)
    channel: int = 0  # its source's index in data.sources (per-source loss); 0 with one source

    @property
    def num_trainable_tokens(self) -> int:
        # position 0 is never predicted (nothing precedes it)
        return sum(1 for x in self.labels[1:] if x != -100)

    def sequences(self) -> list[Example]:
        """The token sequences this row runs through the model: itself, and a triplet's positive and negative."""
        return [self, *self.pair] if self.pair else [self]


# ------------------------------------------------------------------------------------ validate
def to_messages(row: RawRow, ignored_keys: Counter | None = None, specials: re.Pattern | None = None) -> list[dict[str, str]]:
    """Validate one record and return it as chat messages; raises DataError naming file, line and field.
    Message keys other than role and content are dropped and counted in `ignored_keys` (for rows that pass);
    text matching `specials` (see special_token_pattern) is refused."""
    found: Counter = Counter()
    messages = _to_messages(row, found, specials)
    if ignored_keys is not None:
        ignored_keys.update(found)
    return messages


def _to_messages(row: RawRow, ignored: Counter, specials: re.Pattern | None) -> list[dict[str, str]]:
    where = f"{row.source}:{row.line}"
    rec = row.record
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a row must be an object with 'messages', 'prompt'/'completion' or 'text', got {json_type(rec)}")
    if "messages" in rec:
        return check_messages(json_cell(rec["messages"], where, "messages"), where, "messages", ignored, specials, need_assistant=True)
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if key not in rec:
                raise DataError(f"{where}: field '{key}' is missing (prompt/completion rows need both)")
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: field 'prompt' is empty")
            check_text(prompt, where, "prompt", specials)
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = check_messages(prompt, where, "prompt", ignored, specials, need_assistant=False)
        completion, field_name = rec["completion"], "completion"
        if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
            (answer,) = check_messages(completion, where, "completion", ignored, specials, need_assistant=True)
            completion, field_name = answer["content"], "completion[0].content"
        if not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{where}: field 'completion' must be non-empty text")
        check_text(completion, where, field_name, specials)
        return msgs + [{"role": "assistant", "content": completion}]
    found = ", ".join(map(str, rec)) or "nothing"
    raise DataError(f"{where}: no 'messages', no 'prompt'/'completion' and no 'text' field (found: {found})")


def json_cell(value: Any, where: str, name: str) -> Any:
    """A field that may be JSON text (CSV cells hold a list of messages as text): parsed, or the value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:  # bad syntax, nesting too deep, a number too long
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" if isinstance(e, RecursionError) else e
        raise DataError(f"{where}: field '{name}' is text that is not a JSON list of messages ({reason})") from None


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the tokenizer's special tokens (<|im_end|>, <s>, ...) as they would be found in text."""
    tokens = set(tokenizer.all_special_tokens)
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def check_text(text: str, where: str, name: str, specials: re.Pattern | None) -> None:
    """Text must be valid Unicode (a JSON escape such as \\ud800 decodes to a lone surrogate that no tokenizer or
    file takes), and must not hold special tokens: tokenized, `<|im_end|><|im_start|>system` inside a message
    would become real turn boundaries, and the row would train the model on a conversation the data never had."""
    if specials is not None and (hit := specials.search(text)):
        raise DataError(
            f"{where}: field '{name}' holds '{hit.group()}' at character {hit.start()}, a special token of this tokenizer: "
            "it would be read as a real control token (a turn boundary), not as text; remove or rewrite it in the data"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field '{name}' holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
            "not valid Unicode text; fix the \\u escape there (a character above U+FFFF is a pair, e.g. \\ud83d\\ude00)"
        ) from None


def check_messages(
    messages: Any, where: str, name: str, ignored: Counter, specials: re.Pattern | None, need_assistant: bool
) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} objects, got {json_type(messages)}")
    out = []
    for j, m in enumerate(messages):
        f = f"{name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}' must be an object with 'role' and 'content', got {json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: field '{f}.role' is {role!r}; expected one of {', '.join(ROLES)}")
        if isinstance(content, list):
            raise DataError(f"{where}: field '{f}.content' is a list (content parts); only text is read: give the content as one string")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{f}.content' must be text, got {json_type(content)}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: field '{f}.content' is an empty assistant answer")
        if role == "system" and j != 0:
            raise DataError(f"{where}: field '{f}.role' is 'system' but only the first message may be a system prompt")
        check_text(content, where, f"{f}.content", specials)
        # Parquet / datasets give every message every struct field, missing ones as None: only values count.
        ignored.update(str(k) for k, v in m.items() if k not in ("role", "content") and v is not None)
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
    from jinja2 import TemplateError

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:  # templates refuse some conversations (e.g. roles that do not alternate)
            raise DataError(f"{where}: the model's chat template refuses this conversation ({e})") from None

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


def tokenize_text(text: Any, tokenizer, where: str, specials: re.Pattern | None = None) -> tuple[list[int], list[int]]:
    """A plain text row (continued pre-training): no chat template, the tokenizer's own BOS if it adds one, then EOS;
    labels = ids (every token carries loss; the loss shifts them, batches.py). data.train_on has no say here."""
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be text, got {json_type(text)}")
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty")
    check_text(text, where, "text", specials)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{where}: plain text rows end with the tokenizer's EOS token, and this tokenizer has none; use one that has")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: dict  # the data_report.json content
    mixture: Mixture | None = None  # data.sources: the training rows are each source's, laid end to end

    def fingerprint(self) -> str:
        """Hash of the tokenized training rows in order (ids and loss masks): a resumed run checks it sees the same data."""
        h = hashlib.sha256()
        for row in self.train:
            for e in row.sequences():
                h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes() + b"|" + np.asarray(e.labels, dtype=np.int64).tobytes() + b"\n")
                if e.pools:  # where a head reads and what it should say (next-token rows hash as they always did)
                    h.update(json.dumps([e.pools, e.values]).encode() + b"\n")
        return h.hexdigest()[:16]

    def note_usage(self, rows_per_step: int, total_steps: int, seed: int, shuffle: bool) -> None:
        """Add to the report what the run's steps take from each source of a mixture (rows, realized share, epochs,
        tokens: mixture.Mixture.usage); nothing with one source."""
        if self.mixture is None:
            return
        lengths: list[list[int]] = [[] for _ in self.mixture.names]
        for e in self.train:
            lengths[e.channel].append(sum(len(s.input_ids) for s in e.sequences()))
        usage = self.mixture.usage(rows_per_step, total_steps, seed, lengths, shuffle)
        for summary, used in zip(self.report["sources"], usage):
            summary["over_the_run"] = {"steps": total_steps, **{k: v for k, v in used.items() if k not in ("name", "target_share")}}


def prepare(cfg: DataConfig, tokenizer, seed: int, objective: ObjectiveConfig | None = None) -> PreparedData:
    """Read, validate and tokenize the training (and held-out) rows for `objective` (next-token rows by default), of
    data.path or of every source of data.sources (each row then knows its source: Example.channel); count everything
    left out."""
    sources = per_source(cfg)
    for i, (_, _, source_cfg) in enumerate(sources):
        check_columns(source_cfg.columns, objective, f"data.sources.{i}.columns" if cfg.sources else "data.columns")
    needs_template = objective is not None and objective.kind in ("regression", "contrastive")  # chat rows say so when read
    if needs_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use a chat model or set tokenizer.chat_template")
    train_report, eval_report = DataReport(), DataReport()
    examples: list[Example] = []
    eval_examples: list[Example] = []
    summaries = []
    file_rows: list[Example] = []  # held-out rows read from eval_split files (eval_report counts them)
    for channel, (name, weight, source_cfg) in enumerate(sources):
        before = (train_report.rows_read, train_report.rows_not_sampled)
        train, held, from_file = _prepare_source(source_cfg, tokenizer, seed, objective, train_report, eval_report)
        for e in train + held:
            for sequence in e.sequences():
                sequence.channel = channel
        if cfg.sources and not train:
            raise DataError(f"data.sources.{channel} ({name}): no training rows left; first reasons: {train_report.first_reasons}")
        examples += train
        eval_examples += held
        file_rows += held if from_file else []
        summaries.append(
            {
                "name": name,
                "path": source_cfg.path,
                "weight": weight,
                "rows_read": train_report.rows_read - before[0],
                "rows_not_sampled": train_report.rows_not_sampled - before[1],
                "rows_kept": len(train),
                "tokens": sum(len(s.input_ids) for e in train for s in e.sequences()),
                "trainable_tokens": sum(e.num_trainable_tokens for e in train),
                "eval_rows": len(held),
                "eval_rows_from": "file" if from_file else "held out" if held else None,
            }
        )
    train_report.finish(examples)
    report: dict[str, Any] = {"train": train_report.to_dict()}
    if any(s["eval_rows_from"] == "file" for s in summaries):
        eval_report.finish(file_rows)
        report["eval"] = eval_report.to_dict()
    elif eval_examples:
        report["eval"] = {
            "rows_kept": len(eval_examples),
            "held_out_from_train": cfg.eval_split if not cfg.sources else [s.eval_split for _, _, s in sources],
            "tokens_total": sum(len(s.input_ids) for e in eval_examples for s in e.sequences()),
        }
    mixture = None
    if cfg.sources:
        mixture = Mixture(
            tuple(s["name"] for s in summaries), tuple(s["weight"] for s in summaries), tuple(s["rows_kept"] for s in summaries)
        )
        for summary, share in zip(summaries, mixture.shares):
            summary["target_share"] = round(share, 6)
        report["sources"] = summaries
    for name, r in report.items():
        if isinstance(r, dict):
            warn_left_out(name, r)
    if not examples:
        raise DataError(f"no training rows left: {report_line(report)}; first reasons: {train_report.first_reasons}")
    return PreparedData(examples, eval_examples, report, mixture)


def per_source(cfg: DataConfig) -> list[tuple[str, float, DataConfig]]:
    """(name, weight, the data settings it is read with) of every source: data.path alone is one source of weight 1."""
    return [(s.name or s.label(), s.weight, _source_settings(cfg, s)) for s in cfg.sources] or [("data", 1.0, cfg)]


def _source_settings(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The data section as one source reads it: its path, and its own split, columns, max_rows and eval_split where set."""
    own = {"split": source.split, "columns": source.columns, "max_rows": source.max_rows, "eval_split": source.eval_split}
    return cfg.model_copy(update={"path": source.path, "sources": [], **{k: v for k, v in own.items() if v is not None}})


def _prepare_source(
    cfg: DataConfig, tokenizer, seed: int, objective: ObjectiveConfig | None, train_report: DataReport, eval_report: DataReport
) -> tuple[list[Example], list[Example], bool]:
    """(training rows, held-out rows, whether those came from an eval_split file) of one source, counted in the reports."""
    target = objective.regression.target_field if objective is not None and objective.kind == "regression" else "target"
    rows: Any = read_rows(cfg.path, cfg.split, train_report.skipped_files)
    if cfg.max_rows is not None:  # drawn from every row read, before tokenizing and before the held-out fraction is cut
        sample = sample_rows(rows, cfg.max_rows, seed)
        train_report.count_sample(sample)
        rows = sample.rows
    examples = _tokenize_all(map_columns(rows, cfg.columns, target), cfg, tokenizer, train_report, objective)
    if isinstance(cfg.eval_split, float):
        # A fixed permutation by seed decides which rows are held out, independent of the epoch order.
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        num_eval = max(1, round(cfg.eval_split * len(examples)))
        held = set(order[:num_eval])
        train_report.held_out += num_eval
        return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held], False
    if isinstance(cfg.eval_split, str):
        eval_rows = map_columns(read_rows(cfg.eval_split, cfg.split, eval_report.skipped_files), cfg.columns, target)
        return examples, _tokenize_all(eval_rows, cfg, tokenizer, eval_report, objective), True
    return examples, [], False


def parsed_rows(rows: Iterator[RawRow], cfg: DataConfig, report: DataReport, parse: Callable[[RawRow, str], Any]) -> Iterator[tuple]:
    """(row, "file:line", parse(row, where)) of every row that parses, counted in `report` as read; a malformed row
    (DataError) stops with its message, or with data.on_error=skip is counted and skipped."""
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="tokenize", unit=" rows", leave=False, mininterval=1.0, disable=None):
        report.rows_read += 1
        report.rows_read_by_source[row.source] = report.rows_read_by_source.get(row.source, 0) + 1
        where = f"{row.source}:{row.line}"
        try:
            yield row, where, parse(row, where)
        except DataError as e:
            message = name_columns(str(e), row.columns) if row.columns else str(e)
            if cfg.on_error == "error":
                raise DataError(f"{message} (set data.on_error=skip to skip and count such rows)") from None
            report.dropped["malformed"] += 1
            report.note(message)


def _tokenize_all(
    rows: Iterator[RawRow], cfg: DataConfig, tokenizer, report: DataReport, objective: ObjectiveConfig | None
) -> list[Example]:
    if objective is not None and objective.kind in ("regression", "contrastive"):
        from .objective_data import tokenize_rows

        return tokenize_rows(rows, cfg, objective, tokenizer, report)

    specials = special_token_pattern(tokenizer)

    def parse(row: RawRow, where: str) -> tuple[list[int], list[int]]:
        if is_text_row(row.record):
            return tokenize_text(row.record["text"], tokenizer, where, specials)
        messages = to_messages(row, report.ignored_message_keys, specials)
        if not getattr(tokenizer, "chat_template", None):  # a ConfigError: not a row to skip, every chat row would fail
            raise ConfigError(
                f"{where}: a chat row, and the tokenizer has no chat template; use a chat model (its tokenizer has one), "
                'or give plain text rows ({"text": ...})'
            )
        return tokenize_chat(messages, tokenizer, cfg.train_on, where)

    out = []
    for row, where, (ids, labels) in parsed_rows(rows, cfg, report, parse):
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
