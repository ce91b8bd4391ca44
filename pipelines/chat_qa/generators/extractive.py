"""The ``extractive`` generator: offline, deterministic pairs whose answer is in the chunk, no model."""

from __future__ import annotations

from typing import Iterator, Sequence

from pipelines.chat_qa.generators.interface import NO_QUESTION, Identity, QAOutcome, QAPair, QARequest
from pipelines.kit.naming import stable_hash


class Extractive:
    """Offline, deterministic pairs whose answer is in the chunk.

    "What comes after: '<sentence>'?" → the next sentence, for each sentence but the
    last; then (a chunk of one sentence, or more pairs than that) "Complete:
    '<first half of a sentence> ...'" → its second half. Pair ``number`` takes the
    ``number``-th of these questions in an order fixed by a stable hash of the chunk
    text, so different pairs about one chunk ask different questions.
    """

    identity = Identity("extractive", "extractive-2")

    @staticmethod
    def questions(sentences: Sequence[str], seed: str) -> list[QAPair]:
        """Every question this generator can ask about a chunk's sentences, in its order."""
        def shuffled(items: list) -> list:
            return [item for _, item in sorted((stable_hash(f"{seed}:{i}"), item) for i, item in enumerate(items))]

        following = [QAPair(f"What comes after: '{a}'?", b) for a, b in zip(sentences, sentences[1:])]
        halves = [(words[: len(words) // 2], words[len(words) // 2:]) for words in (s.split() for s in sentences)]
        completions = [QAPair(f"Complete: '{' '.join(a)} ...'", " ".join(b)) for a, b in halves if a]
        return shuffled(following) + shuffled(completions)

    def generate(self, requests: Sequence[QARequest]) -> Iterator[QAOutcome]:
        for request in requests:
            questions = self.questions(request.chunk.sentences, request.chunk.text_sha256)
            if request.number < len(questions):
                yield QAOutcome(request, questions[request.number])
                continue
            detail = f"{len(questions)} extractive question(s) about this chunk; question {request.number + 1} asked"
            yield QAOutcome(request, None, NO_QUESTION, detail)

    def close(self) -> None:
        pass


def identity(config) -> Identity:
    return Extractive.identity


def build(config) -> Extractive:
    return Extractive()
