"""Synthetic verifier data for examples/recipes/verifier: worked solutions to `a*x + b = c`, some steps sound and some
not, with a score a small model can learn in a minute on a CPU; and three small sets for the two-phase mixture recipe
(phase1.yaml, phase2.yaml), standing for seed 004's PRM800K, REVEAL and eQASC.

A sound step does algebra and says why ("Subtract 5 from both sides, which gives 3x = 36."); an unsound one skips the
work ("Guess that x is about 7 and move on."). Each solution mixes them at its own rate, so scores spread over [0, 1].

  train.jsonl / heldout.jsonl              sequence level (outcome score): {"prompt": [system, user], "completion":
                                           the steps, one per line, "target": the fraction of sound steps}
  steps_train.jsonl / steps_heldout.jsonl  step level (process reward): {"prompt", "steps", "labels": 1.0 sound / 0.0 not}

The mixture's three sources, each a training file and a held-out file (`*_heldout.jsonl`), scored the same way (the
fraction of sound steps), each with its own kind of problem, steps and wording:

  mix_math      (stands for PRM800K: graded math solutions)  new `a*x + b = c` solutions, as train.jsonl
  mix_evidence  (stands for REVEAL: reasoning chains checked against evidence)  a two-sentence passage and a question;
                a sound step quotes the passage, an unsound one answers from a hunch. Fields as train.jsonl
  mix_science   (stands for eQASC: chains of two science facts)  a science question; a sound step states a fact or
                chains them, an unsound one guesses. Other field names: {"question", "solution", "score"} (the recipe
                maps them with data.sources[].columns)

Sizes: mix_math takes half of --train-rows / --heldout-rows, the other two 3/16 of --train-rows and 1/4 of
--heldout-rows each (128 / 32 and 48 / 16 rows by default).

The tasks are stand-ins: the score is a function of the surface text, chosen so the pipeline (head, pooling, LoRA or
full fine-tune, held-out R^2, a weighted mixture with a warm start) can be checked end to end on the embedded model. A
real verifier reads real solutions.

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

# mix_evidence: who was born where, from a two-sentence passage
PEOPLE = ["Ada Brenner", "Tomas Okafor", "Lena Varga", "Ravi Mendes", "Mira Holt", "Jonas Petrov", "Ines Castell", "Kofi Lund"]
CITIES = [
    ("Lyon", "France"),
    ("Porto", "Portugal"),
    ("Graz", "Austria"),
    ("Turku", "Finland"),
    ("Cork", "Ireland"),
    ("Bergen", "Norway"),
    ("Gdansk", "Poland"),
    ("Ghent", "Belgium"),
]
SOUND_EVIDENCE = [
    "The passage states that {person} was born in {city}.",
    "The passage also states that {city} is in {country}.",
    "Both facts are quoted from the passage, so they can be relied on.",
    "Putting the two facts together, {person} was born in {country}.",
]
UNSOUND_EVIDENCE = [
    "The name {person} sounds like it comes from {g}, so probably {g}.",
    "Skip the reading; it is likely {g}.",
    "I seem to remember {person} living in {g}, without checking.",
    "People in stories like this are often from {g}, so guess that.",
    "It feels like the answer is {g}; move on.",
]

# mix_science: a question answered by chaining two facts
SCIENCE = [
    ("What do plants need to make food?", "Plants make food by photosynthesis", "Photosynthesis needs sunlight", "sunlight"),
    (
        "What makes a compass needle point north?",
        "A compass needle is a small magnet",
        "A magnet lines up with Earth's magnetic field",
        "Earth's magnetic field",
    ),
    ("What turns liquid water into vapor?", "Evaporation turns liquid water into vapor", "Evaporation is driven by heat", "heat"),
    (
        "What protects the body from germs?",
        "White blood cells fight germs",
        "White blood cells are part of the immune system",
        "the immune system",
    ),
    ("What moves blood through the body?", "The heart pumps blood", "Pumped blood flows through the blood vessels", "the heart"),
    (
        "What wears rocks down into sand?",
        "Moving water and wind wear rocks down",
        "Rock worn down into small grains becomes sand",
        "water and wind",
    ),
]
WRONG_SCIENCE = ["magnets", "the moon", "static electricity", "gravity alone", "cold air", "sound waves"]
SOUND_SCIENCE = [
    "Fact 1: {f1}.",
    "Fact 2: {f2}.",
    "Fact 1 leads into fact 2, so the two facts chain together.",
    "Therefore the answer is {answer}.",
]
UNSOUND_SCIENCE = [
    "Maybe it has to do with {g}; hard to say.",
    "Pick {g}, since it sounds scientific.",
    "Skip the facts; the answer is probably {g}.",
    "A guess: {g}, without checking any fact.",
    "It seems like {g} could be involved somehow.",
]


def chain(
    rng: random.Random, sound_templates: list[str], unsound_templates: list[str], values: dict, max_steps: int, wrong: list
) -> tuple[list[str], list[float]]:
    """(steps, labels): 2..max_steps steps, sound with a rate drawn for this row; an unsound one's {g} is drawn from `wrong`."""
    rate = rng.random()
    labels = [1.0 if rng.random() < rate else 0.0 for _ in range(rng.randint(2, max_steps))]
    # no template twice in a solution; sound steps keep their order (the algebra's, the chain's)
    sound = [sound_templates[i] for i in sorted(rng.sample(range(len(sound_templates)), int(sum(labels))))]
    unsound = rng.sample(unsound_templates, len(labels) - len(sound))
    steps = []
    for label in labels:
        values["g"] = rng.choice(wrong)
        steps.append((sound if label else unsound).pop(0).format(**values))
    return steps, labels


def solution(rng: random.Random) -> tuple[str, list[str], list[float]]:
    """(problem, steps, labels): one problem and a solution whose steps are sound with a rate drawn for this row."""
    a, x, b = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 30)
    c = a * x + b
    values = {"a": a, "b": b, "c": c, "x": x, "cb": c - b}
    steps, labels = chain(rng, SOUND, UNSOUND, values, 5, [x + d for d in (-3, -2, -1, 1, 2, 3)])
    return f"Solve for x: {a}x + {b} = {c}.", steps, labels


def score(labels: list[float]) -> float:
    return round(sum(labels) / len(labels), 4)


def rows(n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    sequence, step = [], []
    for _ in range(n):
        problem, steps, labels = solution(rng)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]
        sequence.append({"prompt": prompt, "completion": "\n".join(steps), "target": score(labels)})
        step.append({"prompt": prompt, "steps": steps, "labels": labels})
    return sequence, step


def evidence_rows(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        person = rng.choice(PEOPLE)
        city, country = rng.choice(CITIES)
        values = {"person": person, "city": city, "country": country}
        steps, labels = chain(rng, SOUND_EVIDENCE, UNSOUND_EVIDENCE, values, 4, [c for _, c in CITIES if c != country])
        passage = f"Passage: {person} was born in {city}. {city} is a city in {country}.\nQuestion: In which country was {person} born?"
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": passage}]
        out.append({"prompt": prompt, "completion": "\n".join(steps), "target": score(labels)})
    return out


def science_rows(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        question, f1, f2, answer = rng.choice(SCIENCE)
        values = {"f1": f1, "f2": f2, "answer": answer}
        steps, labels = chain(rng, SOUND_SCIENCE, UNSOUND_SCIENCE, values, 4, WRONG_SCIENCE)
        out.append({"question": question, "solution": "\n".join(steps), "score": score(labels)})
    return out


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

    # the mixture's sources: each its own random stream, so the files above stay as they were
    sources = {
        "math": (args.train_rows // 2, args.heldout_rows // 2, lambda n, r: rows(n, r)[0]),
        "evidence": (args.train_rows * 3 // 16, args.heldout_rows // 4, evidence_rows),
        "science": (args.train_rows * 3 // 16, args.heldout_rows // 4, science_rows),
    }
    for name, (num_train, num_heldout, make) in sources.items():
        rng = random.Random(f"{args.seed}/mix_{name}")
        write(args.out / f"mix_{name}.jsonl", make(num_train, rng))
        write(args.out / f"mix_{name}_heldout.jsonl", make(num_heldout, rng))
        print(f"wrote {num_train} training and {num_heldout} held-out rows of mix_{name} to {args.out}")


if __name__ == "__main__":
    main()
