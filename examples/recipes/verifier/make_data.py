"""Synthetic verifier data for examples/recipes/verifier: worked solutions to `a*x + b = c`, some steps sound and some
not, with a score a small model can learn in a minute on a CPU.

A sound step does algebra and says why ("Subtract 5 from both sides, which gives 3x = 36."); an unsound one skips the
work ("Guess that x is about 7 and move on."). Each solution mixes them at its own rate, so scores spread over [0, 1].

  train.jsonl / heldout.jsonl              sequence level (outcome score): {"prompt": [system, user], "completion":
                                           the steps, one per line, "target": the fraction of sound steps}
  steps_train.jsonl / steps_heldout.jsonl  step level (process reward): {"prompt", "steps", "labels": 1.0 sound / 0.0 not}

The task is a stand-in: the score is a function of the surface text, chosen so the pipeline (head, pooling, LoRA or
full fine-tune, held-out R^2) can be checked end to end on the embedded model. A real verifier reads real solutions.

Stdlib only, seeded: the same arguments write the same bytes.
  python examples/recipes/verifier/make_data.py [--out DIR] [--train-rows N] [--heldout-rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You grade worked solutions."

SOUND = [
    "Subtract {b} from both sides, which gives {a}x = {cb}.",
    "Divide both sides by {a}, so x = {x}.",
    "Check: {a} * {x} + {b} = {c}, which matches.",
    "Move the constant: {a}x = {c} - {b} = {cb}.",
    "Since {a}x = {cb}, dividing by {a} gives x = {x}.",
    "Verify by substitution: {a} * {x} = {cb}, and {cb} + {b} = {c}.",
]
UNSOUND = [
    "Guess that x is about {g} and move on.",
    "It looks like x should be {g}, no need to check.",
    "Skip the algebra; x is probably {g}.",
    "Assume the answer is {g} because it seems right.",
    "Round things off and say x = {g}.",
    "The numbers feel close to {g}, so take that.",
]


def solution(rng: random.Random) -> tuple[str, list[str], list[float]]:
    """(problem, steps, labels): one problem and a solution whose steps are sound with a rate drawn for this row."""
    a, x, b = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 30)
    c = a * x + b
    values = {"a": a, "b": b, "c": c, "x": x, "cb": c - b}
    rate = rng.random()
    labels = [1.0 if rng.random() < rate else 0.0 for _ in range(rng.randint(2, 5))]
    # no template twice in a solution; sound steps keep the order of the algebra
    sound = [SOUND[i] for i in sorted(rng.sample(range(len(SOUND)), int(sum(labels))))]
    unsound = rng.sample(UNSOUND, len(labels) - len(sound))
    steps = []
    for label in labels:
        values["g"] = x + rng.choice([-3, -2, -1, 1, 2, 3])
        steps.append((sound if label else unsound).pop(0).format(**values))
    return f"Solve for x: {a}x + {b} = {c}.", steps, labels


def rows(n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    sequence, step = [], []
    for _ in range(n):
        problem, steps, labels = solution(rng)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]
        sequence.append({"prompt": prompt, "completion": "\n".join(steps), "target": round(sum(labels) / len(labels), 4)})
        step.append({"prompt": prompt, "steps": steps, "labels": labels})
    return sequence, step


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--heldout-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=4)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    train_seq, train_step = rows(args.train_rows, rng)
    held_seq, held_step = rows(args.heldout_rows, rng)
    write(args.out / "train.jsonl", train_seq)
    write(args.out / "heldout.jsonl", held_seq)
    write(args.out / "steps_train.jsonl", train_step)
    write(args.out / "steps_heldout.jsonl", held_step)
    print(f"wrote {args.train_rows} training and {args.heldout_rows} held-out rows (sequence and step level) to {args.out}")


if __name__ == "__main__":
    main()
