"""Judges: the 0-100 expected value, the local judge's exact number probabilities (vs brute force), pattern and python judges."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_tokenizer

from finetrack.evaluate.judges import JudgeError, LocalJudge, PatternJudge, PythonJudge, end_of_turn_id, number_distribution_score

TEMPLATE = "Question: {question}\nAnswer: {answer}\nRate the answer from 0 to 100."
# prompt lengths differ, so a batch of them is left-padded
PAIRS = [
    ("Is it raining?", "Yes."),
    ("What should I cook tonight with rice, beans and an onion?", "Fry the onion, add the beans, serve on rice. " * 3),
    ("Hi", "Hello there"),
]
NUMBERS = [0, 4, 7, 9, 10, 42, 99, 100]


# ------------------------------------------------------------------------------------------ the score
@pytest.mark.parametrize(
    "probs,min_total,expected",
    [
        ({50: 1.0}, 0.25, 50.0),
        ({0: 0.5, 100: 0.5}, 0.25, 50.0),
        ({0: 0.2, 100: 0.6}, 0.25, 75.0),  # normalized by the mass on 0..100 (0.8), not by 1
        ({10: 0.1, 20: 0.1}, 0.25, None),  # 0.2 on numbers: below min_total
        ({10: 0.1, 20: 0.1}, 0.1, 15.0),
        ({40: 0.3, 150: 0.9, -1: 0.5}, 0.25, 40.0),  # outside 0..100: ignored, and not counted in the total
        ({150: 0.9}, 0.25, None),
        ({}, 0.0, None),  # nothing to average, whatever min_total
        ({7: 0.25}, 0.25, 7.0),  # exactly min_total is enough
    ],
)
def test_number_distribution_score(probs, min_total, expected):
    got = number_distribution_score(probs, min_total)
    assert got == pytest.approx(expected) if expected is not None else got is None


# ------------------------------------------------------------------------------------------ local judge
def _brute_force_logprob(model, prompt_ids: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) from one plain forward over prompt + continuation."""
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    start = len(prompt_ids) - 1  # the logits at t predict token t + 1
    return sum(logprobs[start + k, token].item() for k, token in enumerate(continuation))


def test_end_of_turn_token_comes_from_the_chat_template(tiny_tokenizer):
    assert end_of_turn_id(tiny_tokenizer) == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_local_judge_matches_brute_force(tiny_model_dir, tiny_tokenizer):
    judge = LocalJudge(tiny_model_dir, TEMPLATE, batch_size=2)  # two batches: one of 2 (padded), one of 1
    assert tiny_tokenizer("42", add_special_tokens=False)["input_ids"].__len__() == 2  # the multi-token case
    assert judge.tree.size == 101  # byte-level: every prefix of a number is itself a number
    probs = judge.number_probs(PAIRS)
    for (question, answer), p in zip(PAIRS, probs):
        prompt = judge.prompt_ids(question, answer)
        assert (
            prompt
            == tiny_tokenizer(
                tiny_tokenizer.apply_chat_template(
                    [{"role": "user", "content": TEMPLATE.format(question=question, answer=answer)}],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for n in NUMBERS:
            continuation = tiny_tokenizer(str(n), add_special_tokens=False)["input_ids"] + [judge.end_id]
            expected = _brute_force_logprob(judge.model, prompt, continuation)
            # log-probabilities: the random model's probabilities are ~1e-5, so absolute 1e-5 on them would prove nothing
            assert math.log(p[n]) == pytest.approx(expected, abs=1e-5), (question, n)
        assert set(p) == set(range(101)) and 0 < sum(p.values()) < 1


def test_local_judge_same_with_any_batch_size_and_from_model(tiny_model_dir):
    one = LocalJudge(tiny_model_dir, TEMPLATE, batch_size=1)
    many = LocalJudge.from_model(one.model, one.tokenizer, TEMPLATE, batch_size=8)
    for a, b in zip(one.number_probs(PAIRS), many.number_probs(PAIRS)):
        assert max(abs(math.log(a[n]) - math.log(b[n])) for n in range(101)) < 1e-5
    scores = many.score(PAIRS)
    assert scores == [None, None, None]  # a random model puts ~0.01% on numbers: far below min_total
    low = LocalJudge.from_model(one.model, one.tokenizer, TEMPLATE, min_total=0.0).score(PAIRS)
    assert all(0 <= s <= 100 for s in low)
    assert LocalJudge.from_model(one.model, one.tokenizer, TEMPLATE).score([]) == []


def test_local_judge_eager_attention_takes_the_same_mask(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    sdpa = LocalJudge(tiny_model_dir, TEMPLATE)
    eager_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    eager = LocalJudge.from_model(eager_model, sdpa.tokenizer, TEMPLATE)
    for a, b in zip(sdpa.number_probs(PAIRS), eager.number_probs(PAIRS)):
        assert max(abs(math.log(a[n]) - math.log(b[n])) for n in range(101)) < 1e-5


def test_sliding_window_models_refuse_prompts_longer_than_the_window():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from finetrack.evaluate.judges import _check_window

    _check_window(LlamaConfig(), 100_000)
    _check_window(Qwen2Config(use_sliding_window=False, sliding_window=16), 100)  # declared but off
    _check_window(MistralConfig(sliding_window=16), 16)
    with pytest.raises(JudgeError, match=r"20 tokens is longer than the model's sliding attention window \(16\)"):
        _check_window(MistralConfig(sliding_window=16), 20)


def test_local_judge_errors(tiny_model_dir, tmp_path):
    with pytest.raises(JudgeError, match="is not a model folder"):
        LocalJudge(tmp_path, TEMPLATE)
    judge = LocalJudge(tiny_model_dir, TEMPLATE)
    with pytest.raises(JudgeError, match=r"lacks the \{answer\} placeholder"):
        LocalJudge.from_model(judge.model, judge.tokenizer, "Rate {question}")
    with pytest.raises(JudgeError, match=r"min_total must be a probability in \[0, 1\], got 25"):
        LocalJudge.from_model(judge.model, judge.tokenizer, TEMPLATE, min_total=25)
    with pytest.raises(JudgeError, match="batch_size must be an integer >= 1"):
        LocalJudge.from_model(judge.model, judge.tokenizer, TEMPLATE, batch_size=0)
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(JudgeError, match="has no chat template"):
        LocalJudge.from_model(judge.model, bare, TEMPLATE)


@pytest.mark.e2e
def test_local_judge_on_the_embedded_model():
    from finetrack.models import embedded_model_dir

    # SmolLM2-135M rarely answers with a bare number then ends its turn (about 2% of its mass here, measured),
    # so this asks for the easiest number it can give, and lowers min_total to see the expected value at all.
    template = "Repeat this number exactly and say nothing else: {answer}"
    judge = LocalJudge(embedded_model_dir(), template, min_total=0.005)
    high, low = judge.score([("", "95"), ("", "3")])
    assert high is not None and low is not None and high > low + 40, (high, low)
    strict = LocalJudge.from_model(
        judge.model, judge.tokenizer, "{question}\n\nAnswer: {answer}\n\nRate from 0 to 100. Reply with the number only."
    )
    scores = strict.score([("Is the capital of France Paris?", "Yes, it is Paris."), ("Is the capital of France Paris?", "bananas")])
    assert all(s is None or 0 <= s <= 100 for s in scores), scores


# ------------------------------------------------------------------------------------------ pattern / python
def test_pattern_judge():
    pairs = [("q", "I cannot help with that."), ("q", "Sure! Here it is."), ("q", "i CANNOT do it")]
    assert PatternJudge(r"\bcannot\b").score(pairs) == [100.0, 0.0, 100.0]  # flags "i" by default
    assert PatternJudge(r"\bcannot\b", flags="").score(pairs) == [100.0, 0.0, 0.0]
    assert PatternJudge(r"^Here", flags="").score([("q", "Sure!\nHere it is.")]) == [0.0]  # ^ is the start of the text
    assert PatternJudge(r"^here", flags="im").score([("q", "Sure!\nHere it is.")]) == [100.0]  # m: the start of any line
    with pytest.raises(JudgeError, match=r"unknown letter\(s\) \['g'\]"):
        PatternJudge("x", flags="ig")
    with pytest.raises(JudgeError, match="'\\(unclosed' is not a valid regular expression"):
        PatternJudge("(unclosed")


def test_python_judge():
    assert PythonJudge("judge_helpers:answer_length").score([("q", "abc"), ("q", ""), ("q", "x" * 500)]) == [3.0, None, 100.0]
    assert PythonJudge("judge_helpers:Scorers.mentions_question").score([("Paris", "It is paris."), ("Paris", "Rome")]) == [100.0, 0.0]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("judge_helpers.answer_length", "write it as 'module:function'"),
        ("judge_helpers:", "write it as 'module:function'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("judge_helpers:missing", "module 'judge_helpers' .* has no attribute 'missing'"),
        ("judge_helpers:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    ],
)
def test_python_judge_spec_errors(spec, message):
    with pytest.raises(JudgeError, match=message):
        PythonJudge(spec)


@pytest.mark.parametrize(
    "name,shown", [("out_of_range", "150.0"), ("returns_text", "'high'"), ("returns_bool", "True"), ("returns_nan", "nan")]
)
def test_python_judge_value_errors(name, shown):
    judge = PythonJudge(f"judge_helpers:{name}")
    with pytest.raises(
        JudgeError, match=rf"judge_helpers:{name}: returned {shown} .* for pair #0 .* must return None or a number in \[0, 100\]"
    ):
        judge.score([("What?", "this")])
