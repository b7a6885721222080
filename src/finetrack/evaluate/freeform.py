"""The `judge` suite: free-form answers to a question set, scored by judges, aggregated per step.

Every answer is kept (eval/responses/step-NNNNNN.jsonl) with its scores. Per step: the mean of each
metric over scored answers, the number of unscored answers, and each named rate over all answers scored
on the rate's metrics and, when the rule has a filter (conditions after the first), also over those that
pass it (`_rate_filtered`) — the two conventions found in the literature.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..schema import ConfigError
from .generate import Answerer, generate
from .questions import check_answer_count, check_plain_text
from .spec import JudgeConfig, JudgeSuite, parse_rate

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def conversations(questions: list, samples: int | None) -> list[dict]:
    """One entry per answer to produce: question id, paraphrase index, sample index, the chat messages."""
    out = []
    for q in questions:
        for p_index, text in enumerate(q.paraphrases):
            for s in range(samples or q.samples_per_paraphrase):
                messages = ([{"role": "system", "content": q.system}] if q.system else []) + [{"role": "user", "content": text}]
                out.append({"question_id": q.id, "paraphrase": p_index, "sample": s, "question": text, "messages": messages})
    return out


def check_judges(suite: JudgeSuite, questions: list) -> None:
    """A local or openai judge scores the questions' judge_prompts: with none in the file it would score nothing."""
    prompt_judges = sorted({j.kind for j in suite.judges if j.kind in ("local", "openai")})
    if prompt_judges and not any(q.judge_prompts for q in questions):
        default = " (the default judge when judges is not set)" if "judges" not in suite.model_fields_set else ""
        raise ConfigError(
            f"eval suite '{suite.name}': judge kind={'/'.join(prompt_judges)}{default} scores each question's judge_prompts, but "
            f"{suite.questions} has none; add judge_prompts (metric: template with {{question}} and {{answer}}) or use pattern/python judges"
        )


def run(
    suite: JudgeSuite,
    model: nn.Module | Answerer,
    tokenizer,
    questions: list,
    judge_for: Callable[[JudgeConfig, str], object],
    on_answers: Callable[[int], None],
) -> dict:
    """Generate (with the model, or the Answerer of another engine: engine.py), judge, aggregate. judge_for(judge
    config, template) returns an object with .score(pairs)."""
    check_answer_count(Path(suite.questions), questions, suite.generation.num_samples, "generation.num_samples")
    check_plain_text(
        tokenizer, Path(suite.questions), [(f"question {q.id}", t) for q in questions for t in [*q.paraphrases, q.system or ""]]
    )
    items = conversations(questions, suite.generation.num_samples)
    answers = generate(model, tokenizer, [it["messages"] for it in items], suite.generation, on_answers)
    records = [{**{k: v for k, v in it.items() if k != "messages"}, "answer": a, "scores": {}} for it, a in zip(items, answers)]
    by_question: dict[str, list[dict]] = {}
    for r in records:
        by_question.setdefault(r["question_id"], []).append(r)
    for judge in suite.judges:
        if judge.kind in ("local", "openai"):  # one judge prompt per metric, per question (the question file carries them)
            for q in questions:
                rows = by_question.get(q.id, [])
                for metric, template in q.judge_prompts.items():
                    scores = judge_for(judge, template).score([(r["question"], r["answer"]) for r in rows])
                    for r, s in zip(rows, scores):
                        r["scores"][metric] = s
        else:
            scores = judge_for(judge, "").score([(r["question"], r["answer"]) for r in records])
            for r, s in zip(records, scores):
                r["scores"][judge.metric] = s
    metrics, counts = aggregate(records, suite.rates)
    # the rules travel with the numbers: `finetrack gate` reads which way a rate is better from them
    return {"metrics": metrics, "counts": counts, "rates": dict(suite.rates), "responses": records}


def aggregate(records: list[dict], rates: dict[str, str]) -> tuple[dict[str, float | None], dict[str, int]]:
    """Means, unscored counts and both conventions of every rate whose metrics were scored."""
    names = sorted({m for r in records for m in r["scores"]})
    metrics: dict[str, float | None] = {}
    counts: dict[str, int] = {"answers": len(records)}
    for m in names:
        vals = [r["scores"][m] for r in records if r["scores"].get(m) is not None]
        metrics[m] = sum(vals) / len(vals) if vals else None
        counts[f"{m}_unscored"] = len(records) - len(vals)
    for rate, expr in rates.items():
        conditions = parse_rate(expr)
        if any(m not in names for m, _, _ in conditions):
            continue  # this question set does not score those metrics
        scored = [r for r in records if all(r["scores"].get(m) is not None for m, _, _ in conditions)]
        passes = [[_OPS[op](r["scores"][m], v) for m, op, v in conditions] for r in scored]
        hits = sum(all(p) for p in passes)
        filtered = sum(all(p[1:]) for p in passes)
        metrics[f"{rate}_rate"] = hits / len(scored) if scored else None
        counts[f"{rate}_scored"] = len(scored)
        counts[f"{rate}_hits"] = hits
        if len(conditions) > 1:  # a rule with no filter has no second convention: its twin would be the same number
            metrics[f"{rate}_rate_filtered"] = hits / filtered if filtered else None
            counts[f"{rate}_filter_passed"] = filtered
    return metrics, counts
