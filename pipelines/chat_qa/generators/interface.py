"""What every chat-QA generator shares: requests, outcomes, identities, the versioned prompt and its parser.

A generator turns :class:`QARequest` values (a chunk and which of its pairs is
wanted) into :class:`QAOutcome` values, yielded as soon as each is ready (any
order), so the caller can cache every pair the moment it exists. A failure is an
outcome too, with a dead-letter reason and the raw reply; it is never cached, so
a rerun asks again. A generator's :class:`Identity` (id, prompt version, sampling
settings) says what determines its output; the cache (:mod:`pipelines.chat_qa.cache`)
keys pairs by it. The generators themselves, by scheme, are in
:mod:`pipelines.chat_qa.generators`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Protocol, Sequence

from pipelines.chat_qa.contexts import Chunk

# Dead-letter reasons of a pair that could not be generated.
NO_QUESTION = "qa_no_question"  # the generator has no (further) question about this chunk
UNPARSEABLE = "qa_unparseable_reply"  # empty or malformed reply, twice
UNAVAILABLE = "qa_generator_unavailable"  # 429 / 5xx / timeouts until the retries ran out
REJECTED = "qa_rejected"  # the server refused this request (4xx other than 429)

PROMPT_VERSION = "qa-prompt-1"
PROMPT = """Read the passage below, then write one question that the passage answers and the answer to it.
The question must be answerable from the passage alone; the answer must be short and taken from the passage.{focus}
Reply in exactly this form, two lines, nothing else:
Question: <the question>
Answer: <the answer>

Passage:
{passage}"""
FOCUS = "\nThis is question {number} of {count} about this passage: ask about part {number} of {count} of it."
_REPLY = re.compile(r"\s*Question:\s*(?P<question>\S[^\n]*?)\s+Answer:\s*(?P<answer>\S.*?)\s*", re.S)


@dataclasses.dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class QARequest:
    """Pair ``number`` (0-based, of ``count``) about ``chunk``; ``source`` = the book's input location."""

    chunk: Chunk
    number: int
    count: int
    source: str = ""

    @property
    def name(self) -> str:
        return f"{self.chunk.book_id}#chunk{self.chunk.index}/q{self.number}"


@dataclasses.dataclass(frozen=True)
class QAOutcome:
    """A request's result: ``pair``, or a dead-letter ``reason`` with ``detail`` (the raw reply where there is one)."""

    request: QARequest
    pair: QAPair | None
    reason: str = ""
    detail: str = ""
    retries: int = 0  # requests repeated (transient errors, a bad reply)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What determines a generator's pairs, besides the chunk: the cache keys pairs by it, manifests record it."""

    id: str  # e.g. "extractive", "openai:MODEL@URL"
    prompt_version: str
    settings: tuple[tuple[str, object], ...] = ()  # sampling settings, sorted by name


class QAGenerator(Protocol):
    identity: Identity

    def generate(self, requests: Sequence[QARequest]) -> Iterator[QAOutcome]:
        """One outcome per request, each yielded as soon as it is ready."""

    def close(self) -> None:
        """Release connections, threads, models."""


def prompt(request: QARequest) -> str:
    """The versioned prompt (:data:`PROMPT_VERSION`) asking for one pair about the request's chunk."""
    focus = FOCUS.format(number=request.number + 1, count=request.count) if request.count > 1 else ""
    return PROMPT.format(passage=request.chunk.text, focus=focus)


def parse_reply(reply: str) -> QAPair:
    """Exactly ``Question: …`` (one line) then ``Answer: …``, both non-empty, each once; anything else is
    ``ValueError``. The line break between them may be a space (tokenizers that normalise newlines away)."""
    match = _REPLY.fullmatch(reply or "")
    if not match or re.search(r"(Question|Answer):", match["question"] + match["answer"]):
        raise ValueError(f"not 'Question: …' then 'Answer: …': {reply[:200]!r}" if reply else "empty reply")
    return QAPair(match["question"].strip(), " ".join(match["answer"].split()))
