"""SentencePiece text tokenizer: load any model file, encode in batches, never add BOS/EOS.

LWM_FACTS warns that the released code let the tokenizer insert BOS implicitly
inside sequences. Here encoding never adds special tokens; the pipeline's policy
(:class:`SpecialTokens`) adds them explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Which special tokens frame a document (default: BOS at its start, EOS at its end)."""

    bos: bool = True
    """Add BOS at each document's start."""
    eos: bool = True
    """Add EOS at each document's end."""


class TextTokenizer:
    """A SentencePiece model (Llama-2's ``tokenizer.model`` included) read from any Beam filesystem."""

    def __init__(self, path: str):
        with FileSystems.open(path) as f:
            self.__setstate__({"path": path, "model": f.read()})

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


def train(texts: Iterable[str], vocab_size: int, output: str, *, model_type: str = "bpe") -> str:
    """Train a Llama-style SentencePiece model (BPE, byte fallback, unk 0 / bos 1 / eos 2) offline.

    Writes the model file to ``output`` (any Beam filesystem) and returns the path.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab size {vocab_size} is too small: byte fallback alone needs 259 ids")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for text in texts for line in text.splitlines() if line.strip()),
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
        num_threads=1,
        minloglevel=2,
    )
    with FileSystems.create(output) as f:
        f.write(model.getvalue())
    return output
