"""The distribution suite: metrics against scipy, option values, the item loader and its errors, option
probabilities against a brute-force forward per option, sampled answers, and run()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from finetrack.evaluate import distribution
from finetrack.evaluate.distribution import (
    DistributionError,
    Item,
    load_items,
    mean_value,
    model_distribution_probs,
    model_distribution_sample,
    option_logprobs,
    option_values,
    parse_answer,
    pearson,
    pearson_undefined_reason,
    wasserstein_1,
)
from finetrack.evaluate.spec import DistributionSuite, GenerationConfig

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed", range(8))
def test_wasserstein_and_means_match_scipy(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    values = rng.uniform(-3, 10, size=k)  # uneven gaps, not sorted
    p, q = rng.uniform(0, 5, size=k), rng.uniform(0, 1, size=k)  # unnormalized, like counts
    p[rng.integers(k)] = 0.0  # an option nobody picks
    expected = stats.wasserstein_distance(values, values, p, q)
    assert wasserstein_1(values.tolist(), p.tolist(), q.tolist()) == pytest.approx(expected, abs=1e-12)
    assert mean_value(values.tolist(), p.tolist()) == pytest.approx(np.average(values, weights=p), abs=1e-12)


def test_wasserstein_on_rescaled_options():
    values = option_values(["10", "0", "5", "1"])  # numeric options listed out of order
    assert values == [1.0, 0.0, 0.5, 0.1]
    p, q = [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]
    assert wasserstein_1(values, p, q) == pytest.approx(stats.wasserstein_distance(values, values, p, q), abs=1e-12)
    assert wasserstein_1(values, p, p) == 0.0
    # all mass on one end vs the other: the full width of [0, 1]
    assert wasserstein_1(option_values(list("12345")), [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]) == pytest.approx(1.0)


def test_wasserstein_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        wasserstein_1([0.0, 1.0], [0.5, 0.5], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(6))
def test_pearson_matches_scipy(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 12))
    x, y = rng.uniform(0, 1, size=n), rng.uniform(0, 1, size=n)
    y = y + seed * 0.3 * x  # from unrelated to strongly related
    assert pearson(x.tolist(), y.tolist()) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_pearson_none_cases():
    assert pearson([], []) is None and "0 scored item(s)" in pearson_undefined_reason([], [])
    assert pearson([0.3], [0.5]) is None and "1 scored item(s)" in pearson_undefined_reason([0.3], [0.5])
    assert pearson([0.5, 0.5, 0.5], [0.1, 0.4, 0.9]) is None
    assert "every model mean is 0.5" in pearson_undefined_reason([0.5, 0.5, 0.5], [0.1, 0.4, 0.9])
    assert pearson([0.1, 0.4, 0.9], [0.2, 0.2, 0.2]) is None
    assert "every target mean" in pearson_undefined_reason([0.1, 0.4, 0.9], [0.2, 0.2, 0.2])
    assert pearson([0.0, 1.0], [0.0, 1.0]) == pytest.approx(1.0) and pearson_undefined_reason([0.0, 1.0], [0.0, 1.0]) is None
    assert pearson([0.0, 1.0], [1.0, 0.0]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "options, values",
    [
        (list("1234567"), [i / 6 for i in range(7)]),
        (["0", "1", "5", "10"], [0.0, 0.1, 0.5, 1.0]),  # the numbers, not the positions
        (["-3", "2.5", "7"], [0.0, 0.55, 1.0]),
        (["5", "4", "3", "2", "1"], [1.0, 0.75, 0.5, 0.25, 0.0]),  # a reversed scale keeps each number's value
        (["low", "medium", "high"], [0.0, 0.5, 1.0]),  # not numbers: positions
        (["1", "2", "3", "don't know"], [0.0, 1 / 3, 2 / 3, 1.0]),  # one non-number: positions for all
        (["nan", "inf"], [0.0, 1.0]),  # not plain decimals: positions
        (["yes", "no"], [0.0, 1.0]),
    ],
)
def test_option_values(options, values):
    assert option_values(options) == pytest.approx(values, abs=1e-12)


def test_option_values_errors():
    with pytest.raises(ValueError, match="same number twice"):
        option_values(["1", "1.0", "2"])
    with pytest.raises(ValueError, match="at least 2 options"):
        option_values(["1"])


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("5", 4),
        ("  5\n", 4),
        ("5.", 4),
        ("5 - agree", 4),
        ("5/5", 4),
        ("5.0", 4),
        ("50", None),
        ("5x", None),
        ("I'd say 5", None),
        ("", None),
        ("five", None),
        ("10", 5),
        ("10!", 5),
        ("1", 0),
        ("1,", 0),
        ("100", None),
        ("Agree", 6),
        ("Agree, mostly", 6),
        ("Agreed", None),
        ("agree", None),  # case matters
    ],
)
def test_parse_answer(answer, expected):
    assert parse_answer(answer, ["1", "2", "3", "4", "5", "10", "Agree"]) == expected


def test_parse_answer_longest_match_wins():
    assert parse_answer("1.5 stars", ["1", "1.5", "2"]) == 1
    assert parse_answer("1. stars", ["1", "1.5", "2"]) == 0


# ------------------------------------------------------------------------------------------ loading
def test_yaml_items():
    items = load_items(DATA / "distribution_items.yaml")
    assert [it.id for it in items] == ["commute_cycling", "weekend_work", "item3"]  # default id: the item number
    cycling, weekend, weather = items
    assert cycling.options == ["1", "2", "3", "4", "5"]  # YAML integers read as their digits
    assert cycling.target == pytest.approx([0.12, 0.18, 0.25, 0.30, 0.15])  # counts normalized
    assert cycling.system == "Answer with a single number and nothing else." and weekend.system is None
    assert weekend.values == pytest.approx([i / 6 for i in range(7)])
    assert sum(weekend.target) == pytest.approx(1.0)
    assert weather.options == ["low", "medium", "high"] and weather.values == [0.0, 0.5, 1.0]
    assert weather.target == pytest.approx([0.15, 0.45, 0.40])
    assert weather.prompt.startswith("Do you trust weather forecasts")


def test_jsonl_items():
    items = load_items(DATA / "distribution_items.jsonl")
    assert [it.id for it in items] == ["tipping", "item3"]  # default id: the line number (line 2 is blank)
    assert items[0].target == pytest.approx([0.05, 0.05, 0.2, 0.4, 0.3]) and items[0].system is None
    assert items[1].system == "Reply with one number." and items[1].values == [0.0, 0.5, 1.0]


GOOD = {"prompt": "Rate 1-3.", "options": ["1", "2", "3"], "target": [1, 1, 1]}


def _yaml_items(*items: dict) -> str:
    return "# header\n" + "".join("- " + json.dumps(it) + "\n" for it in items)


@pytest.mark.parametrize(
    "item, fragments",
    [
        ("just text", ["item #2", "must be a mapping"]),
        ({**GOOD, "sytem": "x"}, ["item #2", "unknown field(s) ['sytem']", "only id, prompt, system, options, target"]),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, ["item #2", "missing field 'prompt'"]),
        ({k: v for k, v in GOOD.items() if k != "options"}, ["missing field 'options'"]),
        ({k: v for k, v in GOOD.items() if k != "target"}, ["missing field 'target'"]),
        ({**GOOD, "id": ""}, ["field 'id' must be non-empty text", "leave it out for 'item2'"]),
        ({**GOOD, "id": [1]}, ["field 'id'"]),
        ({**GOOD, "prompt": "  "}, ["field 'prompt' must be non-empty text"]),
        ({**GOOD, "prompt": 3}, ["field 'prompt' must be non-empty text"]),
        ({**GOOD, "system": 5}, ["field 'system' must be non-empty text", "leave it out"]),
        ({**GOOD, "options": "1-3"}, ["field 'options' must be a list of at least 2", "e.g."]),
        ({**GOOD, "options": ["1"], "target": [1]}, ["field 'options' must be a list of at least 2"]),
        ({**GOOD, "options": ["1", 2.5, "3"]}, ["field 'options[1]' must be text or a whole number", "quote it"]),
        ({**GOOD, "options": ["1", " 2", "3"]}, ["field 'options[1]'", "without surrounding spaces"]),
        ({**GOOD, "options": ["1", "", "3"]}, ["field 'options[1]'", "non-empty"]),
        ({**GOOD, "options": ["1", "2", "1"]}, ["field 'options[2]'", "listed twice"]),
        ({**GOOD, "options": ["1", "1.0", "3"]}, ["field 'options'", "same number twice"]),
        ({**GOOD, "target": [1, 1]}, ["field 'target' must be a list of 3 numbers", "got 2 entries"]),
        ({**GOOD, "target": "uniform"}, ["field 'target' must be a list of 3 numbers"]),
        ({**GOOD, "target": [1, -1, 1]}, ["field 'target[1]' must be a non-negative number", "-1"]),
        ({**GOOD, "target": [1, True, 1]}, ["field 'target[1]'"]),
        ({**GOOD, "target": [1, "2", 1]}, ["field 'target[1]'"]),
        ({**GOOD, "target": [0, 0, 0.0]}, ["field 'target' is all zeros", "give the counts or probabilities"]),
    ],
)
def test_item_errors_name_file_item_and_field(tmp_path, item, fragments):
    yaml_file = tmp_path / "items.yaml"
    yaml_file.write_text(_yaml_items(GOOD, item))
    with pytest.raises(DistributionError) as e:
        load_items(yaml_file)
    assert str(e.value).startswith(f"{yaml_file}:3: ")  # the item's line (line 1 is a comment)
    for fragment in fragments:
        assert fragment in str(e.value)
    # the same item in JSONL: named by its line
    jsonl_file = tmp_path / "items.jsonl"
    jsonl_file.write_text(json.dumps(GOOD) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(DistributionError) as e:
        load_items(jsonl_file)
    assert str(e.value).startswith(f"{jsonl_file}:2: ")
    for fragment in fragments:
        if "item #" not in fragment:
            assert fragment in str(e.value)


def test_target_nan_in_jsonl(tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text('{"prompt": "p", "options": ["a", "b"], "target": [1, NaN]}\n')
    with pytest.raises(DistributionError, match=r"items.jsonl:1: field 'target\[1\]' must be a non-negative number"):
        load_items(f)


def test_duplicate_id(tmp_path):
    f = tmp_path / "items.yaml"
    f.write_text(_yaml_items({**GOOD, "id": "a"}, {**GOOD, "id": "b"}, {**GOOD, "id": "a"}))
    with pytest.raises(DistributionError) as e:
        load_items(f)
    assert str(e.value) == f"{f}:4: item #3: field 'id': duplicate id 'a' (first used at {f}:2: item #1); give each item its own id"


@pytest.mark.parametrize(
    "name, text, fragments",
    [
        ("items.yaml", "", ["holds no items", "add at least one"]),
        ("items.yaml", "prompt: p\noptions: [a, b]\n", ["must be a list of items", "got dict"]),
        ("items.yaml", "- prompt: [unclosed\n", ["items.yaml:", "not valid YAML", "fix the syntax"]),
        ("items.jsonl", json.dumps(GOOD) + "\n{bad json\n", ["items.jsonl:2: not valid JSON", "one JSON object"]),
        ("items.json", "[]", ["unknown item file type '.json'", "use .yaml / .yml", ".jsonl"]),
    ],
)
def test_file_errors(tmp_path, name, text, fragments):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DistributionError) as e:
        load_items(f)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DistributionError, match="item file not found: .*nope.yaml"):
        load_items(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ the tiny model
@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # the test machines share 2 cores
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _brute_force_logprob(model, tokenizer, item: Item, option: str) -> float:
    """One unpadded forward over prompt + option + <|im_end|>; the sum of the log-probabilities of those tokens."""
    text = tokenizer.apply_chat_template(distribution._messages(item), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(option, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(answer))


@pytest.mark.parametrize(
    "item",
    [
        Item("multi", "Rate from 1 to 10.", None, ["1", "5", "10", "agree"], [0.25] * 4),
        Item("sys", "How much? Pick one.", "Answer with one word.", ["low", "medium", "high"], [1 / 3] * 3),
    ],
)
def test_option_probs_equal_brute_force(tiny_model, tiny_tokenizer, item):
    assert len(tiny_tokenizer("10", add_special_tokens=False)["input_ids"]) == 2  # multi-token options are covered
    got = option_logprobs(tiny_model, tiny_tokenizer, item)
    expected = [_brute_force_logprob(tiny_model, tiny_tokenizer, item, o) for o in item.options]
    assert got == pytest.approx(expected, abs=1e-5)
    dist = model_distribution_probs(tiny_model, tiny_tokenizer, item)
    assert sum(dist) == pytest.approx(1.0, abs=1e-9)
    total = sum(math.exp(lp) for lp in expected)
    assert dist == pytest.approx([math.exp(lp) / total for lp in expected], rel=1e-4)


def test_option_probs_keep_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    try:
        option_logprobs(tiny_model, tiny_tokenizer, Item("a", "p", None, ["1", "2"], [0.5, 0.5]))
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_sample_on_tiny_model_is_deterministic(tiny_model, tiny_tokenizer):
    item = Item("s", "Pick a letter.", None, ["a", "b", "c"], [1 / 3] * 3)
    gen = GenerationConfig(max_new_tokens=3, seed=7, batch_size=4)
    answers = distribution._sample_answers(tiny_model, tiny_tokenizer, [item], gen, 10, lambda n: None)[0]
    assert len(answers) == 10
    dist, counts, unparsed = distribution._tally(item, answers)
    assert sum(counts) + unparsed == 10
    assert dist is None or sum(dist) == pytest.approx(1.0)
    again = model_distribution_sample(tiny_model, tiny_tokenizer, item, gen, 10)
    assert again == (dist, unparsed) == model_distribution_sample(tiny_model, tiny_tokenizer, item, gen, 10)
    other = distribution._sample_answers(tiny_model, tiny_tokenizer, [item], gen.model_copy(update={"seed": 8}), 10, lambda n: None)[0]
    assert other != answers  # the seed matters


# ------------------------------------------------------------------------------------------ run()
RESPONSE_KEYS = {"id", "prompt", "system", "options", "values", "target", "model", "mean_model", "mean_target", "w1", "abs_error"}


def _check_record(r: dict) -> None:
    assert sum(r["target"]) == pytest.approx(1.0) and sum(r["model"]) == pytest.approx(1.0)
    assert r["mean_target"] == pytest.approx(np.dot(r["values"], r["target"]))
    assert r["mean_model"] == pytest.approx(np.dot(r["values"], r["model"]))
    assert r["abs_error"] == pytest.approx(abs(r["mean_model"] - r["mean_target"]))
    assert r["w1"] == pytest.approx(stats.wasserstein_distance(r["values"], r["values"], r["model"], r["target"]), abs=1e-12)


def test_run_probs(tiny_model, tiny_tokenizer):
    suite = DistributionSuite(name="opinions", kind="distribution", items=str(DATA / "distribution_items.yaml"))
    progress: list[int] = []
    result = distribution.run(suite, tiny_model, tiny_tokenizer, progress.append)
    assert progress == [1, 1, 1]
    assert set(result["metrics"]) == {"wasserstein", "mae_mean", "pearson_means"}
    rs = result["responses"]
    assert [r["id"] for r in rs] == ["commute_cycling", "weekend_work", "item3"]
    for r in rs:
        assert set(r) == RESPONSE_KEYS | {"option_probs_raw", "option_mass"}
        _check_record(r)
        assert r["option_mass"] == pytest.approx(sum(r["option_probs_raw"]))
        assert r["model"] == pytest.approx([p / r["option_mass"] for p in r["option_probs_raw"]], rel=1e-6)
    assert result["metrics"]["wasserstein"] == pytest.approx(np.mean([r["w1"] for r in rs]))
    assert result["metrics"]["mae_mean"] == pytest.approx(np.mean([r["abs_error"] for r in rs]))
    means = ([r["mean_model"] for r in rs], [r["mean_target"] for r in rs])
    assert result["metrics"]["pearson_means"] == pytest.approx(stats.pearsonr(*means).statistic, abs=1e-9)
    # a random model puts almost no mass on the options: every item is counted as low mass
    assert result["counts"] == {"items": 3, "items_scored": 3, "pearson_undefined": 0, "low_mass_items": 3}
    json.dumps(result, allow_nan=False)  # the runner writes it as JSON


def test_run_sample_counts_every_answer(monkeypatch, tmp_path):
    f = tmp_path / "items.yaml"
    f.write_text(
        _yaml_items(
            {"id": "a", "prompt": "p1", "options": ["1", "2", "3"], "target": [1, 1, 2]},
            {"id": "b", "prompt": "p2", "options": ["no", "yes"], "target": [3, 1]},
            {"id": "c", "prompt": "p3", "options": ["1", "2"], "target": [1, 1]},
        )
    )
    canned = {"p1": ["1", "3.", "3 - high", "three", "2"], "p2": ["yes", "Yes", "no", "no!", "yes"], "p3": ["?", "", "x", "4", "22"]}
    seen = {}

    def fake_generate(model, tokenizer, conversations, gen, on_batch):
        seen["gen"] = gen
        answers = []
        for k in range(0, len(conversations), 4):  # batches of 4: items finish mid-batch
            chunk = conversations[k : k + 4]
            answers += [canned[c[-1]["content"]].pop(0) for c in chunk]
            on_batch(len(chunk))
        return answers

    monkeypatch.setattr(distribution, "generate", fake_generate)
    suite = DistributionSuite(name="d", kind="distribution", items=str(f), method="sample", num_samples=5)
    progress: list[int] = []
    result = distribution.run(suite, object(), None, progress.append)
    assert progress == [1, 1, 1] and seen["gen"] == suite.generation
    a, b, c = result["responses"]
    for r in result["responses"]:
        assert set(r) == RESPONSE_KEYS | {"answers", "option_counts", "unparsed"}
        assert sum(r["option_counts"]) + r["unparsed"] == 5
    assert (a["option_counts"], a["unparsed"], a["model"]) == ([1, 1, 2], 1, [0.25, 0.25, 0.5])
    assert (b["option_counts"], b["unparsed"], b["model"]) == ([2, 2], 1, [0.5, 0.5])
    assert (c["option_counts"], c["unparsed"], c["model"]) == ([0, 0], 5, None)  # nothing parsed: no distribution
    assert c["mean_model"] is None and c["w1"] is None and c["abs_error"] is None
    _check_record(a)
    _check_record(b)
    assert result["counts"] == {"items": 3, "items_scored": 2, "pearson_undefined": 0, "answers": 15, "unparsed": 7}
    assert result["metrics"]["wasserstein"] == pytest.approx((a["w1"] + b["w1"]) / 2)
    assert result["metrics"]["mae_mean"] == pytest.approx((a["abs_error"] + b["abs_error"]) / 2)
    assert a["w1"] == 0.0 and (a["mean_model"], b["mean_model"], b["mean_target"]) == (0.625, 0.5, 0.25)
    assert result["metrics"]["pearson_means"] == pytest.approx(1.0)  # two points, both means higher on item a
    json.dumps(result, allow_nan=False)


def test_run_sample_pearson_undefined_with_one_item(monkeypatch, tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"prompt": "p", "options": ["1", "2"], "target": [1, 3]}) + "\n")
    monkeypatch.setattr(
        distribution, "generate", lambda m, t, convs, gen, on_batch: (on_batch(len(convs)), ["1", "2"] * (len(convs) // 2))[1]
    )
    suite = DistributionSuite(name="d", kind="distribution", items=str(f), method="sample", num_samples=4)
    result = distribution.run(suite, object(), None, lambda n: None)
    assert result["metrics"]["pearson_means"] is None and result["counts"]["pearson_undefined"] == 1
    assert result["metrics"]["wasserstein"] == pytest.approx(0.25) and result["metrics"]["mae_mean"] == pytest.approx(0.25)


def test_run_sample_on_tiny_model(tiny_model, tiny_tokenizer):
    suite = DistributionSuite(
        name="d",
        kind="distribution",
        items=str(DATA / "distribution_items.jsonl"),
        method="sample",
        num_samples=3,
        generation=GenerationConfig(max_new_tokens=2, seed=1, batch_size=4),
    )
    progress: list[int] = []
    result = distribution.run(suite, tiny_model, tiny_tokenizer, progress.append)
    assert progress == [1, 1]
    assert result["counts"]["answers"] == 6
    assert result["counts"]["unparsed"] == sum(r["unparsed"] for r in result["responses"])
    assert all(len(r["answers"]) == 3 and sum(r["option_counts"]) + r["unparsed"] == 3 for r in result["responses"])
    assert distribution.run(suite, tiny_model, tiny_tokenizer, lambda n: None) == result


def test_generation_samples_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set the number of answers with num_samples, not generation.num_samples"):
        DistributionSuite(
            name="d",
            kind="distribution",
            items=str(DATA / "distribution_items.yaml"),
            method="sample",
            generation=GenerationConfig(num_samples=3),
        )
