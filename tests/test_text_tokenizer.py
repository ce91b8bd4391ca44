"""The SentencePiece wrapper never adds special tokens by itself."""

import pickle

import numpy as np
import pytest

from pipelines.text_tokenizer import SpecialTokens, TextTokenizer


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
    from pipelines import text_tokenizer

    with pytest.raises(ValueError, match="too small"):
        text_tokenizer.train(["some text"], 100, str(tmp_path / "tok.model"))
