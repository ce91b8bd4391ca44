"""Long-context chat QA examples: books → sentence-aligned chunks → contexts with their QA turns.

docs/LWM.md, "Model-generated long-context chat QA": a book is split into chunks of
about 1000 tokens, a model writes question-answer pairs per chunk, and adjacent
chunks are concatenated up to the target length L, followed by the pairs about
those chunks in LWM's chat format, with loss on the answers only::

    BOS You are a helpful assistant. USER: {chunk i} … {chunk j} {question 1} ASSISTANT: {answer 1} EOS
        USER: {question 2} ASSISTANT: {answer 2} EOS …

Worked example (chunk tokens ``c``, question ``q``, answer ``a``, template ``t``)::

    chunks   [c1 c1 c1] [c2 c2]          pairs  (q1, a1) on chunk 1, (q2, a2) on chunk 2
    turn 1   prompt     BOS t t c1 c1 c1 c2 c2 q1 t      completion  a1 a1 EOS
    turn 2   prompt     t q2 q2 t                        completion  a2 EOS
    weights  0 ………………………………………………………………… 0  1 1 1  0 ……… 0  1 1

A record is typed, not a string with markers: :class:`ChatExample` holds turns of
prompt tokens and completion tokens, and the loss mask is derived from them (the
idea of Levanter's ``PromptCompletion(ids, prompt_length)``, for several turns).

Chunking is exact: a chunk is a run of whole sentences, its text the sentences
joined by one space and its tokens the sentences' tokens in order (SentencePiece
pieces never cross a space, so both agree). All functions are pure; the tokenizer
comes in as a batch-encode function or as ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Callable, Sequence

import numpy as np

from pipelines.kit.packing import Segment
from pipelines.tokens import prompts

# A sentence ends at . ! or ? (closing quotes or brackets included), then whitespace.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")

Encode = Callable[[Sequence[str]], list]  # texts → token id arrays (no BOS/EOS)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``index``-th chunk of book ``book_id``: whole sentences, text and tokens."""

    book_id: str
    index: int
    text: str
    tokens: np.ndarray  # int32[n]
    sentences: tuple[str, ...]

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.tokens)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` in order, stripped; whitespace (newlines included) separates them."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def _cut_long(sentence: str, tokens: int, chunk_tokens: int) -> list[str]:
    """A sentence longer than a chunk as word runs of about ``chunk_tokens`` tokens each."""
    words = sentence.split()
    pieces = min(len(words), math.ceil(tokens / chunk_tokens))
    bounds = [round(i * len(words) / pieces) for i in range(pieces + 1)]
    return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]


def chunk_book(book_id: str, text: str, encode: Encode, chunk_tokens: int = 1000) -> list[Chunk]:
    """``text`` as chunks of whole sentences, each at most ``chunk_tokens`` tokens where sentences allow.

    Sentences are added to a chunk while it stays within ``chunk_tokens``; a sentence
    longer than that is cut at spaces into pieces of about ``chunk_tokens`` tokens.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    sentences = split_sentences(text)
    units: list[tuple[str, np.ndarray]] = []
    for sentence, ids in zip(sentences, encode(sentences)):
        if len(ids) <= chunk_tokens or len(sentence.split()) < 2:
            units.append((sentence, ids))
        else:
            pieces = _cut_long(sentence, len(ids), chunk_tokens)
            units.extend(zip(pieces, encode(pieces)))
    groups: list[list[tuple[str, np.ndarray]]] = []
    size = 0
    for unit in units:
        if not groups or size + len(unit[1]) > chunk_tokens:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += len(unit[1])
    return [
        Chunk(book_id, index, " ".join(s for s, _ in group), np.concatenate([t for _, t in group]).astype(np.int32),
              tuple(s for s, _ in group))
        for index, group in enumerate(groups)
    ]


@dataclasses.dataclass(frozen=True)
class QATokens:
    """One question-answer pair about chunk ``chunk`` of its book, tokenized (no special ids)."""

    chunk: int
    question: np.ndarray
    answer: np.ndarray


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Token ids of LWM's chat template pieces, from the tokenizer once per worker."""

    bos: int
    eos: int
    system_user: np.ndarray  # "You are a helpful assistant. USER:"
    user: np.ndarray  # "USER:"
    assistant: np.ndarray  # "ASSISTANT:"

    @classmethod
    def from_encoder(cls, encode: Encode, bos: int, eos: int) -> "ChatTemplate":
        system_user, user, assistant = encode([prompts.OPENING, prompts.USER, prompts.ASSISTANT])
        return cls(bos, eos, *(np.asarray(t, np.int32) for t in (system_user, user, assistant)))


@dataclasses.dataclass(frozen=True)
class Turn:
    """One exchange: prompt tokens (no loss) and completion tokens (the answer and its EOS: loss)."""

    prompt: np.ndarray
    completion: np.ndarray


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """One long-context QA example: turns of prompt and completion; tokens and loss mask derived.

    ``key`` = (book id, index of the first chunk in the context) orders examples
    deterministically; ``chunks`` = the chunk indices the context holds.
    """

    key: tuple[str, int]
    chunks: tuple[int, ...]
    turns: tuple[Turn, ...]

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([part for t in self.turns for part in (t.prompt, t.completion)]).astype(np.int32)

    @property
    def loss_mask(self) -> np.ndarray:
        """True exactly on completion tokens: predicting them from what comes before is the loss."""
        return np.concatenate(
            [np.repeat([False, True], [len(t.prompt), len(t.completion)]) for t in self.turns]
        )

    def __len__(self) -> int:
        return sum(len(t.prompt) + len(t.completion) for t in self.turns)

    def segment(self, weight: float = 1.0) -> Segment:
        """The example as one packed segment: ``weight`` on completion tokens, 0 elsewhere."""
        mask = self.loss_mask
        return Segment(self.key, self.tokens, np.zeros(len(mask), bool), np.where(mask, weight, 0).astype(np.float32))


def _turns(template: ChatTemplate, context: Sequence[np.ndarray], pairs: Sequence[QATokens]) -> tuple[Turn, ...]:
    turns = []
    for number, pair in enumerate(pairs):
        opening = [[template.bos], template.system_user, *context] if number == 0 else [template.user]
        prompt = np.concatenate([*opening, pair.question, template.assistant]).astype(np.int32)
        turns.append(Turn(prompt, np.append(pair.answer, template.eos).astype(np.int32)))
    return tuple(turns)


def _length(template: ChatTemplate, chunk_tokens: int, pairs: Sequence[QATokens]) -> int:
    """Tokens a run of chunks (``chunk_tokens`` in all) adds with its pairs, opening excluded."""
    turns = sum(len(p.question) + len(template.assistant) + len(p.answer) + 1 for p in pairs)
    return chunk_tokens + turns + len(template.user) * len(pairs)


def assemble(
    book_id: str,
    chunks: Sequence[np.ndarray],
    pairs: Sequence[QATokens],
    template: ChatTemplate,
    seq_len: int,
) -> tuple[list[ChatExample], list[int], list[tuple[int, ...]]]:
    """Greedy contexts of adjacent chunks of one book, each with the QA turns about its chunks, within ``seq_len``.

    ``chunks``: the book's chunk tokens in order; ``pairs``: its QA pairs (any
    order; those of one chunk keep their order). Returns (examples, chunks that do
    not fit ``seq_len`` even alone with their pairs, contexts left out because no
    pair is about any of their chunks).
    """
    by_chunk: dict[int, list[QATokens]] = {}
    for pair in pairs:
        by_chunk.setdefault(pair.chunk, []).append(pair)
    opening = 1 + len(template.system_user) - len(template.user)  # the first turn's USER: is the system line
    examples, too_long, without_qa = [], [], []
    current: list[int] = []
    used = opening

    def close():
        if not current:
            return
        turns_pairs = [p for i in current for p in by_chunk.get(i, [])]
        if turns_pairs:
            turns = _turns(template, [chunks[i] for i in current], turns_pairs)
            examples.append(ChatExample((book_id, current[0]), tuple(current), turns))
        else:
            without_qa.append(tuple(current))

    for index, tokens in enumerate(chunks):
        cost = _length(template, len(tokens), by_chunk.get(index, []))
        if opening + cost > seq_len:
            close()
            current, used = [], opening
            too_long.append(index)
            continue
        if current and used + cost > seq_len:
            close()
            current, used = [], opening
        current.append(index)
        used += cost
    close()
    return examples, too_long, without_qa
