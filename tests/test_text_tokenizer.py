"""The SentencePiece wrapper never adds special tokens by itself; training copes with one-line books."""

import json
import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration import cli
from pipelines.tokens import text_tokenizer
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer


def test_encoding_adds_no_bos_or_eos(tokenizer_path):
    tokenizer = TextTokenizer(tokenizer_path)
    (ids,) = tokenizer.encode_batch(["The river remembered the long road."])
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "The river remembered the long road."


def test_framing_policy_is_explicit(tokenizer_path):
    tokenizer = TextTokenizer(tokenizer_path)
    ids = tokenizer.encode("a quiet child")
    framed = tokenizer.frame(ids, SpecialTokens())
    assert framed[0] == tokenizer.bos_id and framed[-1] == tokenizer.eos_id
    np.testing.assert_array_equal(framed[1:-1], ids)
    np.testing.assert_array_equal(tokenizer.frame(ids, SpecialTokens(bos=False, eos=False)), ids)


def test_llama_special_ids_and_byte_fallback(tokenizer_path):
    tokenizer = TextTokenizer(tokenizer_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 512)
    assert tokenizer.decode(tokenizer.encode("Ωμέγα ✓")) == "Ωμέγα ✓"  # unseen characters survive as bytes


def test_tokenizer_pickles_with_its_model(tokenizer_path):
    tokenizer = pickle.loads(pickle.dumps(TextTokenizer(tokenizer_path)))
    assert tokenizer.sha256 == TextTokenizer(tokenizer_path).sha256
    assert len(tokenizer.encode("the city")) > 0


def test_training_refuses_a_vocabulary_too_small_for_byte_fallback(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        text_tokenizer.train(["some text"], 100, str(tmp_path / "tok.model"))


def _one_line_books(count: int, sentences: int, seed: int = 0) -> list[str]:
    """Books of ``sentences`` short sentences each, all on one line (the JSON-lines shape)."""
    rng = random.Random(seed)
    words = ["river", "stone", "lantern", "harbour", "orchard", "winter", "letter", "morning", "silver", "garden"]
    return [" ".join(" ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + rng.choice(".!?")
                     for _ in range(sentences)) for _ in range(count)]


@given(st.lists(st.text(st.characters(codec="utf-8"), max_size=3000) | st.sampled_from(_one_line_books(2, 200)),
                max_size=3), st.sampled_from([64, 256, 4096]))
@settings(max_examples=60, deadline=None)
def test_training_pieces_fit_the_limit_and_lose_only_whitespace(parts, max_bytes):
    text = "\n".join(parts)
    pieces = list(text_tokenizer.training_pieces(text, max_bytes))
    assert all(0 < len(p.encode()) <= max_bytes and p.strip() for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_long_lines_are_cut_at_sentence_ends():
    (book,) = _one_line_books(1, 300)
    pieces = list(text_tokenizer.training_pieces(book, 4096))
    assert len(book.encode()) > 4096 and len(pieces) == 300
    assert all(p[-1] in ".!?" for p in pieces)


def test_cli_trains_on_a_corpus_of_long_one_line_books(tmp_path, capsys):
    books = _one_line_books(6, 400)
    assert min(len(b.encode()) for b in books) > 10_000
    lines = [json.dumps({"id": str(i), "text": book}) for i, book in enumerate(books)] + ['{"id": "x", "text": null}']
    (tmp_path / "books.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "tok.model"
    argv = ["tokenizer", "train", "--input", str(tmp_path / "books.jsonl"), "--vocab-size", "400",
            "--output", str(output)]
    assert cli.main(argv) == 0
    assert "read 6 book(s); 1 record(s) skipped: missing_text 1" in capsys.readouterr().err
    tokenizer = TextTokenizer(str(output))
    assert tokenizer.vocab_size == 400 and tokenizer.decode(tokenizer.encode(books[0])) == books[0]
    assert len(tokenizer.encode("lantern harbour")) == 2  # its words were learnt


def test_cli_with_no_books_to_train_on_says_what_it_read(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": null}\n{oops\n')
    argv = ["tokenizer", "train", "--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "320", "--output",
            str(tmp_path / "tok.model")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no text to train the tokenizer on" in err and "invalid_json 1, missing_text 1" in err
    assert not (tmp_path / "tok.model").exists()
