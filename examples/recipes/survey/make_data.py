"""Synthetic survey answers for examples/recipes/survey (seed 001): predict how a population answers opinion questions.

Each topic has a population distribution over the answers 1..5 (1 strongly disagree .. 5 strongly agree); its
statements are phrased in several ways. A training row is one respondent's answer to one statement (the answer drawn
from the topic's distribution), so a model trained on them learns the distribution, not one answer; the held-out
items are statements worded differently (other templates), with the topic's distribution as the target, scored by the
`distribution` suite (Wasserstein distance, error of the means, correlation of the means across items).

  train.jsonl   {"messages": [system, user, assistant]}: one answer per row
  items.yaml    distribution-suite items: id, system, prompt, options 1..5, target (probabilities)

Stdlib only, seeded: the same arguments write the same bytes.
  python examples/recipes/survey/make_data.py [--out DIR] [--answers N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You answer survey questions as a typical respondent would. Reply with a single number from 1 to 5."
SCALE = "On a scale from 1 (strongly disagree) to 5 (strongly agree): "

# topic -> (population distribution over 1..5, the statements about it: the first three train, the last two held out).
# Each question names its survey's topic, as survey datasets carry their question's metadata.
TITLES = {
    "transit": "public transport",
    "taxes": "taxes",
    "remote": "working from home",
    "breakfast": "eating habits",
    "phones": "phones at school",
    "pets": "pets",
}
TOPICS: dict[str, tuple[list[float], list[str]]] = {
    "transit": (
        [0.04, 0.08, 0.16, 0.38, 0.34],
        [
            "cities should spend more on buses and trains.",
            "public transport deserves a bigger share of the city budget.",
            "more money for trains and trams would be well spent.",
            "my town would be better with more frequent buses.",
            "investing in rail lines is a good use of public money.",
        ],
    ),
    "taxes": (
        [0.36, 0.30, 0.18, 0.11, 0.05],
        [
            "income taxes should go up for everyone.",
            "people like me should pay more tax.",
            "a higher sales tax would be a good idea.",
            "raising household taxes next year is the right call.",
            "I would vote for a general tax increase.",
        ],
    ),
    "remote": (
        [0.22, 0.12, 0.10, 0.18, 0.38],
        [
            "people should be allowed to work from home every day.",
            "offices are no longer needed for most jobs.",
            "remote work is better than working in an office.",
            "employers should let staff choose to never come in.",
            "working from home should be the default.",
        ],
    ),
    "breakfast": (
        [0.08, 0.14, 0.46, 0.20, 0.12],
        [
            "breakfast is the most important meal of the day.",
            "skipping breakfast is bad for you.",
            "everyone should eat a proper breakfast.",
            "a morning meal matters more than lunch or dinner.",
            "children should never leave home without breakfast.",
        ],
    ),
    "phones": (
        [0.10, 0.14, 0.16, 0.30, 0.30],
        [
            "phones should be banned in school classrooms.",
            "pupils should hand in their phones at the start of the day.",
            "smartphones do more harm than good at school.",
            "schools should keep phones locked away during lessons.",
            "students learn better without phones in class.",
        ],
    ),
    "pets": (
        [0.02, 0.05, 0.13, 0.35, 0.45],
        [
            "dogs make people happier.",
            "owning a pet improves your life.",
            "having a cat or dog at home is good for your health.",
            "a pet is worth the time and money it takes.",
            "families with pets are better off.",
        ],
    ),
}
NUM_TRAIN_STATEMENTS = 3


def question(topic: str, statement: str) -> str:
    return f"Survey on {TITLES[topic]}. {SCALE}{statement}"


def draw(rng: random.Random, probs: list[float]) -> int:
    return rng.choices(range(1, 6), weights=probs)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--answers", type=int, default=24, help="respondents per training statement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for topic, (probs, statements) in TOPICS.items():
        for statement in statements[:NUM_TRAIN_STATEMENTS]:
            for _ in range(args.answers):
                user = question(topic, statement)
                rows.append(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": str(draw(rng, probs))},
                        ]
                    }
                )
    rng.shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# Held-out survey items (statements not in train.jsonl): the topic's population distribution over 1..5."]
    for topic, (probs, statements) in TOPICS.items():
        for k, statement in enumerate(statements[NUM_TRAIN_STATEMENTS:]):
            lines += [
                f"- id: {topic}_{k + 1}",
                f"  system: {json.dumps(SYSTEM)}",
                f"  prompt: {json.dumps(question(topic, statement))}",
                "  options: [1, 2, 3, 4, 5]",
                f"  target: {json.dumps(probs)}",
            ]
    (args.out / "items.yaml").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} training answers, {sum(len(s) - NUM_TRAIN_STATEMENTS for _, s in TOPICS.values())} held-out items -> {args.out}")


if __name__ == "__main__":
    main()
