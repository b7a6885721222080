"""Issue 15, one-source data: column mapping (data.columns), plain text rows, and a sample (data.max_rows)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import chat_rows, regression_rows, tiny_run, triplet_rows, write_chat_jsonl

from finetrack.config import DataConfig, ObjectiveConfig, load_config
from finetrack.data import DataError, PreparedData, prepare, report_line
from finetrack.schema import ConfigError

PC_ROWS = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(6)]


def _rows(data: PreparedData) -> list[tuple]:
    return [(e.input_ids, e.labels, e.line) for e in data.train]


def _write_csv(path, rows: list[dict]):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _rename(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in r.items()} for r in rows]


# ------------------------------------------------------------------------------------------ columns
def test_mapped_csv_and_parquet_give_the_same_rows_as_the_unmapped_file(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    mapped = _rename(PC_ROWS, {"prompt": "question", "completion": "answer"})
    mapped = [{**r, "prompt": "a column named like ours is not read"} for r in mapped]
    columns = {"prompt": "question", "completion": "answer"}
    want = _rows(prepare(DataConfig(path=str(_write_csv(tmp_path / "plain.csv", PC_ROWS))), tiny_tokenizer, 0))
    got_csv = prepare(DataConfig(path=str(_write_csv(tmp_path / "m.csv", mapped)), columns=columns), tiny_tokenizer, 0)
    pq.write_table(pa.Table.from_pylist(mapped), tmp_path / "m.parquet")
    got_pq = prepare(DataConfig(path=str(tmp_path / "m.parquet"), columns=columns), tiny_tokenizer, 0)
    assert _rows(got_csv) == want
    assert [r[:2] for r in _rows(got_pq)] == [r[:2] for r in want]  # Parquet numbers items from 1, CSV lines from 2
    conv = [{"conversation": r["messages"]} for r in chat_rows(4)]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "chat.parquet")
    write_chat_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    got = prepare(DataConfig(path=str(tmp_path / "chat.parquet"), columns={"messages": "conversation"}), tiny_tokenizer, 0)
    assert _rows(got) == _rows(prepare(DataConfig(path=str(tmp_path / "chat.jsonl")), tiny_tokenizer, 0))


def test_mapping_applies_to_json_datasets_and_the_eval_split_file(tmp_path, tiny_tokenizer):
    import datasets

    mapped = _rename(PC_ROWS, {"prompt": "q", "completion": "a"})
    (tmp_path / "m.json").write_text(json.dumps(mapped))
    datasets.Dataset.from_list(mapped).save_to_disk(str(tmp_path / "hfds"))
    held = write_chat_jsonl(tmp_path / "held.jsonl", mapped[:2])
    cols = {"prompt": "q", "completion": "a"}
    want = _rows(prepare(DataConfig(path=str(write_chat_jsonl(tmp_path / "p.jsonl", PC_ROWS))), tiny_tokenizer, 0))
    for name in ("m.json", "hfds"):
        got = prepare(DataConfig(path=str(tmp_path / name), columns=cols, eval_split=str(held)), tiny_tokenizer, 0)
        assert _rows(got) == want, name
        assert [e.input_ids for e in got.eval] == [r[0] for r in want[:2]]


def test_eval_suite_file_is_read_with_the_columns_and_whole(tmp_path, tiny_tokenizer):
    from finetrack.evaluate.loss import load_rows

    suite_file = write_chat_jsonl(tmp_path / "suite.jsonl", _rename(PC_ROWS, {"prompt": "q", "completion": "a"}))
    suites = [{"name": "held", "kind": "loss", "data": str(suite_file)}]
    cfg = load_config(
        None, ["data.columns={prompt: q, completion: a}", "data.max_rows=2", f"data.path={suite_file}", f"eval.suites={json.dumps(suites)}"]
    )
    assert len(load_rows(cfg.eval.suites[0], cfg, tiny_tokenizer)) == len(PC_ROWS)  # max_rows samples training rows only


def test_mapped_objective_fields_prepare_the_same_rows(tmp_path, tiny_tokenizer):
    reg = regression_rows(8)
    names = {"target": "score", "prompt": "question", "messages": "conversation", "completion": "answer"}
    plain = prepare(
        DataConfig(path=str(write_chat_jsonl(tmp_path / "r.jsonl", reg))), tiny_tokenizer, 0, ObjectiveConfig(kind="regression")
    )
    cfg = DataConfig(path=str(write_chat_jsonl(tmp_path / "rm.jsonl", _rename(reg, names))), columns=names)
    mapped = prepare(cfg, tiny_tokenizer, 0, ObjectiveConfig(kind="regression"))
    assert mapped.fingerprint() == plain.fingerprint()
    # the target is read from columns.target whatever objective.regression.target_field calls it
    other = ObjectiveConfig(kind="regression", regression={"target_field": "y"})
    assert prepare(cfg, tiny_tokenizer, 0, other).fingerprint() == plain.fingerprint()


def test_mapped_regression_and_triplets_train(tmp_path, tiny_model_dir):
    reg = write_chat_jsonl(tmp_path / "reg.jsonl", _rename(regression_rows(16), {"target": "score", "prompt": "question"}))
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        reg,
        "objective.kind=regression",
        "data.columns={target: score, prompt: question}",
        "train.max_steps=2",
        name="reg",
    )
    assert result.total_steps == 2 and len([m for m in metrics if "loss" in m]) == 2
    names = {"anchor": "query", "positive": "pos", "negative": "neg", "completion": "reply"}
    tri = write_chat_jsonl(tmp_path / "tri.jsonl", _rename(triplet_rows(16), names))
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        tri,
        "objective.kind=contrastive",
        "data.columns={anchor: query, positive: pos, negative: neg, completion: reply}",
        "train.max_steps=2",
        name="tri",
    )
    assert result.total_steps == 2
    report = json.loads((result.run_dir / "data_report.json").read_text())["train"]
    assert report["rows_kept"] == 16 and report["dropped"]["malformed"] == 0


# ------------------------------------------------------------------------------------------ text rows
def test_text_rows_train_on_every_token_and_end_with_eos(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"body": "a mapped text"}])
    data = prepare(DataConfig(path=str(f), on_error="skip"), tiny_tokenizer, 0)
    (ex,) = data.train
    assert ex.labels == ex.input_ids
    assert ex.input_ids == tiny_tokenizer("Once upon a time.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ex.num_trainable_tokens == len(ex.input_ids) - 1  # every token but the first, which nothing predicts
    assert "<|im_start|>" not in tiny_tokenizer.decode(ex.input_ids)  # no chat template
    mapped = prepare(DataConfig(path=str(f), columns={"text": "body"}, on_error="skip"), tiny_tokenizer, 0)
    assert tiny_tokenizer.decode(mapped.train[0].input_ids) == "a mapped text<|im_end|>"
    # train_on has no say over text rows
    assert _rows(prepare(DataConfig(path=str(f), on_error="skip", train_on="last_assistant"), tiny_tokenizer, 0)) == _rows(data)


def test_mixed_text_and_chat_rows_are_counted_alike(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "plain words here"}, *chat_rows(2), {"prompt": "q", "completion": "a", "text": "not read: a chat row"}]
    f = write_chat_jsonl(tmp_path / "mixed.jsonl", rows)
    data = prepare(DataConfig(path=str(f)), tiny_tokenizer, 0)
    r = data.report["train"]
    assert (r["rows_read"], r["rows_kept"]) == (4, 4)
    assert data.train[0].labels == data.train[0].input_ids
    assert data.train[1].labels != data.train[1].input_ids  # chat: loss on the answers only
    assert "not read" not in tiny_tokenizer.decode(data.train[3].input_ids)
    assert r["trainable_tokens"] == sum(e.num_trainable_tokens for e in data.train)
    # Parquet gives every row every column, missing ones as None
    table = [{"text": rows[0]["text"], "messages": None}, {"text": None, "messages": rows[1]["messages"]}]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "mixed.parquet")
    assert [r[:2] for r in _rows(prepare(DataConfig(path=str(tmp_path / "mixed.parquet")), tiny_tokenizer, 0))] == [
        r[:2] for r in _rows(data)[:2]
    ]


def test_text_rows_need_no_chat_template(tmp_path):
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    f = write_chat_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}, *chat_rows(1)])
    with pytest.raises(ConfigError, match=r"t\.jsonl:2: a chat row, and the tokenizer has no chat template"):
        prepare(DataConfig(path=str(f), on_error="skip"), tok, 0)
    text_only = write_chat_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}, {"text": "more"}])
    assert len(prepare(DataConfig(path=str(text_only)), tok, 0).train) == 2


def test_text_rows_with_another_objective_are_one_error(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "t.jsonl", [{"text": "plain", "target": 0.5}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: a plain text row \(field 'text'\): objective.kind=regression reads no text rows"):
        prepare(DataConfig(path=str(f)), tiny_tokenizer, 0, ObjectiveConfig(kind="regression"))
    with pytest.raises(ConfigError, match="data.columns.text: objective.kind=contrastive reads no field 'text'"):
        prepare(DataConfig(path=str(f), columns={"text": "body"}), tiny_tokenizer, 0, ObjectiveConfig(kind="contrastive"))


# ------------------------------------------------------------------------------------------ max_rows
def _lines(data: PreparedData) -> list[int]:
    return sorted(e.line for e in data.train + data.eval)


def test_max_rows_sample_is_counted_and_drawn_by_seed(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "c.jsonl", chat_rows(40))
    a = prepare(DataConfig(path=str(f), max_rows=10), tiny_tokenizer, seed=1)
    r = a.report["train"]
    assert (r["rows_read"], r["rows_not_sampled"], r["rows_kept"]) == (40, 30, 10)
    assert r["rows_read_by_source"] == {str(f): 40} and r["rows_not_sampled_by_source"] == {str(f): 30}
    assert "40 rows read, 30 not in the data.max_rows sample, 10 to train on" in report_line(a.report)
    assert _lines(a) == sorted(e.line for e in a.train)  # kept in file order
    assert [e.line for e in a.train] == sorted(e.line for e in a.train)
    b = prepare(DataConfig(path=str(f), max_rows=10), tiny_tokenizer, seed=1)
    c = prepare(DataConfig(path=str(f), max_rows=10), tiny_tokenizer, seed=2)
    assert a.fingerprint() == b.fingerprint() and _lines(a) != _lines(c)
    everything = prepare(DataConfig(path=str(f), max_rows=100), tiny_tokenizer, seed=1)
    assert _lines(everything) == list(range(1, 41)) and everything.report["train"]["rows_not_sampled"] == 0


def test_max_rows_is_drawn_before_the_held_out_fraction_and_not_from_an_eval_file(tmp_path, tiny_tokenizer):
    f = write_chat_jsonl(tmp_path / "c.jsonl", chat_rows(40))
    held = write_chat_jsonl(tmp_path / "held.jsonl", chat_rows(12, seed=5))
    a = prepare(DataConfig(path=str(f), max_rows=20, eval_split=0.25), tiny_tokenizer, seed=3)
    assert (len(a.train), len(a.eval), a.report["train"]["held_out_for_eval"]) == (15, 5, 5)
    assert _lines(a) == _lines(prepare(DataConfig(path=str(f), max_rows=20), tiny_tokenizer, seed=3))  # the same 20 rows
    b = prepare(DataConfig(path=str(f), max_rows=5, eval_split=str(held)), tiny_tokenizer, seed=3)
    assert (len(b.train), len(b.eval), b.report["eval"]["rows_not_sampled"]) == (5, 12, 0)


def test_max_rows_leaves_unsampled_rows_unread(tmp_path, tiny_tokenizer):
    """Rows not drawn are never validated: a malformed one outside the sample does not stop the run."""
    rows = [json.dumps(r) for r in chat_rows(30)] + ["{not json"] * 30
    f = tmp_path / "half_bad.jsonl"
    f.write_text("\n".join(rows) + "\n")

    def malformed(seed: int) -> int:
        return prepare(DataConfig(path=str(f), max_rows=2, on_error="skip"), tiny_tokenizer, seed).report["train"]["dropped"]["malformed"]

    seed = next(s for s in range(50) if malformed(s) == 0)  # a sample of good rows only: 1 in 4 seeds
    data = prepare(DataConfig(path=str(f), max_rows=2), tiny_tokenizer, seed)
    assert (data.report["train"]["rows_read"], data.report["train"]["rows_not_sampled"], len(data.train)) == (60, 58, 2)
    with pytest.raises(DataError, match="not valid JSON"):
        prepare(DataConfig(path=str(f), max_rows=2), tiny_tokenizer, next(s for s in range(50) if malformed(s)))


def test_text_and_chat_rows_train_and_sample_together(tmp_path, tiny_model_dir):
    rows = [{"text": f"document {i}: " + " ".join(["alpha beta"] * (i + 1))} for i in range(12)] + chat_rows(12)
    f = write_chat_jsonl(tmp_path / "mixed.jsonl", rows)
    result, metrics = tiny_run(tmp_path, tiny_model_dir, f, "data.max_rows=16", "data.eval_split=0.25", "train.max_steps=2")
    assert result.total_steps == 2 and all(m["loss"] > 0 for m in metrics if "loss" in m)
    report = json.loads((result.run_dir / "data_report.json").read_text())["train"]
    assert (report["rows_read"], report["rows_not_sampled"], report["rows_kept"], report["held_out_for_eval"]) == (24, 8, 12, 4)
