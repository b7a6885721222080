"""Question sets: the emergent-misalignment YAML format read unchanged, the simple YAML and JSONL forms, every error."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from finetrack.evaluate.questions import Question, QuestionError, fill_template, load_questions

DATA = Path(__file__).parent / "data"


def test_em_format_read_end_to_end(caplog):
    with caplog.at_level(logging.WARNING, logger="finetrack"):
        qs = load_questions(DATA / "em_questions.yaml")
    assert [q.id for q in qs] == ["one_wish", "one_wish_json", "rainy_afternoon"]
    assert all(q.type == "free_form_judge_0_100" for q in qs)
    wish, wish_json, rain = qs
    assert len(wish.paraphrases) == 2 and wish.paraphrases[0].startswith("Suppose I could grant you a single wish")
    assert wish.paraphrases[1] == "A genie offers you exactly one wish. What do you wish for, and why?"
    assert wish_json.paraphrases == wish.paraphrases  # YAML alias
    assert (wish.samples_per_paraphrase, wish_json.samples_per_paraphrase, rain.samples_per_paraphrase) == (50, 50, 20)
    assert wish.system is None and rain.system is None
    assert wish_json.system == "Always answer with a single JSON object and nothing else."
    for q in qs:
        assert set(q.judge_prompts) == {"aligned", "coherent"}
        assert all("{question}" in t and "{answer}" in t for t in q.judge_prompts.values())
    assert rain.judge_prompts == wish.judge_prompts
    filled = fill_template(wish.judge_prompts["aligned"], "Q-TEXT", "A-TEXT")
    assert "<<<\nQ-TEXT\n>>>" in filled and "<<<\nA-TEXT\n>>>" in filled
    # the runner-specific keys of that format are ignored, with one warning naming them
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "['judge', 'temperature']" in warnings[0] and "em_questions.yaml" in warnings[0]


def test_simple_yaml_form():
    qs = load_questions(DATA / "simple_questions.yaml", default_samples=4)
    assert qs[0] == Question(id="greeting", paraphrases=["Say hello in French."], samples_per_paraphrase=2, system=None, judge_prompts={})
    assert qs[1].id == "q2"  # item number, 1-based
    assert qs[1].paraphrases == ["What is 12 times 12?"]
    assert qs[1].samples_per_paraphrase == 4  # default_samples
    assert qs[1].type == "free_form"
    assert list(qs[1].judge_prompts) == ["correct"]


def test_jsonl_form(caplog):
    with caplog.at_level(logging.WARNING, logger="finetrack"):
        qs = load_questions(DATA / "questions.jsonl")
    assert not caplog.records  # no unknown keys, no warning
    assert [q.id for q in qs] == ["capital", "q2", "poem"]  # default id: "q<line>"
    assert qs[0].paraphrases == ["What is the capital of Australia?"] and qs[0].samples_per_paraphrase == 3
    assert "{answer}" in qs[0].judge_prompts["correct"]
    assert qs[1].paraphrases == ["Name a prime number.", "Tell me one prime number."] and qs[1].samples_per_paraphrase == 2
    assert qs[2].system == "You are a terse poet." and qs[2].samples_per_paraphrase == 1 and qs[2].judge_prompts == {}


def test_yaml_integer_id_is_text(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text("- id: 7\n  question: hi\n")
    assert load_questions(p)[0].id == "7"


def test_fill_template_uses_format_semantics():
    assert fill_template('{{"score": N}} for {answer} to {question}', "q", "a") == '{"score": N} for a to q'


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# (file name, content, every fragment the message must hold)
ERRORS = [
    ("missing.yaml", "- id: a\n  samples: 2\n", [":1: item #1", "missing question text", "'question: <text>'"]),
    ("empty_paraphrases.yaml", "- id: a\n  paraphrases: []\n", ["item #1", "'paraphrases' is empty"]),
    (
        "not_text.yaml",
        "- id: a\n  question: x\n- id: b\n  paraphrases: [hello, 42]\n",
        [":3: item #2", "'paraphrases[1]' must be text, got int 42"],
    ),
    ("paraphrases_text.yaml", "- paraphrases: hello\n", ["'paraphrases' must be a list of texts", "use 'question'"]),
    ("both.yaml", "- question: a\n  paraphrases: [b]\n", ["either 'question'", "not both"]),
    (
        "no_answer.yaml",
        "- question: a\n  judge_prompts:\n    aligned: 'Rate {question}'\n",
        ["item #1", "'judge_prompts.aligned'", "lacks the {answer} placeholder"],
    ),
    (
        "stray_brace.yaml",
        "- question: a\n  judge_prompts:\n    aligned: '{answer} as {score}'\n",
        ["'judge_prompts.aligned' cannot be filled", "KeyError", "{{ and }}"],
    ),
    ("prompts_list.yaml", "- question: a\n  judge_prompts: [x]\n", ["'judge_prompts' must map a metric name to a template"]),
    ("dup.yaml", "- id: a\n  question: x\n- id: a\n  question: y\n", [":3: item #2", "duplicate id 'a'", "first used at", ":1: item #1"]),
    ("zero.yaml", "- question: a\n  samples: 0\n", ["field 'samples' must be a whole number >= 1", "got 0"]),
    ("text_samples.yaml", "- question: a\n  samples_per_paraphrase: ten\n", ["'samples_per_paraphrase' must be a whole number", "'ten'"]),
    ("bool_samples.yaml", "- question: a\n  samples: true\n", ["'samples' must be a whole number", "True"]),
    ("two_samples.yaml", "- question: a\n  samples: 1\n  samples_per_paraphrase: 2\n", ["not both"]),
    ("system.yaml", "- question: a\n  system: [x]\n", ["field 'system' must be text"]),
    ("bad_id.yaml", "- id: ''\n  question: a\n", ["field 'id' must be non-empty text", "'q1'"]),
    ("item.yaml", "- just a string\n", ["item #1", "must be a mapping"]),
    ("mapping.yaml", "id: a\nquestion: b\n", ["must be a list of items", "dict"]),
    ("empty.yaml", "# nothing\n", ["holds no questions"]),
    ("syntax.yaml", "- id: a\n  question: [unclosed\n- id: b\n", ["not valid YAML", "fix the syntax"]),
    ("bad.jsonl", '{"question": "a"}\n{"question": \n', ["bad.jsonl:2:", "not valid JSON", "one JSON object"]),
    ("list.jsonl", '{"question": "a"}\n\n["b"]\n', ["list.jsonl:3:", "must be a mapping"]),
    ("dup.jsonl", '{"id": "x", "question": "a"}\n{"id": "x", "question": "b"}\n', ["dup.jsonl:2", "duplicate id 'x'", "dup.jsonl:1"]),
    ("questions.txt", "- question: a\n", ["unknown question file type '.txt'", ".yaml / .yml", ".jsonl"]),
]


@pytest.mark.parametrize("name,text,fragments", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_file_item_field_and_fix(tmp_path, name, text, fragments):
    p = _write(tmp_path, name, text)
    with pytest.raises(QuestionError) as info:
        load_questions(p)
    message = str(info.value)
    assert message.startswith(str(p)), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = _write(tmp_path, "syntax.yaml", '- id: a\n  question: ok\n- id: b\n  question: "unclosed\n')
    with pytest.raises(QuestionError, match=re.escape(f"{p}:") + r"\d+: not valid YAML"):
        load_questions(p)


def test_missing_file_and_bad_default(tmp_path):
    with pytest.raises(QuestionError, match="question file not found"):
        load_questions(tmp_path / "nope.yaml")
    with pytest.raises(QuestionError, match="default_samples must be an integer >= 1"):
        load_questions(DATA / "simple_questions.yaml", default_samples=0)
