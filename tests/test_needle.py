"""Needle in a haystack and variable tracking: exact prompt lengths, needle placement, scoring, the CLI."""

import dataclasses
import json
import random
import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orchestration import cli
from trainer.evaluation.synthetic_books import book
from pipelines.tokens import prompts
from pipelines.tokens.text_tokenizer import TextTokenizer
from trainer import checkpoint
from trainer.evaluation import haystack as needle
from trainer.model import PRESETS, init_params


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return needle.Haystack([book(random.Random(i), 60) for i in range(4)], tokenizer.encode)


def _trial(tokenizer, haystack, length, depth, **config):
    cfg = needle.NeedleConfig(lengths=(length,), depths=(depth,), **config)
    return needle.build_trial(haystack, tokenizer.encode, tokenizer.bos_id, cfg, length, depth, 0)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(120, 900), depth=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))
def test_needle_sits_at_the_requested_depth_on_a_sentence_boundary_in_a_prompt_of_exact_length(
        tokenizer, haystack, length, depth):
    trial = _trial(tokenizer, haystack, length, depth)
    assert len(trial.prompt) == length and trial.prompt[0] == tokenizer.bos_id
    start = 1 + len(tokenizer.encode(prompts.OPENING))
    inserted = list(tokenizer.encode(prompts.needle_sentence("X", trial.expected[0])))
    suffix = len(tokenizer.encode(prompts.question_closing(prompts.needle_question('X'))))
    offset = trial.needle_offsets[0]
    city_and_number = tokenizer.decode(trial.prompt[offset:offset + len(inserted) + 8])
    assert city_and_number.startswith("The special magic ") and trial.expected[0] in city_and_number
    haystack_tokens = length - start - suffix - (len(inserted) + 8)  # city names are a few tokens
    longest = max(map(len, haystack.sentences))
    assert abs((offset - start) - depth * haystack_tokens) <= longest + 8
    before = tokenizer.decode(trial.prompt[start:offset]).rstrip()
    assert offset == start or before.endswith((".", "!", "?"))


def test_trials_are_deterministic_for_a_seed_and_cities_differ_from_training_data(tokenizer, haystack):
    one = _trial(tokenizer, haystack, 400, 0.5)
    assert one == _trial(tokenizer, haystack, 400, 0.5)
    assert one.prompt != _trial(tokenizer, haystack, 400, 0.5, seed=1).prompt
    assert not set(needle.EVAL_CITIES) & set(needle.TRAIN_CITIES)


def test_multi_needle_inserts_k_and_asks_m(tokenizer, haystack):
    trial = _trial(tokenizer, haystack, 600, 0.25, needles=4, ask=2)
    text = tokenizer.decode(trial.prompt)
    assert text.count("The special magic") == 4 and text.count("What is the special magic") == 2
    assert len(trial.expected) == 2 and len(trial.needle_offsets) == 4
    assert all(e in text for e in trial.expected)


def test_variable_tracking_chains_assign_in_order_and_ask_for_every_name(tokenizer, haystack):
    trial = _trial(tokenizer, haystack, 700, 0.5, task="variable-tracking", hops=3, needles=2)
    text = tokenizer.decode(trial.prompt)
    names = trial.expected
    assert len(names) == 4 and text.count("VAR ") == 8
    positions = [text.index(f"VAR {n} =") for n in names]
    assert positions == sorted(positions)
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = {a}." in text
    assert needle.score(f"They are: {', '.join(names)}.", names)
    assert not needle.score(f"They are: {', '.join(names[:3])}.", names)


def test_an_answer_is_correct_iff_every_expected_value_appears_whole():
    assert needle.score("The special magic Lima number is: 1234567.", ["1234567"])
    assert not needle.score("The number is 12345678.", ["1234567"])
    assert not needle.score("1234567 and more", ["1234567", "7654321"])
    assert needle.score("7654321, 1234567", ["1234567", "7654321"])


def test_too_short_lengths_and_bad_grids_are_refused(tokenizer, haystack):
    with pytest.raises(ValueError, match="too short"):
        _trial(tokenizer, haystack, 20, 0.5)
    with pytest.raises(ValueError, match="ask"):
        needle.NeedleConfig(needles=1, ask=2)
    with pytest.raises(ValueError, match="depths"):
        needle.NeedleConfig(depths=(1.5,))


def test_lwm_eval_needle_writes_results_table_and_heatmap(tmp_path, tokenizer_path, capsys):
    config = dataclasses.replace(PRESETS["tiny"], vision_vocab_size=0, max_position_embeddings=512)
    checkpoint.save_params(tmp_path / "ckpt", init_params(config, jax.random.key(0)), config)
    out = tmp_path / "needle"
    argv = ["eval", "needle", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tokenizer_path, "--lengths",
            "128,192", "--depths", "0,1", "--rounds", "2", "--max-tokens", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["length"], r["depth"]) for r in records] == [(128, 0.0)] * 2 + [(128, 1.0)] * 2 + [(192, 0.0)] * 2 + \
        [(192, 1.0)] * 2
    assert all(isinstance(r["expected"], str) and len(r["expected"]) == 7 and r["needle_offset"] > 0
               and isinstance(r["correct"], bool) for r in records)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "depth \\ length" in printed and "heatmap.png" in printed
    too_long = ["eval", "needle", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tokenizer_path, "--lengths",
                "256,600", "--out", str(tmp_path / "refused")]
    assert cli.main(too_long) == 2 and not (tmp_path / "refused").exists()
    assert "600 prompt tokens + 48 new tokens = 648 exceeds the checkpoint's max_position_embeddings 512" in \
        capsys.readouterr().err


def test_training_haystacks_hold_one_training_city_needle_and_never_an_eval_city(tokenizer, haystack):
    texts = needle.training_texts(haystack, tokenizer, 6, min_length=60, max_length=300)
    assert len(set(texts)) == 6
    for text in texts:
        cities = [c for c in needle.TRAIN_CITIES + needle.EVAL_CITIES if f"magic {c} number is: " in text]
        assert len(cities) == 1 and cities[0] in needle.TRAIN_CITIES
        assert 60 - 2 <= len(tokenizer.encode(text)) <= 300 + 2  # decoded and re-encoded: a piece may merge
        assert "ASSISTANT" not in text and "USER" not in text


def test_warmup_haystacks_are_a_needle_and_a_few_words_with_numbers_of_the_asked_digits(tokenizer, haystack):
    texts = needle.training_texts(haystack, tokenizer, 40, min_length=1, max_length=40, digits=(1, 3), seed=5)
    numbers = [re.search(r"number is: (\d+)\.", text).group(1) for text in texts]
    assert {len(n) for n in numbers} == {1, 2, 3}
    sentences = [prompts.needle_sentence(c, n) for c, n in
                 ((re.search(r"magic (.+?) number", t).group(1), n) for t, n in zip(texts, numbers))]
    assert all(len(tokenizer.encode(t)) > len(tokenizer.encode(s)) for t, s in zip(texts, sentences))  # never bare
    assert max(len(tokenizer.encode(t)) for t in texts) <= max(40, *map(len, map(tokenizer.encode, sentences))) + 3


@pytest.mark.parametrize("lengths, digits", [((40, 1), (1, 7)), ((0, 40), (1, 7)), ((1, 40), (7, 1)), ((1, 40), (0, 3))])
def test_training_haystacks_refuse_an_empty_or_nonpositive_range_naming_it(tokenizer, haystack, lengths, digits):
    (low, high), (fewest, most) = lengths, digits
    with pytest.raises(ValueError, match=rf"got lengths {low}\.\.{high}, digits {fewest}\.\.{most}"):
        needle.training_texts(haystack, tokenizer, 1, min_length=low, max_length=high, digits=digits)


@pytest.mark.parametrize("line, reason", [("{not json", "invalid_json"), ('{"id": "a"}', "missing_text")])
def test_a_bad_haystack_line_is_a_one_line_error_naming_it(tmp_path, tokenizer_path, capsys, line, reason):
    haystack = tmp_path / "hay.jsonl"
    haystack.write_text(json.dumps({"id": "ok", "text": "A sentence."}) + "\n" + line + "\n")
    argv = ["eval", "needle", "--ckpt", str(tmp_path / "no_ckpt"), "--tokenizer", tokenizer_path,
            "--haystack", str(haystack), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert f"lwm: error: haystack {haystack}:2: {reason}" in capsys.readouterr().err


def test_the_heatmap_leaves_the_processs_plotting_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    grid = [[1.0, 0.5], [float("nan"), 0.0]]
    path = needle.heatmap(np.asarray(grid), (512, 1024), (0.0, 1.0), str(tmp_path / "h.png"), title="t", xlabel="x")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before
