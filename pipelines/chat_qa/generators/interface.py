"""Question-answer generators for chat QA: one small interface, called with batches of chunks.

A generator turns :class:`QARequest` values (a chunk and which of its pairs is
wanted) into :class:`QAOutcome` values, yielded as soon as each is ready (any
order), so the caller can cache every pair the moment it exists. A failure is an
outcome too, with a dead-letter reason and the raw reply; it is never cached, so
a rerun asks again.

Generators, by ``--generator`` spec (:func:`build`):

* ``extractive``: offline and deterministic, no model. "What comes after:
  '<sentence>'?" → the next sentence of the chunk (:class:`Extractive`).
* ``openai:MODEL@URL``: any OpenAI-compatible chat-completions server
  (:mod:`pipelines.qa_openai`), with the versioned prompt below and its strict parser;
* ``lwm:CKPT``: a checkpoint of this project through the sampler, as a Beam
  RunInference model handler (:mod:`pipelines.qa_lwm`), same prompt and parser.

A generator's :class:`Identity` (id, prompt version, sampling settings) says what
determines its output; the cache (:mod:`pipelines.qa_cache`) keys pairs by it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
from typing import Iterator, Protocol, Sequence

from pipelines import flags
from pipelines.naming import stable_hash
from pipelines.qa_contexts import Chunk

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
_NEEDLE = re.compile(r"The special magic (?P<city>\S(?:[^.]*?\S)?) number is: (?P<number>[0-9]+)\.")
_REPLY = re.compile(r"\s*Question:\s*(?P<question>\S[^\n]*?)\s+Answer:\s*(?P<answer>\S.*?)\s*", re.S)


# The needle-in-a-haystack wording (LWM_FACTS "Evaluation"): one source for trainer.needle's eval and Needle.
def needle_sentence(city: str, number: str) -> str:
    return f"The special magic {city} number is: {number}."


def needle_question(city: str) -> str:
    return f"What is the special magic {city} number?"


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


class Needle:
    """Offline retrieval pairs: pair ``number`` asks about the ``number``-th needle sentence
    ("The special magic {city} number is: {digits}.") in the chunk, in the eval's words
    (``trainer.needle``): "What is the special magic {city} number?" → the needle sentence.

    For training data made of haystacks with needles inserted (``orchestration.sample_retrieval``):
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


OFFLINE = {"extractive": Extractive, "needle": Needle}  # generators that need no model or server


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Which generator and how it is called; everything but the API key itself, which stays in the environment."""

    spec: str = flags.field("extractive", flag="generator", metavar="SPEC")
    """extractive (offline, deterministic: "What comes after: '<sentence>'?"), needle (offline: the
    needle-in-a-haystack question about each needle sentence in a chunk), openai:MODEL@URL (any
    OpenAI-compatible chat-completions server; URL = its base, e.g. http://host:8000/v1) or lwm:CKPT
    (a checkpoint directory of this project, its newest step, through the sampler)."""
    api_key_env: str | None = flags.field(None, record=False, metavar="NAME")
    """Environment variable holding the openai: server's API key (read on each worker; never logged or stored)."""
    temperature: float = 0.0
    """Sampling temperature of a model generator."""
    max_reply_tokens: int = 256
    """Most tokens a model may reply with."""
    concurrency: int = flags.field(32, record=False)
    """Requests kept in flight per worker."""
    timeout_s: float = flags.field(120.0, flag="request-timeout", record=False)
    """Limit of one request, in seconds."""
    max_retries: int = flags.field(5, record=False)
    """Retries of a request after 429, 5xx or a timeout, with exponential backoff."""
    backoff_s: float = flags.field(1.0, flag="backoff", record=False)
    """First backoff in seconds, doubled after each retry (a 429's longer Retry-After wins)."""
    batch: int = flags.field(256, flag="generator-batch", record=False)
    """Chunks per generator call (keep it a multiple of --concurrency)."""

    def __post_init__(self):
        kind, _, rest = self.spec.partition(":")
        if self.spec not in OFFLINE and kind not in ("openai", "lwm"):
            raise ValueError(f"unknown generator {self.spec!r}; expected extractive, needle, openai:MODEL@URL "
                             "or lwm:CKPT")
        if kind == "lwm" and not rest:
            raise ValueError(f"generator {self.spec!r}: expected lwm:CHECKPOINT_DIR")
        if kind == "openai":
            model, at, url = self.spec[len("openai:"):].partition("@")
            if not model or not at or not url.startswith(("http://", "https://")):
                raise ValueError(f"generator {self.spec!r}: expected openai:MODEL@http(s)://HOST[:PORT]/PATH")
        for name in ("concurrency", "max_reply_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator {name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("generator timeout must be positive, retries and backoff not negative")


def check(config: GeneratorConfig) -> None:
    """Fail before the job starts if the generator cannot work: its API key variable unset, its server unreachable
    (a wrong URL would otherwise cost every chunk its full round of retries), no checkpoint."""
    if config.api_key_env and not os.environ.get(config.api_key_env):
        raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is not set or empty")
    if config.spec.startswith("openai:"):
        url = urllib.parse.urlsplit(config.spec.partition("@")[2])
        address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
        try:
            socket.create_connection(address, timeout=min(config.timeout_s, 10.0)).close()
        except OSError as error:
            where = f"{address[0]}:{address[1]}"
            raise ValueError(f"--generator {config.spec}: cannot connect to {where} ({error})") from None
    if config.spec.startswith("lwm:"):
        from pipelines import qa_lwm

        qa_lwm.resolve(config)


def identity(config: GeneratorConfig) -> Identity:
    """The identity of the generator ``config`` names, without building it (``lwm:``: its newest step)."""
    if config.spec in OFFLINE:
        return OFFLINE[config.spec].identity
    if config.spec.startswith("lwm:"):
        from pipelines import qa_lwm

        return qa_lwm.identity(config, *qa_lwm.resolve(config))
    settings = {"temperature": config.temperature, "max_tokens": config.max_reply_tokens}
    return Identity(config.spec, PROMPT_VERSION, tuple(sorted(settings.items())))


def build(config: GeneratorConfig) -> QAGenerator:
    """The offline or ``openai:`` generator ``config.spec`` names, ready to call (its API key read from
    the environment now); ``lwm:`` runs through RunInference instead (:mod:`pipelines.qa_lwm`)."""
    if config.spec in OFFLINE:
        return OFFLINE[config.spec]()
    if config.spec.startswith("lwm:"):
        raise ValueError("lwm: generators run as a RunInference model handler (pipelines.qa_lwm.SamplerHandler)")
    from pipelines.qa_openai import OpenAIChat

    return OpenAIChat.from_config(config)
