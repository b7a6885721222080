"""Rows of the regression and contrastive objectives: validate, render with the chat template, tokenize, and say
where the model's hidden state is read (`Example.pools`) and what a head should predict there (`Example.values`).

Row layouts (JSONL / JSON / CSV / Parquet, like next-token rows):
- regression, level=sequence: `{"prompt": text or messages, "completion"?: text, "target": 0.73}` or
  `{"messages": [...], "target": 0.73}` (the field name is objective.regression.target_field);
- regression, level=step: `{"prompt": .., "steps": ["step 1", ..], "labels": [0.9, 0.2, ..]}`: the steps become the
  answer, each followed by objective.regression.step_separator, whose last token carries the step's label;
- contrastive: `{"anchor": .., "positive": .., "negative": .., "completion"?: text}`, each side a prompt text or a
  list of messages; `completion` is the anchor's answer, trained with the next-token loss (lambda_task). A side's
  representation is read on its prompt tokens only, so an anchor with and without its answer reads the same.

Every dropped or truncated row is counted in the data report, like next-token rows. data.columns renames these
fields too (`target` names the row field read as objective.regression.target_field); plain text rows are refused.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

from .config import DataConfig, ObjectiveConfig
from .config_data import NUMBER_TEXT
from .data import Example, check_messages, check_text, json_cell, parsed_rows, special_token_pattern, tokenize_chat
from .data_columns import CHAT_FIELDS, is_text_row
from .data_files import DataError, RawRow, json_type


def tokenize_rows(rows: Iterator[RawRow], cfg: DataConfig, objective: ObjectiveConfig, tokenizer, report) -> list[Example]:
    """Examples of the objective's rows; a malformed row stops with file, line and field (or is counted and skipped
    with data.on_error=skip), a row over data.max_length follows data.on_overflow."""
    specials = special_token_pattern(tokenizer)
    build = _contrastive_row if objective.kind == "contrastive" else _regression_row

    def parse(row: RawRow, where: str) -> Example:
        if isinstance(row.record, DataError):
            raise row.record
        if not isinstance(row.record, dict):
            raise DataError(f"{where}: a row must be an object, got {json_type(row.record)}")
        if is_text_row(row.record, (*CHAT_FIELDS, "steps", "anchor", "positive", "negative")):
            raise DataError(
                f"{where}: a plain text row (field 'text'): objective.kind={objective.kind} reads no text rows (next-token "
                "objectives do: causal_lm); give this objective's fields (see the README, Objectives)"
            )
        return build(row.record, objective, tokenizer, cfg.train_on, where, specials)

    out = []
    for _, where, example in parsed_rows(rows, cfg, report, parse):
        example = _fit_length(example, cfg, where, report)
        if example is not None:
            out.append(example)
    return out


def _fit_length(ex: Example, cfg: DataConfig, where: str, report) -> Example | None:
    """data.on_overflow for every sequence of a row; a truncated sequence loses the read positions past its end (a row
    left with none is dropped and counted as too long)."""
    longest = max(len(s.input_ids) for s in ex.sequences())
    if longest <= cfg.max_length:
        return ex
    if cfg.on_overflow == "error":
        raise DataError(f"{where}: {longest} tokens > data.max_length={cfg.max_length} (set data.on_overflow=truncate or drop)")
    if cfg.on_overflow == "truncate":
        cut = [_truncate(s, cfg.max_length) for s in ex.sequences()]
        if all(s.pools for s in cut):
            report.truncated_rows += 1
            head, *rest = cut
            head.pair = (rest[0], rest[1]) if rest else None
            return head
    report.dropped["too_long"] += 1
    report.note(f"{where}: {longest} tokens > max_length {cfg.max_length}, dropped")
    return None


def _truncate(ex: Example, max_length: int) -> Example:
    pools, values = [], []
    for i, pool in enumerate(ex.pools):
        kept = [p for p in pool if p < max_length]
        if kept:
            pools.append(kept)
            values.extend(ex.values[i : i + 1])
    return Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source, ex.line, pools, values)


# ----------------------------------------------------------------------------------------- regression
def _regression_row(rec: dict, objective: ObjectiveConfig, tokenizer, train_on: str, where: str, specials) -> Example:
    r = objective.regression
    if r.level == "step":
        return _step_row(rec, r.step_separator, tokenizer, train_on, where, specials)
    if r.target_field not in rec:
        raise DataError(f"{where}: field '{r.target_field}' (the regression target) is missing (found: {', '.join(map(str, rec))})")
    target = _number(rec[r.target_field], where, r.target_field)
    if "messages" in rec:
        messages = check_messages(
            json_cell(rec["messages"], where, "messages"), where, "messages", Counter(), specials, need_assistant=False
        )
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages  # the answer, if any, is the last turn
    elif "prompt" in rec:
        prompt = _prompt(rec["prompt"], where, "prompt", specials)
        messages = prompt + _completion(rec, where, specials)
    else:
        raise DataError(f"{where}: no 'messages' and no 'prompt' field (found: {', '.join(map(str, rec))})")
    ids, labels, offsets, text, num_prompt = _encode(messages, prompt, tokenizer, train_on, where)
    pool = _sequence_pool(r.pool, r.marker, ids, labels, offsets, text, num_prompt, tokenizer, where)
    return Example(ids, labels, where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1]), [pool], [target])


def _sequence_pool(kind: str, marker: str | None, ids, labels, offsets, text: str, num_prompt: int, tokenizer, where: str) -> list[int]:
    if kind == "last":
        return [_last_content(ids, len(ids), tokenizer)]
    if kind == "mean":
        return list(range(len(ids)))
    if kind == "prompt_mean":
        return list(range(num_prompt))
    if kind == "answer_mean":
        answer = [j for j, x in enumerate(labels) if x != -100]
        if not answer:
            raise DataError(f"{where}: pool=answer_mean needs an answer (a 'completion' or an assistant message)")
        return answer
    assert marker is not None
    at = text.rfind(marker)
    if at < 0:
        raise DataError(f"{where}: the marker {marker!r} (objective.regression.marker) does not occur in the row")
    return [_token_at(offsets, at + len(marker) - 1, where)]


def _step_row(rec: dict, separator: str, tokenizer, train_on: str, where: str, specials) -> Example:
    for key in ("prompt", "steps", "labels"):
        if key not in rec:
            raise DataError(f"{where}: field '{key}' is missing (step-level rows have 'prompt', 'steps' and 'labels')")
    steps, labels = rec["steps"], rec["labels"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError(f"{where}: field 'steps' must be a non-empty list of non-empty texts, got {json_type(steps)}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        got = f"{len(labels)} labels" if isinstance(labels, list) else json_type(labels)
        raise DataError(f"{where}: field 'labels' must be a list of one number per step ({len(steps)} steps, got {got})")
    values = [_number(x, where, f"labels[{i}]") for i, x in enumerate(labels)]
    for i, s in enumerate(steps):
        check_text(s, where, f"steps[{i}]", specials)
        if separator in s:
            raise DataError(f"{where}: field 'steps[{i}]' holds the step separator {separator!r}: split the step or set step_separator")
    prompt = _prompt(rec["prompt"], where, "prompt", specials)
    answer = "".join(s + separator for s in steps)
    messages = prompt + [{"role": "assistant", "content": answer}]
    ids, token_labels, offsets, text, _ = _encode(messages, prompt, tokenizer, train_on, where)
    # each step in turn after the prompt; a template that trims the answer may drop the last separator: then the
    # step's own last token carries its label
    cursor, pools = len(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)), []
    for i, s in enumerate(steps):
        at = text.find(s, cursor)
        if at < 0:
            raise DataError(f"{where}: the chat template changes the text of 'steps[{i}]', so its end cannot be located")
        cursor = at + len(s) + (len(separator) if text.startswith(separator, at + len(s)) else 0)
        pools.append([_token_at(offsets, cursor - 1, where)])
    return Example(ids, token_labels, where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1]), pools, values)


# ---------------------------------------------------------------------------------------- contrastive
def _contrastive_row(rec: dict, objective: ObjectiveConfig, tokenizer, train_on: str, where: str, specials) -> Example:
    for key in ("anchor", "positive", "negative"):
        if key not in rec:
            raise DataError(f"{where}: field '{key}' is missing (contrastive rows have 'anchor', 'positive' and 'negative')")
    pool = objective.contrastive.pool
    sides = []
    for key in ("anchor", "positive", "negative"):
        prompt = _prompt(rec[key], where, key, specials)
        messages = prompt + (_completion(rec, where, specials) if key == "anchor" else [])
        ids, labels, _, _, num_prompt = _encode(messages, prompt, tokenizer, train_on if key == "anchor" else "assistant", where)
        read = [_last_content(ids, num_prompt, tokenizer)] if pool == "last" else list(range(num_prompt))
        sides.append(Example(ids, labels, where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1]), [read]))
    anchor, positive, negative = sides
    anchor.pair = (positive, negative)
    return anchor


# ------------------------------------------------------------------------------------------- helpers
def _prompt(value: Any, where: str, name: str, specials) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        check_text(value, where, name, specials)
        return [{"role": "user", "content": value}]
    messages = check_messages(json_cell(value, where, name), where, name, Counter(), specials, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: field '{name}' ends with an assistant message; a prompt ends with the user's turn")
    return messages


def _completion(rec: dict, where: str, specials) -> list[dict[str, str]]:
    if rec.get("completion") is None:
        return []
    completion = rec["completion"]
    if not isinstance(completion, str) or not completion.strip():
        raise DataError(f"{where}: field 'completion' must be non-empty text, got {json_type(completion)}")
    check_text(completion, where, "completion", specials)
    return [{"role": "assistant", "content": completion}]


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        if isinstance(value, str) and NUMBER_TEXT.fullmatch(value):
            return float(value)  # CSV cells are text
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return float(value)


def _encode(messages: list[dict], prompt: list[dict], tokenizer, train_on: str, where: str) -> tuple[list[int], list[int], list, str, int]:
    """(ids, labels, character offsets, text, number of prompt tokens) of a conversation rendered by the chat template."""
    ids, labels = tokenize_chat(messages, tokenizer, train_on, where)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(prompt) == len(messages):
        return ids, labels, offsets, text, len(ids)
    prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False), add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"{where}: the chat template renders the prompt differently once an answer follows, so the prompt cannot be read alone"
        )
    return ids, labels, offsets, text, len(prompt_ids)


def _last_content(ids: list[int], end: int, tokenizer) -> int:
    """The last token before `end` that is not whitespace (ChatML ends a turn with a newline after <|im_end|>)."""
    j = end - 1
    while j > 0 and not tokenizer.decode([ids[j]]).strip():
        j -= 1
    return j


def _token_at(offsets: list, char: int, where: str) -> int:
    """The token whose text covers character `char`."""
    for j, (s, e) in enumerate(offsets):
        if s <= char < e:
            return j
    raise DataError(f"{where}: no token covers character {char} of the rendered row")
