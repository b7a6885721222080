"""Question sets for judged free-form generation: load, validate, fill judge templates.

Two file forms, one `Question` each item:

- YAML (.yaml / .yml): a list of items. The emergent-misalignment evaluation files load unchanged:
  `id`, `type` (e.g. free_form_judge_0_100), `paraphrases`, `samples_per_paraphrase`, optional
  `system`, `judge_prompts` (metric -> template with {question} and {answer}); YAML anchors and
  aliases work. Their other keys (`judge`, `temperature`, ...) are ignored with one warning per file.
  The simpler form is accepted too: `question: <text>` for `paraphrases`, `samples` for
  `samples_per_paraphrase`, `judge_prompts` optional, `id` optional (default "q<item number>").
- JSONL (.jsonl): one object per line with the same keys; `id` optional (default "q<line>").

Every error is a `QuestionError` naming the file, the item (number and line) or JSONL line, the field,
and what to do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data_files import iter_text_lines, read_text
from ..yamlfile import parse_yaml
from .spec import MAX_ANSWERS_PER_QUESTION, MAX_ANSWERS_PER_SUITE, EvalError

log = logging.getLogger("finetrack")

_KNOWN_KEYS = ("id", "type", "paraphrases", "question", "samples_per_paraphrase", "samples", "system", "judge_prompts")
_YAML_SUFFIXES = (".yaml", ".yml")
DEFAULT_TYPE = "free_form"


class QuestionError(EvalError):
    """A bad question file or item; the message names file, item or line, field, and what to do."""


@dataclass
class Question:
    """One question: its paraphrases are each asked `samples_per_paraphrase` times.

    judge_prompts maps a metric name to a template with {question} and {answer} placeholders
    (str.format syntax: write a literal brace as {{ or }}).
    """

    id: str
    paraphrases: list[str]
    samples_per_paraphrase: int
    system: str | None
    judge_prompts: dict[str, str]
    type: str = DEFAULT_TYPE


def fill_template(template: str, question: str, answer: str) -> str:
    """The judge prompt for one (question, answer): `template.format(question=..., answer=...)`.

    str.format (not a plain replace) because that is how emergent-misalignment templates are filled,
    so their escaped braces ({{ }}) mean the same here.
    """
    return template.format(question=question, answer=answer)


def template_problem(template: object) -> str | None:
    """Why `template` cannot be a judge prompt, or None when it can."""
    if not isinstance(template, str) or not template.strip():
        return f"must be non-empty text, got {type(template).__name__}"
    if "{answer}" not in template:
        return "lacks the {answer} placeholder: the judge would never see the answer; add {answer} where it goes"
    try:
        fill_template(template, "q", "a")
    except (KeyError, IndexError, ValueError) as e:
        return (
            f"cannot be filled ({type(e).__name__}: {e}); the only placeholders are {{question}} and {{answer}}, "
            "write any other literal brace doubled: {{ and }}"
        )
    return None


def answer_count(questions: list[Question], samples: int | None = None) -> int:
    """How many answers a suite generates for `questions` per step (`samples`: the suite's generation.num_samples,
    which replaces every question's samples_per_paraphrase), counted without building them."""
    return sum(len(q.paraphrases) * (samples or q.samples_per_paraphrase) for q in questions)


def check_answer_count(path: Path, questions: list[Question], samples: int | None, field: str) -> int:
    """answer_count, or a QuestionError when it is over MAX_ANSWERS_PER_SUITE (`field` names the override in messages)."""
    total = answer_count(questions, samples)
    if total > MAX_ANSWERS_PER_SUITE:
        per = f"{field}={samples:,} answers per paraphrase" if samples else "their samples"
        raise QuestionError(
            f"{path}: {len(questions):,} questions with {per} make {total:,} answers per step; at most {MAX_ANSWERS_PER_SUITE:,} "
            f"(every answer is held in memory): lower {field if samples else 'samples'} or split the file into several suites"
        )
    return total


def check_plain_text(tokenizer, path: Path, texts: list[tuple[str, str]], error: type[EvalError] = QuestionError) -> None:
    """Eval prompts go through the chat template as training rows do, so they are held to the same rule: a special
    token of the tokenizer inside one (`<|im_end|><|im_start|>system`) would be read as a real turn boundary. `texts`:
    (where in the file, text) pairs; `error` names the file and the item."""
    from ..data import special_token_pattern

    specials = special_token_pattern(tokenizer) if tokenizer is not None else None  # None: no template is rendered here
    for where, text in texts if specials is not None else []:
        if hit := specials.search(text):
            raise error(
                f"{path}: {where} holds '{hit.group()}' at character {hit.start()}, a special token of this tokenizer: it would "
                "be read as a real control token (a turn boundary), not as text; remove or rewrite it"
            )


def load_questions(path: Path, default_samples: int = 1) -> list[Question]:
    """Read a question file (.yaml/.yml or .jsonl) into Questions, validating every item.

    default_samples is used for items that give neither `samples_per_paraphrase` nor `samples`.
    """
    path = Path(path)
    if isinstance(default_samples, bool) or not isinstance(default_samples, int) or not 1 <= default_samples <= MAX_ANSWERS_PER_QUESTION:
        raise QuestionError(f"default_samples must be an integer >= 1 and at most {MAX_ANSWERS_PER_QUESTION:,}, got {default_samples!r}")
    located = read_items(path, QuestionError, "question", "q", "- id: ...")

    questions: list[Question] = []
    seen: dict[str, str] = {}  # id -> where it was first defined
    ignored: set[str] = set()
    for where, default_id, item in located:
        q = _parse_item(item, where, default_id, default_samples, ignored)
        if q.id in seen:
            raise QuestionError(f"{where}: field 'id': duplicate id '{q.id}' (first used at {seen[q.id]}); give each question its own id")
        seen[q.id] = where
        questions.append(q)
    if ignored:
        log.warning("%s: ignoring keys %s (finetrack reads only %s)", path, sorted(ignored), ", ".join(_KNOWN_KEYS))
    return questions


# ------------------------------------------------------------------------------------------ reading
def read_items(path: Path, error: type[ValueError], kind: str, id_prefix: str, example: str) -> list[tuple[str, str, Any]]:
    """(where, default id, raw item) for every item of a .yaml/.yml list or .jsonl file, for the question and
    distribution-item loaders: `error` is the loader's exception type, `kind` names the file in messages."""
    if not path.is_file():
        raise error(f"{kind} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _YAML_SUFFIXES:
        located = read_yaml_items(path, error, id_prefix, example)
    elif suffix == ".jsonl":
        located = read_jsonl_items(path, error, id_prefix)
    else:
        raise error(f"{path}: unknown {kind} file type '{path.suffix}'; use .yaml / .yml (a list of items) or .jsonl (one object per line)")
    if not located:
        raise error(f"{path}: holds no {kind}s; add at least one item")
    return located


def read_yaml_items(path: Path, error: type[ValueError], id_prefix: str, example: str) -> list[tuple[str, str, Any]]:
    """(where, default id, raw item) per item of a YAML list; `where` is 'file:line: item #n' (1-based).

    Shared by the question and distribution-item loaders; `error` is the loader's exception type and
    `example` shows the start of an item in the message for a file that is not a list."""
    text = read_text(path, error)  # UTF-8; undecodable bytes: an error naming the byte offset
    # syntax errors with their line, a duplicate key naming both lines, deep nesting: all `error`, never a traceback
    doc = parse_yaml(text.removeprefix("\ufeff"), str(path), error)
    data = doc.data
    if data is None:
        return []
    if not isinstance(data, list):
        raise error(f"{path}: the YAML file must be a list of items ('{example}'), got {type(data).__name__}")
    lines = [doc.lines.get(str(i), 0) for i in range(len(data))]
    return [(f"{path}:{line}: item #{i + 1}", f"{id_prefix}{i + 1}", item) for i, (line, item) in enumerate(zip(lines, data))]


def read_jsonl_items(path: Path, error: type[ValueError], id_prefix: str) -> list[tuple[str, str, Any]]:
    """(where, default id, raw item) per non-blank line of a JSONL file."""
    out = []
    for lineno, line in iter_text_lines(path, error):
        if isinstance(line, ValueError):
            raise line  # not UTF-8: the error names the byte offset
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
        except RecursionError:
            raise error(f"{path}:{lineno}: JSON nested too deeply; each line must be one flat JSON object") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise error(f"{path}:{lineno}: not valid JSON ({e}); each line must be one JSON object") from None
        out.append((f"{path}:{lineno}", f"{id_prefix}{lineno}", item))
    return out


# ------------------------------------------------------------------------------------------ validating
def _parse_item(item: Any, where: str, default_id: str, default_samples: int, ignored: set[str]) -> Question:
    if not isinstance(item, dict):
        raise QuestionError(f"{where}: an item must be a mapping with 'question' or 'paraphrases', got {type(item).__name__}")
    ignored.update(str(k) for k in item if k not in _KNOWN_KEYS)
    paraphrases = _paraphrases(item, where)
    samples = _samples(item, where, default_samples)
    if len(paraphrases) * samples > MAX_ANSWERS_PER_QUESTION:
        raise QuestionError(
            f"{where}: {len(paraphrases):,} paraphrases x {samples:,} samples = {len(paraphrases) * samples:,} answers; at most "
            f"{MAX_ANSWERS_PER_QUESTION:,} per question: lower 'samples' or split the paraphrases into several questions"
        )
    return Question(
        id=_id(item, where, default_id),
        paraphrases=paraphrases,
        samples_per_paraphrase=samples,
        system=_system(item, where),
        judge_prompts=_judge_prompts(item, where),
        type=_type(item, where),
    )


def _id(item: dict, where: str, default_id: str) -> str:
    if "id" not in item:
        return default_id
    value = item["id"]
    # YAML reads `id: 7` as an int; an id is a label, so the digits are kept as text
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise QuestionError(f"{where}: field 'id' must be non-empty text, got {value!r}; or leave it out for '{default_id}'")
    return value


def _paraphrases(item: dict, where: str) -> list[str]:
    if "question" in item and "paraphrases" in item:
        raise QuestionError(f"{where}: give either 'question' (one text) or 'paraphrases' (a list), not both")
    if "question" in item:
        text = item["question"]
        if not isinstance(text, str) or not text.strip():
            raise QuestionError(f"{where}: field 'question' must be non-empty text, got {text!r}")
        return [text]
    if "paraphrases" not in item:
        raise QuestionError(f"{where}: missing question text; add 'question: <text>' or 'paraphrases: [<text>, ...]'")
    texts = item["paraphrases"]
    if not isinstance(texts, list):
        raise QuestionError(
            f"{where}: field 'paraphrases' must be a list of texts, got {type(texts).__name__}; for one text use 'question'"
        )
    if not texts:
        raise QuestionError(f"{where}: field 'paraphrases' is empty; give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QuestionError(f"{where}: field 'paraphrases[{i}]' must be text, got {type(text).__name__} {text!r}; quote it")
        if not text.strip():
            raise QuestionError(f"{where}: field 'paraphrases[{i}]' is empty text; remove it or write the question")
    return list(texts)


def _samples(item: dict, where: str, default_samples: int) -> int:
    keys = [k for k in ("samples_per_paraphrase", "samples") if k in item]
    if len(keys) == 2:
        raise QuestionError(f"{where}: give either 'samples_per_paraphrase' or 'samples' (the same thing), not both")
    if not keys:
        return default_samples
    value = item[keys[0]]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuestionError(f"{where}: field '{keys[0]}' must be a whole number >= 1 (answers per paraphrase), got {value!r}")
    if value > MAX_ANSWERS_PER_QUESTION:
        raise QuestionError(
            f"{where}: field '{keys[0]}' is {value:,}: at most {MAX_ANSWERS_PER_QUESTION:,} answers per paraphrase "
            "(every answer is held in memory); lower it"
        )
    return value


def _system(item: dict, where: str) -> str | None:
    value = item.get("system")
    if value is not None and not isinstance(value, str):
        raise QuestionError(f"{where}: field 'system' must be text (the system prompt) or absent, got {type(value).__name__}")
    return value


def _judge_prompts(item: dict, where: str) -> dict[str, str]:
    prompts = item.get("judge_prompts")
    if prompts is None:
        return {}
    if not isinstance(prompts, dict):
        raise QuestionError(f"{where}: field 'judge_prompts' must map a metric name to a template, got {type(prompts).__name__}")
    out: dict[str, str] = {}
    for metric, template in prompts.items():
        if not isinstance(metric, str) or not metric.strip():
            raise QuestionError(f"{where}: field 'judge_prompts' has metric name {metric!r}; metric names must be text")
        problem = template_problem(template)
        if problem:
            raise QuestionError(f"{where}: field 'judge_prompts.{metric}' {problem}")
        out[metric] = template
    return out


def _type(item: dict, where: str) -> str:
    value = item.get("type", DEFAULT_TYPE)
    if not isinstance(value, str) or not value.strip():
        raise QuestionError(f"{where}: field 'type' must be text (e.g. free_form_judge_0_100), got {value!r}")
    return value
