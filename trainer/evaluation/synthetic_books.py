"""Embedded sample data for the demo and tests, generated deterministically (no downloads).

Books are synthetic English-like prose from a small grammar: enough structure for a
tokenizer to learn pieces and for a tiny model's loss to fall, in any amount.
"""

from __future__ import annotations

import json
import pathlib
import random

_SUBJECTS = ("the old sailor", "a young scholar", "the river", "my grandmother", "the city", "a quiet child",
             "the captain", "the library", "an honest merchant", "the northern wind", "the gardener", "a stranger")
_VERBS = ("remembered", "carried", "watched", "described", "followed", "answered", "painted", "measured",
          "forgot", "discovered", "crossed", "admired")
_OBJECTS = ("the long road", "a silver lantern", "the harbour lights", "seven letters", "the winter fields",
            "an unfinished map", "the bell tower", "a box of seeds", "the last train", "the morning market")
_ENDINGS = ("before the rain began", "without a single word", "as the clock struck nine", "for many years",
            "with great care", "under the pale moon", "while the town slept", "at the edge of the forest")


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
    if rng.random() < 0.3:
        text += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} it {rng.randint(2, 99)} times"
    return text[0].upper() + text[1:] + "."


def book(rng: random.Random, sentences: int) -> str:
    paragraphs, current = [], []
    for _ in range(sentences):
        current.append(sentence(rng))
        if len(current) >= rng.randint(3, 8):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def write_books(path: pathlib.Path, count: int, *, min_sentences: int = 5, max_sentences: int = 400, seed: int = 0) -> pathlib.Path:
    """A JSON-lines file of ``count`` synthetic books of varied length."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for index in range(count):
            length = int(min_sentences * (max_sentences / min_sentences) ** rng.random())  # log-uniform
            f.write(json.dumps({"id": f"book-{seed}-{index:05d}", "text": book(rng, length), "source": "synthetic"}) + "\n")
    return path
