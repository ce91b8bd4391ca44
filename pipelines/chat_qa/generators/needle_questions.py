"""The ``needle`` generator: offline retrieval pairs about the needle sentences inserted in a chunk."""

from __future__ import annotations

import re
from typing import Iterator, Sequence

from pipelines.chat_qa.generators.interface import NO_QUESTION, Identity, QAOutcome, QAPair, QARequest
from pipelines.tokens.prompts import needle_question, needle_sentence

# A needle sentence as pipelines.tokens.prompts.needle_sentence writes it.
_NEEDLE = re.compile(r"The special magic (?P<city>\S(?:[^.]*?\S)?) number is: (?P<number>[0-9]+)\.")


class Needle:
    """Offline retrieval pairs: pair ``number`` asks about the ``number``-th needle sentence
    ("The special magic {city} number is: {digits}.") in the chunk, in the eval's words
    (``trainer.evaluation.haystack``): "What is the special magic {city} number?" → the needle sentence.

    For training data made of haystacks with needles inserted (``orchestration.demo.sample_retrieval``):
    the answer can only be copied from the context, so the answer-only loss is all about retrieval.
    """

    identity = Identity("needle", "needle-1")

    def generate(self, requests: Sequence[QARequest]) -> Iterator[QAOutcome]:
        for request in requests:
            needles = list(_NEEDLE.finditer(request.chunk.text))
            if request.number < len(needles):
                city, number = needles[request.number].group("city", "number")
                yield QAOutcome(request, QAPair(needle_question(city), needle_sentence(city, number)))
                continue
            detail = f"{len(needles)} needle sentence(s) in this chunk; question {request.number + 1} asked"
            yield QAOutcome(request, None, NO_QUESTION, detail)

    def close(self) -> None:
        pass


def identity(config) -> Identity:
    return Needle.identity


def build(config) -> Needle:
    return Needle()
