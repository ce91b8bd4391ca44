"""Synthetic needle-retrieval training contexts from the demo's books, so the tiny demo model learns
to answer ``lwm eval needle``'s question.

Each document is a haystack as the eval builds it (``trainer.evaluation.haystack``: a window of book sentences with
"The special magic {city} number is: {7 digits}." at a random depth). ``lwm data chat-qa --generator
needle`` turns each into the eval's prompt (LWM's chat template, the haystack, "What is the special
magic {city} number?") followed by the answer, with loss on the answer only. Cities come from
``trainer.evaluation.haystack.TRAIN_CITIES``, never the eval's, and numbers from a seed namespace of their own.
"""

from __future__ import annotations

import json
import pathlib

from pipelines.tokens.text_tokenizer import TextTokenizer
from trainer.evaluation import haystack


def write_retrieval(path: pathlib.Path, books: pathlib.Path, tokenizer_path: str, count: int, *, seed: int = 1,
                    min_length: int = 64, max_length: int = 512, digits: tuple[int, int] = (7, 7)) -> pathlib.Path:
    """A JSON-lines corpus (``id``, ``text``, ``source``) of ``count`` haystacks of ``min_length``..``max_length``
    tokens with one needle each (numbers of ``digits[0]``..``digits[1]`` digits), cut from the books in
    ``books`` (JSON lines)."""
    with open(books) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tokenizer = TextTokenizer(tokenizer_path)
    filler = haystack.Haystack(texts, tokenizer.encode)
    documents = haystack.training_texts(filler, tokenizer, count, min_length=min_length, max_length=max_length,
                                      digits=digits, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for index, text in enumerate(documents):
            out.write(json.dumps({"id": f"retrieval-{seed}-{index:05d}", "text": text, "source": "synthetic"}) + "\n")
    return path
