"""Scoring functions that tests/test_judges.py loads through PythonJudge("judge_helpers:<name>")."""

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
