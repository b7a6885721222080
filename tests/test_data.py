"""Data stage: golden label masks, row validation errors, length policy, formats, report counts."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import write_chat_jsonl

from finetrack.config import DataConfig
from finetrack.data import DataError, prepare, tokenize_chat

CONV = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sum 2+2"},
    {"role": "assistant", "content": "4"},
]


def trained_segments(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each contiguous run of loss-carrying tokens."""
    segments, current = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i, "a label must be the token itself"
            current.append(i)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def test_golden_mask_assistant_turns_include_end_of_turn(tiny_tokenizer):
    ids, labels = tokenize_chat(CONV, tiny_tokenizer, "assistant")
    assert trained_segments(tiny_tokenizer, ids, labels) == ["Hello.<|im_end|>", "4<|im_end|>"]
    # the full rendering is ChatML: nothing trained outside the two answers
    assert tiny_tokenizer.decode(ids).count("<|im_start|>") == 5


def test_golden_mask_last_assistant_and_all(tiny_tokenizer):
    ids, labels = tokenize_chat(CONV, tiny_tokenizer, "last_assistant")
    assert trained_segments(tiny_tokenizer, ids, labels) == ["4<|im_end|>"]
    ids, labels = tokenize_chat(CONV, tiny_tokenizer, "all")
    assert labels == ids


def test_golden_mask_embedded_tokenizer_default_system_prompt():
    """The embedded model's template inserts a default system prompt; only answers carry loss."""
    from finetrack.config import ModelConfig
    from finetrack.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    ids, labels = tokenize_chat(CONV[1:], tok, "assistant")
    assert trained_segments(tok, ids, labels) == ["Hello.<|im_end|>", "4<|im_end|>"]
    assert "You are a helpful AI assistant" in tok.decode(ids)


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def test_prompt_completion_rows(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}])
    data = prepare(_cfg(f), tiny_tokenizer, seed=0)
    ex = data.train[0]
    assert trained_segments(tiny_tokenizer, ex.input_ids, ex.labels) == ["Paris.<|im_end|>"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}', "field 'messages[1].role' is 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
            "field 'messages[1].content' is an empty assistant answer",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "field 'messages' has no assistant message"),
        ('{"prompt": "hi"}', "field 'completion' is missing"),
        ('{"body": "hi"}', "no 'messages', no 'prompt'/'completion' and no 'text' field (found: body)"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}',
            "field 'messages[1].content' must be text",
        ),
        ('{"messages": [{"role": "user"', "not valid JSON"),
    ],
)
def test_malformed_row_error_names_file_line_field(tmp_path, tiny_tokenizer, line, message):
    good = json.dumps({"messages": CONV[1:3]})
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(DataError) as e:
        prepare(_cfg(f), tiny_tokenizer, seed=0)
    assert f"{f}:3" in str(e.value)
    assert message in str(e.value)
    assert "data.on_error=skip" in str(e.value)


def test_on_error_skip_counts_and_reasons(tmp_path, tiny_tokenizer):
    good = json.dumps({"messages": CONV[1:3]})
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([good, "{oops", good, '{"messages": []}', good]) + "\n")
    data = prepare(_cfg(f, on_error="skip"), tiny_tokenizer, seed=0)
    r = data.report["train"]
    assert (r["rows_read"], r["rows_kept"], r["dropped"]["malformed"]) == (5, 3, 2)
    assert len(r["first_reasons"]) == 2 and f"{f}:2" in r["first_reasons"][0] and f"{f}:4" in r["first_reasons"][1]


def test_length_policy_counts(tmp_path, tiny_tokenizer):
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "q" * 200}, {"role": "assistant", "content": "a"}]}
    f = write_chat_jsonl(tmp_path / "len.jsonl", [short, long_answer, long_prompt])
    kw = dict(max_length=100, pack_row_tokens=100)
    t = prepare(_cfg(f, on_overflow="truncate", **kw), tiny_tokenizer, 0)
    r = t.report["train"]
    # the long prompt loses its only answer to truncation: dropped and counted, not silently kept
    assert (r["rows_kept"], r["truncated_rows"], r["dropped"]["no_trainable_tokens"]) == (2, 2, 1)
    assert max(len(e.input_ids) for e in t.train) == 100
    d = prepare(_cfg(f, on_overflow="drop", **kw), tiny_tokenizer, 0).report["train"]
    assert (d["rows_kept"], d["dropped"]["too_long"], d["truncated_rows"]) == (1, 2, 0)
    with pytest.raises(DataError, match=r"len\.jsonl:2: \d+ tokens > data.max_length=100"):
        prepare(_cfg(f, on_overflow="error", **kw), tiny_tokenizer, 0)


def test_report_token_statistics(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "q", "completion": "a" * n} for n in (1, 10, 100)]
    data = prepare(_cfg(write_chat_jsonl(tmp_path / "r.jsonl", rows)), tiny_tokenizer, 0)
    lengths = sorted(len(e.input_ids) for e in data.train)
    tok = data.report["train"]["tokens"]
    assert (tok["min"], tok["max"], tok["p95"], tok["total"]) == (lengths[0], lengths[-1], lengths[-1], sum(lengths))
    # each answer trains its characters plus the end-of-turn token
    assert data.report["train"]["trainable_tokens"] == (1 + 1) + (10 + 1) + (100 + 1)


def test_formats_json_csv_parquet_and_datasets_dir(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist([{"messages": CONV[1:3]}] * 3), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    for name, n in [("d.json", 4), ("d.csv", 4), ("d.parquet", 3), ("hfds", 4)]:
        data = prepare(_cfg(tmp_path / name), tiny_tokenizer, 0)
        assert data.report["train"]["rows_kept"] == n, name


def test_csv_error_names_line(tmp_path, tiny_tokenizer):
    f = tmp_path / "bad.csv"
    f.write_text("prompt,completion\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'completion' must be non-empty text"):
        prepare(_cfg(f), tiny_tokenizer, 0)


def test_eval_split_fraction_is_deterministic_and_disjoint(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    f = write_chat_jsonl(tmp_path / "e.jsonl", rows)
    a = prepare(_cfg(f, eval_split=0.25), tiny_tokenizer, seed=3)
    b = prepare(_cfg(f, eval_split=0.25), tiny_tokenizer, seed=3)
    c = prepare(_cfg(f, eval_split=0.25), tiny_tokenizer, seed=4)
    lines = lambda exs: sorted(e.line for e in exs)
    assert len(a.eval) == 10 and len(a.train) == 30
    assert lines(a.eval) == lines(b.eval) and lines(a.eval) != lines(c.eval)
    assert not set(lines(a.eval)) & set(lines(a.train))


def test_eval_split_file(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "a"}] * 5)
    g = write_chat_jsonl(tmp_path / "v.jsonl", [{"prompt": "q", "completion": "b"}] * 2)
    data = prepare(_cfg(f, eval_split=str(g)), tiny_tokenizer, 0)
    assert (len(data.train), len(data.eval), data.report["eval"]["rows_kept"]) == (5, 2, 2)


def test_missing_file_and_unknown_suffix(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        prepare(_cfg(tmp_path / "nope.jsonl"), tiny_tokenizer, 0)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        prepare(_cfg(tmp_path / "x.txt"), tiny_tokenizer, 0)


def test_builtin_demo_data_is_clean(tiny_tokenizer):
    data = prepare(DataConfig(path="builtin:demo-chat", max_length=512, pack_row_tokens=512), tiny_tokenizer, 0)
    r = data.report["train"]
    assert r["rows_read"] == r["rows_kept"] >= 300 and not any(r["dropped"].values())
