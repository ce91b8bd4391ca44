"""SentencePiece text tokenizer: load any model file, encode in batches, never add BOS/EOS.

LWM's released code let the tokenizer insert BOS implicitly inside sequences
(docs/LWM.md, "Sequence construction"). Here encoding never adds special tokens;
the pipeline's policy (:class:`SpecialTokens`) adds them explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import random
import re
import textwrap
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from schemas import storage


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Which special tokens frame a document (default: BOS at its start, EOS at its end)."""

    bos: bool = True
    """Add BOS at each document's start."""
    eos: bool = True
    """Add EOS at each document's end."""


class TextTokenizer:
    """A SentencePiece model (Llama-2's ``tokenizer.model`` included) read from any path (local, ``gs://``)."""

    def __init__(self, path: str):
        self.__setstate__({"path": path, "model": storage.read_bytes(path)})

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (int32), with no BOS/EOS.

        One thread: a Beam worker runs one tokenizer per core, so SentencePiece's own
        thread pool would only oversubscribe the machine.
        """
        ids = self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False, num_threads=1)
        return [np.asarray(row, np.int32) for row in ids]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def frame(self, ids: np.ndarray, special: SpecialTokens) -> np.ndarray:
        """Add BOS/EOS around a document's ids as ``special`` says."""
        parts = [[self.bos_id]] if special.bos else []
        parts.append(ids)
        if special.eos:
            parts.append([self.eos_id])
        return np.concatenate(parts).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __getstate__(self):
        return {"path": self.path, "model": self._model_bytes}

    def __setstate__(self, state):  # also the constructor's body: pickles carry the model, not the path
        self.path = state["path"]
        self._model_bytes = state["model"]
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.sha256 = hashlib.sha256(self._model_bytes).hexdigest()


# SentencePiece skips training sentences over its max_sentence_length (4192 bytes by
# default) without a word; pieces are kept under it.
MAX_PIECE_BYTES = 4096
_SENTENCE_END = re.compile(r"(?<=[.!?;…])\s+|(?<=[。！？；])")


def training_pieces(text: str, max_bytes: int = MAX_PIECE_BYTES) -> Iterator[str]:
    """A document as SentencePiece training sentences of at most ``max_bytes`` UTF-8 bytes.

    Each non-blank line is one sentence; a longer line (a whole book on one line, the
    usual JSON-lines shape) is cut at sentence ends, and a sentence still too long at
    spaces, or anywhere if it has none. Only whitespace at the cuts is lost.
    """
    for line in text.splitlines():
        for sentence in [line] if len(line.encode()) <= max_bytes else _SENTENCE_END.split(line):
            if len(sentence.encode()) <= max_bytes:
                if sentence.strip():
                    yield sentence
            else:  # at most 4 bytes a character
                yield from textwrap.wrap(sentence, width=max_bytes // 4, break_on_hyphens=False)


# Sentences kept for training by default: a uniform sample of this many when the corpus
# has more (SentencePiece's own guidance for large corpora is a few million).
INPUT_SENTENCE_SIZE = 5_000_000
SAMPLE_SEED = 0


def train(texts: Iterable[str], vocab_size: int, output: str, *, model_type: str = "bpe",
          input_sentence_size: int = INPUT_SENTENCE_SIZE, shuffle_input_sentence: bool = True,
          num_threads: int | None = None) -> str:
    """Train a Llama-style SentencePiece model (BPE, byte fallback, unk 0 / bos 1 / eos 2) offline.

    Documents are read one at a time and cut into :func:`training_pieces`; at most
    ``input_sentence_size`` of those sentences (0: all of them) are kept for training:
    a uniform sample over the whole corpus with ``shuffle_input_sentence``
    (:func:`sample_sentences`), else the first ones. Memory grows with the sample, not
    the corpus. The sampling is ours, seeded, rather than SentencePiece's (whose own
    sample changes from one process to the next), so a corpus gives the same model
    every time. ``num_threads`` (default: every core) parallelise SentencePiece's
    counting and merges without changing the model. Writes the model file to
    ``output`` (any filesystem) and returns the path; no text, or text SentencePiece
    cannot train on, is a ``ValueError``.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab size {vocab_size} is too small: byte fallback alone needs 259 ids")
    if input_sentence_size < 0:
        raise ValueError(f"input sentence size must be >= 0 (0: every sentence), got {input_sentence_size}")
    num_threads = (os.cpu_count() or 1) if num_threads is None else num_threads
    if num_threads < 1:
        raise ValueError(f"threads must be >= 1, got {num_threads}")
    fed = 0

    def sentences() -> Iterator[str]:
        nonlocal fed
        for text in texts:
            for piece in training_pieces(text):
                fed += 1
                yield piece

    if not input_sentence_size:
        chosen = sentences()
    elif shuffle_input_sentence:
        chosen = _drain(sample_sentences(sentences(), input_sentence_size))
    else:
        chosen = itertools.islice(sentences(), input_sentence_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chosen,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:  # SentencePiece reports everything as RuntimeError
        if not fed:
            raise ValueError("no text to train the tokenizer on") from None
        raise ValueError(f"SentencePiece could not train on {fed} sentences: {error}") from None
    storage.write_atomically(output, _without_field(model.getvalue(), TRAINER_SPEC, NUM_THREADS))
    return output


def sample_sentences(sentences: Iterable[str], size: int, seed: int = SAMPLE_SEED) -> list[str]:
    """A uniform sample of ``size`` sentences of a stream of any length, in one pass, holding only the sample
    (reservoir sampling, Vitter's algorithm R); all of them, in order, when there are no more than ``size``."""
    rng = random.Random(seed)
    kept: list[str] = []
    for seen, sentence in enumerate(sentences):
        if seen < size:
            kept.append(sentence)
        elif (slot := rng.randrange(seen + 1)) < size:
            kept[slot] = sentence
    return kept


def _drain(items: list[str]) -> Iterator[str]:
    """``items`` in order, each released once SentencePiece has copied it."""
    for index in range(len(items)):
        item, items[index] = items[index], None
        yield item


# The model file embeds its TrainerSpec, thread count included; that field is dropped so
# that the file (and its sha256, which manifests record) does not depend on the machine.
TRAINER_SPEC, NUM_THREADS = 2, 16  # field numbers in sentencepiece_model.proto


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _fields(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """``(field number, raw key+value bytes, payload of a length-delimited field)`` of a protobuf message."""
    at = 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        wire = key & 7
        payload = b""
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _varint(data, at)
            payload, at = data[at:at + length], at + length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, data[start:at], payload


def _without_field(model: bytes, message: int, field: int) -> bytes:
    """``model`` with ``field`` removed from its sub-message ``message``."""
    out = bytearray()
    for number, raw, payload in _fields(model):
        if number != message:
            out += raw
            continue
        inner = b"".join(r for n, r, _ in _fields(payload) if n != field)
        out += _encode_varint(message << 3 | 2) + _encode_varint(len(inner)) + inner
    return bytes(out)
