"""Objectives on the tiny model: each loss against a hand computation (separate forwards, one sequence at a time),
where rows are read, and the data rows each objective takes (and refuses)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, build_tiny_tokenizer, regression_rows, step_rows, triplet_rows, write_chat_jsonl

from finetrack.batches import batch_builder
from finetrack.config import DataConfig, ObjectiveConfig
from finetrack.data import DataError, prepare
from finetrack.heads import Head, attach
from finetrack.objectives import Contrastive, Regression, Term, build, causal_lm, weighted_loss


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok).eval()


def _objective(**kw) -> ObjectiveConfig:
    return ObjectiveConfig.model_validate(kw)


def _rows(tmp_path, tok, rows: list[dict], objective: ObjectiveConfig, **data):
    path = write_chat_jsonl(tmp_path / "rows.jsonl", rows)
    return prepare(DataConfig(path=str(path), **data), tok, 0, objective).train


def _last_state(model, ids: list[int], position: int, layer: int = -1) -> torch.Tensor:
    """The hidden state at `position` of one sequence run alone (no padding, no packing)."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][0, position]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("loss", ["mse", "huber", "mae"])
def test_regression_loss_matches_a_hand_computation(tmp_path, tok, model, pack, loss):
    objective = _objective(kind="regression", regression={"loss": loss, "huber_delta": 0.05, "head": {"hidden_sizes": [8]}})
    rows = _rows(tmp_path, tok, regression_rows(6), objective)
    torch.manual_seed(0)
    scored = attach(model, objective, [])
    batch = batch_builder(tok.pad_token_id, pack, None, model)(rows)
    terms = Regression(objective.regression)(scored, batch)
    assert set(terms) == {"regression"} and terms["regression"].unit == "targets" and batch.units["targets"] == 6
    predicted = torch.stack([scored.head(_last_state(model, r.input_ids, r.pools[0][0])[None])[0] for r in rows])
    target = torch.tensor([r.values[0] for r in rows])
    by_hand = {
        "mse": ((predicted - target) ** 2).sum(),
        "mae": (predicted - target).abs().sum(),
        "huber": torch.where(
            (predicted - target).abs() < 0.05, 0.5 * (predicted - target) ** 2, 0.05 * ((predicted - target).abs() - 0.025)
        ).sum(),
    }[loss]
    torch.testing.assert_close(terms["regression"].total, by_hand, rtol=1e-4, atol=1e-5)


def test_normalizing_targets_that_overflow_is_a_data_error_and_constant_ones_a_warning(model, caplog):
    """Targets near 1e308 overflowed the standard deviation: the loss was NaN and the error blamed train.lr."""
    objective = _objective(kind="regression", regression={"normalize_targets": True})
    with pytest.raises(DataError, match=r"the regression targets \(target\) range from -1e\+308 to 1e\+308: .* rescale them"):
        attach(model, objective, [1e308, -1e308, 0.1])
    with caplog.at_level("WARNING", logger="finetrack"):
        scored = attach(model, objective, [0.5, 0.5, 0.5])
    assert "every training target (target) is 0.5" in caplog.text and float(scored.head.target_std) == pytest.approx(1e-6)


def test_regression_with_lm_weight_and_normalized_targets(tmp_path, tok, model):
    """lm_weight adds the next-token loss per answer token; normalize_targets trains on (y - mean) / std of the
    training targets, stored in the head."""
    objective = _objective(kind="regression", regression={"lm_weight": 0.5, "normalize_targets": True, "pool": "answer_mean"})
    rows = [r for r in _rows(tmp_path, tok, regression_rows(12), objective, on_error="skip")]
    values = [r.values[0] for r in rows]
    scored = attach(model, objective, values)
    assert float(scored.head.target_mean) == pytest.approx(sum(values) / len(values))
    batch = batch_builder(tok.pad_token_id, True, None, model)(rows)
    terms = Regression(objective.regression)(scored, batch)
    assert terms["lm"].weight == 0.5 and terms["lm"].unit == "tokens"
    torch.testing.assert_close(terms["lm"].total, causal_lm(model, batch)["lm"].total, rtol=1e-5, atol=1e-5)
    states = torch.stack([_states_mean(model, r.input_ids, r.pools[0]) for r in rows])
    normalized = (torch.tensor(values) - scored.head.target_mean) / scored.head.target_std
    torch.testing.assert_close(terms["regression"].total, ((scored.head(states) - normalized) ** 2).sum(), rtol=1e-4, atol=1e-5)
    loss = weighted_loss(terms, batch.units)
    expected = terms["regression"].total / len(rows) + 0.5 * terms["lm"].total / batch.num_target_tokens
    torch.testing.assert_close(loss, expected)


def _states_mean(model, ids, positions):
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, positions].mean(0)


def test_answer_mean_pool_needs_an_answer(tmp_path, tok):
    objective = _objective(kind="regression", regression={"pool": "answer_mean"})
    with pytest.raises(DataError, match="pool=answer_mean needs an answer"):
        _rows(tmp_path, tok, [{"prompt": "alpha", "target": 1.0}], objective)


def test_step_labels_sit_on_each_steps_separator(tmp_path, tok, model):
    """Step-level rows: one read per step at the separator's token, normalized per labelled position."""
    objective = _objective(kind="regression", regression={"level": "step", "step_separator": "\n"})
    rows = _rows(tmp_path, tok, step_rows(8), objective)
    raw = step_rows(8)
    for row, source in zip(rows, raw):
        assert row.values == pytest.approx(source["labels"])
        assert [tok.decode([row.input_ids[p[0]]]) for p in row.pools] == ["\n"] * len(source["steps"])
        # the text before each label position ends with that step
        for pool, step in zip(row.pools, source["steps"]):
            assert tok.decode(row.input_ids[: pool[0]]).endswith(step)
    batch = batch_builder(tok.pad_token_id, True, None, model)(rows)
    assert batch.units["targets"] == sum(len(r["labels"]) for r in raw) and batch.units["rows"] == 8


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_contrastive_weighted_loss_matches_a_hand_computation(tmp_path, tok, model, pool):
    objective = _objective(kind="contrastive", contrastive={"pool": pool, "tau": 0.5, "lambda_task": 0.3, "lambda_neg": 2.0})
    rows = _rows(tmp_path, tok, triplet_rows(4), objective)
    batch = batch_builder(tok.pad_token_id, True, None, model)(rows)
    assert batch.units["triplets"] == 4 and batch.units["rows"] == 4
    terms = Contrastive(objective.contrastive)(model, batch)

    def rep(ex):
        return _states_mean(model, ex.input_ids, ex.pools[0])

    a = torch.stack([rep(r) for r in rows])
    p = torch.stack([rep(r.pair[0]) for r in rows])
    n = torch.stack([rep(r.pair[1]) for r in rows])
    cos_ap, cos_an = F.cosine_similarity(a, p, dim=-1), F.cosine_similarity(a, n, dim=-1)
    torch.testing.assert_close(terms["pos"].total, (-cos_ap / 0.5).sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["neg"].total, (cos_an / 0.5).sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["stability"].total, cos_ap.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["separation"].total, (1 - cos_an).sum(), rtol=1e-4, atol=1e-5)
    # the task loss: next-token loss on the anchors' answers only (positives and negatives carry no target)
    anchors_alone = batch_builder(tok.pad_token_id, True, None, model)([_without_pair(r) for r in rows])
    torch.testing.assert_close(terms["task"].total, causal_lm(model, anchors_alone)["lm"].total, rtol=1e-4, atol=1e-4)
    assert terms["task"].weight == 0.3 and terms["neg"].weight == 2.0 and terms["stability"].weight == 0.0


def _without_pair(ex):
    from dataclasses import replace

    return replace(ex, pair=None, pools=[])


def test_contrastive_anchor_representation_ignores_its_answer(tmp_path, tok, model):
    """The anchor is read on its prompt tokens: an answer after it (the task target) does not change it."""
    objective = _objective(kind="contrastive")
    row = triplet_rows(2)[1]
    assert "completion" in row
    with_answer, without = _rows(tmp_path, tok, [row, {k: v for k, v in row.items() if k != "completion"}], objective)
    assert with_answer.pools == without.pools and len(with_answer.input_ids) > len(without.input_ids)


def test_infonce_matches_a_hand_computation(tmp_path, tok, model):
    objective = _objective(kind="contrastive", contrastive={"loss": "infonce", "tau": 0.2, "lambda_task": 0.0})
    rows = _rows(tmp_path, tok, triplet_rows(3), objective)
    terms = Contrastive(objective.contrastive)(model, batch_builder(tok.pad_token_id, False, None, model)(rows))
    assert "task" not in terms and "pos" not in terms
    a = torch.stack([_last_state(model, r.input_ids, r.pools[0][0]) for r in rows])
    others = torch.stack([_last_state(model, s.input_ids, s.pools[0][0]) for k in (0, 1) for s in (r.pair[k] for r in rows)])
    sims = torch.stack([F.cosine_similarity(a[i][None], others, dim=-1) for i in range(3)]) / 0.2
    by_hand = sum(-torch.log_softmax(sims[i], 0)[i] for i in range(3))
    torch.testing.assert_close(terms["infonce"].total, by_hand, rtol=1e-4, atol=1e-5)


def test_weighted_loss_normalizes_each_term_by_its_units():
    terms = {
        "a": Term(torch.tensor(6.0), "tokens"),
        "b": Term(torch.tensor(3.0), "triplets", 2.0),
        "m": Term(torch.tensor(100.0), "rows", 0.0),
    }
    assert float(weighted_loss(terms, {"tokens": 3, "triplets": 2, "rows": 1})) == pytest.approx(6 / 3 + 2 * 3 / 2)
    with pytest.raises(ValueError, match="no loss term"):
        weighted_loss({"m": terms["m"]}, {"rows": 1})


def test_head_round_trips_through_a_checkpoint_folder(tmp_path, tok, model):
    from finetrack.heads import HEAD_CONFIG, load_head, save_head

    objective = _objective(
        kind="regression", regression={"head": {"hidden_sizes": [16, 8], "activation": "tanh"}, "normalize_targets": True}
    )
    scored = attach(model, objective, [1.0, 2.0, 4.0])
    save_head(scored, tmp_path, objective)
    meta = json.loads((tmp_path / HEAD_CONFIG).read_text())
    assert meta["format"] == "finetrack-head/1" and meta["head"]["hidden_sizes"] == [16, 8]
    assert meta["target_mean"] == pytest.approx(7 / 3) and meta["hidden_size"] == 64
    fresh = Head(64, objective.regression.head)
    load_head(fresh, tmp_path)
    for k, v in scored.head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(Exception, match="does not fit the configured head"):
        load_head(Head(64, objective.model_copy(update={}).regression.head.model_copy(update={"hidden_sizes": [4]})), tmp_path)


def test_build_names_each_kind():
    assert build(_objective()) is causal_lm
    assert isinstance(build(_objective(kind="regression")), Regression)
    assert isinstance(build(_objective(kind="contrastive")), Contrastive)


# --------------------------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    ("regression", {}, {"prompt": "alpha"}, ["rows.jsonl:1", "field 'target'", "missing"]),
    ("regression", {}, {"prompt": "alpha", "target": True}, ["rows.jsonl:1", "field 'target' must be a finite number"]),
    ("regression", {}, {"prompt": "alpha", "target": "high"}, ["field 'target' must be a finite number", "'high'"]),
    ("regression", {}, {"prompt": "alpha", "target": float("nan")}, ["field 'target' must be a finite number"]),
    ("regression", {}, {"text": "alpha", "target": 1}, ["a plain text row (field 'text')", "causal_lm"]),
    ("regression", {"target_field": "score"}, {"prompt": "alpha", "target": 1}, ["field 'score'", "missing"]),
    ("regression", {"pool": "marker", "marker": "Answer:"}, {"prompt": "alpha", "target": 1}, ["marker 'Answer:'", "does not occur"]),
    (
        "regression",
        {"level": "step"},
        {"prompt": "a", "steps": ["x"], "labels": [0.1, 0.2]},
        ["one number per step (1 steps, got 2 labels)"],
    ),
    ("regression", {"level": "step"}, {"prompt": "a", "steps": ["x\ny"], "labels": [0.1]}, ["steps[0]", "holds the step separator"]),
    ("regression", {"level": "step"}, {"prompt": "a", "steps": [], "labels": []}, ["field 'steps' must be a non-empty list"]),
    ("regression", {"level": "step"}, {"prompt": "a", "labels": [1]}, ["field 'steps' is missing"]),
    ("contrastive", {}, {"anchor": "a", "positive": "b"}, ["field 'negative' is missing"]),
    ("contrastive", {}, {"anchor": "a", "positive": "", "negative": "c"}, ["field 'positive' is empty"]),
    (
        "contrastive",
        {},
        {"anchor": [{"role": "assistant", "content": "x"}], "positive": "b", "negative": "c"},
        ["'anchor' ends with an assistant"],
    ),
    ("contrastive", {}, {"anchor": "a", "positive": "b", "negative": "c", "completion": 3}, ["field 'completion' must be non-empty text"]),
    ("contrastive", {}, ["a", "b", "c"], ["a row must be an object, got an array"]),
]


@pytest.mark.parametrize("kind, section, row, expected", BAD_ROWS)
def test_malformed_objective_rows_name_file_line_and_field(tmp_path, tok, kind, section, row, expected):
    objective = _objective(kind=kind, **{kind: section})
    with pytest.raises(DataError) as e:
        _rows(tmp_path, tok, [row], objective)
    for text in expected:
        assert text in str(e.value)
    assert "data.on_error=skip" in str(e.value)


def test_skipped_and_truncated_objective_rows_are_counted(tmp_path, tok):
    objective = _objective(kind="regression", regression={"level": "step"})
    rows = step_rows(6) + [{"prompt": "a", "steps": ["x"], "labels": "bad"}]
    path = write_chat_jsonl(tmp_path / "rows.jsonl", rows)
    data = prepare(DataConfig(path=str(path), on_error="skip", max_length=40), tok, 0, objective)
    report = data.report["train"]
    assert report["dropped"]["malformed"] == 1 and report["rows_read"] == 7
    # a row cut at max_length keeps the labels before the cut; one with no label left is dropped as too long
    assert report["truncated_rows"] + report["dropped"]["too_long"] > 0
    assert report["rows_kept"] + report["dropped"]["too_long"] + 1 == 7
    for ex in data.train:
        assert len(ex.values) == len(ex.pools) and all(p[0] < 40 for p in ex.pools)
    assert math.isfinite(sum(v for ex in data.train for v in ex.values))
