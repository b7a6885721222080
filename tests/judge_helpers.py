"""Scoring functions that tests/test_judges.py loads through PythonJudge("judge_helpers:<name>"), and custom
eval suites that tests/test_eval.py loads through a `kind: python` suite ("judge_helpers:<name>")."""

from __future__ import annotations

NOT_A_FUNCTION = 42


def answer_length(question: str, answer: str) -> float | None:
    """Length of the answer in characters, capped at 100; None for an empty answer."""
    if not answer:
        return None
    return min(100, len(answer))


def out_of_range(question: str, answer: str) -> float:
    return 150.0


def returns_text(question: str, answer: str) -> str:
    return "high"


def returns_bool(question: str, answer: str) -> bool:
    return True


def returns_nan(question: str, answer: str) -> float:
    return float("nan")


class Scorers:
    @staticmethod
    def mentions_question(question: str, answer: str) -> float:
        return 100.0 if question.lower() in answer.lower() else 0.0


# ------------------------------------------------------------------ custom eval suites: function(model, tokenizer, options)
def logit_probe(model, tokenizer, options: dict) -> dict:
    """Mean next-token logit on a fixed prompt (differs between checkpoints), and an option passed through."""
    import torch

    enc = tokenizer(options["prompt"], return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(**enc).logits  # (1, T, V)
    return {"mean_logit": float(logits.float().mean()), "scale": options["scale"]}


def autocast_probe(model, tokenizer, options: dict) -> dict:
    """1.0 when the suite runs under bf16 autocast on the CPU (model.mixed_precision=bf16), else 0.0."""
    import torch

    return {"autocast": float(torch.is_autocast_enabled("cpu"))}


def returns_a_list(model, tokenizer, options: dict) -> list:
    return [1.0, 2.0]
