"""Generate the built-in demo chat dataset (``builtin:demo-chat``).

``finetrack demo`` LoRA-tunes SmolLM2-135M-Instruct for ~60 small steps on a
CPU and shows one answer before and after training. The learned behaviour
must be obvious at a glance, so every assistant reply talks like a pirate:
it starts with "Arr, matey!" and then gives a short, *correct* factual answer
("The capital of France be Paris, savvy?"). Facts come from small tables
(capitals, arithmetic, colours, animals, opposites) so the model learns a
style, not new knowledge. Rows are one sentence long to keep training fast;
~10% are two-turn chats to exercise multi-turn loss masking.

Italy is deliberately absent: the demo asks "What is the capital of Italy?"
after training as an unseen question.

Stdlib only and seeded: `python3 scripts/make_demo_data.py` is reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

SEED = 1234
OUT_PATH = Path(__file__).resolve().parent.parent / "src" / "finetrack" / "assets" / "demo_chat.jsonl"

QA = tuple[str, str]  # (user question, assistant answer body without "Arr, matey!")

ENDINGS = ["savvy?", "yo-ho-ho!", "me hearty.", "arr!", "shiver me timbers!", "as sure as the tide!"]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "the United Kingdom": "London",
    "Ireland": "Dublin",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Poland": "Warsaw",
    "the Czech Republic": "Prague",
    "Belgium": "Brussels",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Iceland": "Reykjavik",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "the Philippines": "Manila",
    "Iran": "Tehran",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
}

COLOURS = {
    "the sky": "blue",
    "grass": "green",
    "a banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a strawberry": "red",
    "a lemon": "yellow",
    "milk": "white",
    "a tomato": "red",
    "a carrot": "orange",
    "a lime": "green",
    "chocolate": "brown",
    "a pumpkin": "orange",
    "an eggplant": "purple",
    "a flamingo": "pink",
    "a crow": "black",
    "ash": "grey",
    "a cucumber": "green",
    "a ripe cherry": "red",
    "an orange": "orange",
}

# animal -> (verb, sound)
SOUNDS = {
    "dog": ("barks", "woof"),
    "cat": ("meows", "meow"),
    "cow": ("moos", "moo"),
    "sheep": ("bleats", "baa"),
    "duck": ("quacks", "quack"),
    "lion": ("roars", "roar"),
    "pig": ("oinks", "oink"),
    "owl": ("hoots", "hoot"),
    "snake": ("hisses", "hiss"),
    "frog": ("croaks", "ribbit"),
    "bee": ("buzzes", "buzz"),
    "wolf": ("howls", "awoo"),
    "mouse": ("squeaks", "squeak"),
    "donkey": ("brays", "hee-haw"),
    "rooster": ("crows", "cock-a-doodle-doo"),
    "horse": ("neighs", "neigh"),
}

LEGS = {
    "dog": 4,
    "cat": 4,
    "horse": 4,
    "cow": 4,
    "elephant": 4,
    "frog": 4,
    "lizard": 4,
    "spider": 8,
    "scorpion": 8,
    "ant": 6,
    "bee": 6,
    "beetle": 6,
    "chicken": 2,
    "duck": 2,
    "penguin": 2,
    "ostrich": 2,
}
NUMBER_WORDS = {2: "two", 4: "four", 6: "six", 8: "eight"}

OPPOSITES = {
    "hot": "cold",
    "cold": "hot",
    "big": "small",
    "small": "big",
    "up": "down",
    "down": "up",
    "fast": "slow",
    "slow": "fast",
    "happy": "sad",
    "sad": "happy",
    "wet": "dry",
    "dry": "wet",
    "full": "empty",
    "empty": "full",
    "strong": "weak",
    "weak": "strong",
    "rich": "poor",
    "poor": "rich",
    "loud": "quiet",
    "early": "late",
    "day": "night",
    "night": "day",
    "black": "white",
    "white": "black",
    "push": "pull",
    "pull": "push",
    "tall": "short",
    "open": "closed",
    "closed": "open",
    "top": "bottom",
    "bottom": "top",
    "win": "lose",
    "lose": "win",
    "dark": "light",
    "heavy": "light",
    "yes": "no",
    "first": "last",
    "last": "first",
    "inside": "outside",
    "outside": "inside",
    "north": "south",
    "south": "north",
    "east": "west",
    "west": "east",
}


def cap(text: str) -> str:
    """Upper-case the first character only ("the sky" -> "The sky")."""
    return text[:1].upper() + text[1:]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def capital_qas(rng: random.Random) -> list[QA]:
    asks = [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital of {c}.",
        "What's the capital city of {c}?",
    ]
    says = ["The capital of {c} be {x}", "{x} be the capital of {c}"]
    return [(a.format(c=c), cap(rng.choice(says).format(c=c, x=x))) for c, x in CAPITALS.items() for a in asks]


def addition_qas(rng: random.Random) -> list[QA]:
    asks = ["What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."]
    says = ["{a} plus {b} be {r}", "Add {a} and {b} and ye get {r}"]
    pairs = [(a, b) for a in range(2, 21) for b in range(2, 21)]
    return [(rng.choice(asks).format(a=a, b=b), rng.choice(says).format(a=a, b=b, r=a + b)) for a, b in rng.sample(pairs, 80)]


def multiplication_qas(rng: random.Random) -> list[QA]:
    asks = ["What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.", "How much is {a} times {b}?"]
    says = ["{a} times {b} be {r}", "{a} multiplied by {b} makes {r}"]
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    return [(rng.choice(asks).format(a=a, b=b), rng.choice(says).format(a=a, b=b, r=a * b)) for a, b in rng.sample(pairs, 60)]


def colour_qas(rng: random.Random) -> list[QA]:
    asks = ["What colour is {t}?", "What color is {t}?", "What is the colour of {t}?", "Tell me the color of {t}."]
    return [(a.format(t=t), f"{cap(t)} be {c}") for t, c in COLOURS.items() for a in asks]


def sound_qas(rng: random.Random) -> list[QA]:
    asks = ["What sound does a {n} make?", "What noise does a {n} make?", "What does a {n} say?", "How does a {n} sound?"]
    return [
        (a.format(n=n), rng.choice(["{A} {v}", "{A} goes {w}"]).format(A=cap(article(n)), v=v, w=w))
        for n, (v, w) in SOUNDS.items()
        for a in asks
    ]


def legs_qas(rng: random.Random) -> list[QA]:
    asks = ["How many legs does {an} have?", "How many legs has {an} got?", "Count the legs on {an}.", "{An} has how many legs?"]
    return [
        (a.format(an=article(n), An=cap(article(n))), f"{cap(article(n))} has {NUMBER_WORDS[k]} legs")
        for n, k in LEGS.items()
        for a in asks
    ]


def opposite_qas(rng: random.Random) -> list[QA]:
    asks = [
        "What is the opposite of {w}?",
        "What's the opposite of the word {w}?",
        "Give me the opposite of {w}.",
        "What word means the opposite of {w}?",
    ]
    return [(a.format(w=w), f"The opposite of {w} be {o}") for w, o in OPPOSITES.items() for a in asks]


# Family generator -> single-turn rows drawn from it (sum 288); 32 two-turn rows are added.
FAMILIES: dict[Callable[[random.Random], list[QA]], int] = {
    capital_qas: 84,
    addition_qas: 36,
    multiplication_qas: 36,
    colour_qas: 40,
    sound_qas: 28,
    legs_qas: 28,
    opposite_qas: 36,
}
TWO_TURN_ROWS = 32


def to_messages(rng: random.Random, turns: list[QA]) -> list[dict[str, str]]:
    """Alternate user/assistant messages; every answer gets the pirate frame."""
    messages = []
    for question, body in turns:
        answer = f"Arr, matey! {body}, {rng.choice(ENDINGS)}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def main() -> None:
    rng = random.Random(SEED)
    singles: list[QA] = []
    leftovers: list[QA] = []  # unused questions, source of the two-turn chats
    for generate, n in FAMILIES.items():
        pool = generate(rng)
        assert len({q for q, _ in pool}) == len(pool), f"duplicate questions in {generate.__name__}"
        assert not any("Italy" in q + a or "Rome" in q + a for q, a in pool), "Italy is held out"
        rng.shuffle(pool)
        singles += pool[:n]
        leftovers += pool[n:]

    conversations: list[list[QA]] = [[qa] for qa in singles]
    seen: set[tuple[QA, QA]] = set()
    while len(conversations) < len(singles) + TWO_TURN_ROWS:
        first, second = rng.sample(leftovers, 2)
        if (first, second) not in seen:
            seen.add((first, second))
            conversations.append([first, second])

    rows = [{"messages": to_messages(rng, turns)} for turns in conversations]
    rng.shuffle(rows)
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    with OUT_PATH.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT_PATH}")


if __name__ == "__main__":
    main()
