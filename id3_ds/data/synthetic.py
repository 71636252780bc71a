"""The shipped sentiment data set (`id3_ds/resources/sentiment_{train,eval}.jsonl`), regenerated exactly.

No real labelled data set ships in any package installable here, so id3-ds ships its own: short English
review sentences written from hand-made templates and word lists, labelled `positive` / `negative` by
construction. Negation ("not good") flips a phrase and contrast ("X, but Y") takes the label of the
clause after "but", so a bag of words alone does not solve it. It is small and synthetic: figures on it
compare methods with each other; they say nothing about any public benchmark.

    python -m id3_ds.data.synthetic   # rewrites the two files; the content is a function of the seeds
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from id3_ds.files.atomic import write_text_atomic

SUBJECTS = [
    "the movie",
    "this film",
    "the restaurant",
    "the hotel room",
    "this phone",
    "the novel",
    "the concert",
    "the service",
    "this laptop",
    "the coffee",
    "the staff",
    "the soundtrack",
    "this game",
    "the museum",
    "the flight",
    "the pizza",
    "the app",
    "the lecture",
    "the headphones",
    "the play",
    "the camera",
    "the ending",
    "the food",
    "the customer support",
    "the show",
]
POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "charming",
    "brilliant",
    "lovely",
    "fantastic",
    "impressive",
    "enjoyable",
    "pleasant",
    "outstanding",
    "fun",
    "friendly",
    "reliable",
    "tasty",
    "moving",
]
NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "dreadful",
    "bland",
    "rude",
    "broken",
    "slow",
    "noisy",
    "painful",
    "mediocre",
    "annoying",
    "useless",
    "dull",
    "overpriced",
    "confusing",
    "cold",
]
INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "very ", "surprisingly ", "absolutely "]
FRAMES = ["{s} was {p}.", "{s} is {p}.", "I found {s} {p}.", "Honestly, {s} was {p}.", "{s} felt {p} to me."]


def _phrase(rng: random.Random, positive: bool) -> str:
    """A phrase whose polarity is `positive`, sometimes by negating the opposite word."""
    if rng.random() < 0.25:
        word = rng.choice(NEGATIVE if positive else POSITIVE)
        return f"not {word}" if rng.random() < 0.5 else f"not at all {word}"
    return rng.choice(INTENSIFIERS) + rng.choice(POSITIVE if positive else NEGATIVE)


def sentence(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.3:  # contrast: the clause after "but" decides
        first = rng.choice(FRAMES).format(s=subject, p=_phrase(rng, not positive)).rstrip(".")
        other = rng.choice([s for s in SUBJECTS if s != subject])
        text = f"{first}, but {other} was {_phrase(rng, positive)}."
    else:
        text = rng.choice(FRAMES).format(s=subject, p=_phrase(rng, positive))
    return {"text": text[0].upper() + text[1:], "label": "positive" if positive else "negative"}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        rec = sentence(rng)
        if rec["text"] not in seen:
            seen.add(rec["text"])
            out.append(rec)
    return out


def write(directory: Path, n_train: int = 600, n_eval: int = 200) -> None:
    train = generate(n_train, seed=1)
    held_out = generate(n_eval, seed=2, exclude={r["text"] for r in train})  # no eval sentence is in train
    for name, rows in (("sentiment_train.jsonl", train), ("sentiment_eval.jsonl", held_out)):
        write_text_atomic(directory / name, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write(Path(__file__).resolve().parents[1] / "resources")
