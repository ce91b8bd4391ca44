"""LWM's vision-language layout, checked on records decoded from the packed byte format."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.kit import packing
from pipelines.tokens import media, vision_layout
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens import prompts
from pipelines.tokens.vision_layout import GENERATION, UNDERSTANDING, Markers
from pipelines.vision import examples
from pipelines.vision.examples import LayoutConfig
from schemas import packed, vocab

CAPTION = "a red circle on a white background"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def markers(tokenizer):
    return Markers.from_tokenizer(tokenizer, SpecialTokens())


def _codes(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab.VISION_CODEBOOK_SIZE, (frames, 16, 16), dtype=np.int32)


def _id_with(kind: str, config: LayoutConfig) -> str:
    return next(f"ex-{i}" for i in range(1000) if examples.direction(f"ex-{i}", config) == kind)


def _decoded(tokenizer, markers, config, example_id, codes, modality="image", seq_len=2048):
    """Lay the example out, pack it alone into a record, serialise, decode: its one segment's arrays."""
    parts = examples.example_parts(example_id, CAPTION, modality, config, tokenizer.encode)
    segment = examples.assemble((example_id, 0), parts, codes, markers, config)
    record = packed.decode(packed.encode(**packing.to_example([segment], seq_len)))
    used = record["segment_ids"] == 1
    assert used.sum() == len(segment) and not record["vision_mask"][~used].any()
    return {k: v[used] for k, v in record.items()}


def _split(record):
    """(text before the vision span, vision tokens, text after), checking the span is one run."""
    where = np.flatnonzero(record["vision_mask"])
    assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "vision tokens form one contiguous span"
    tokens = record["tokens"]
    return tokens[: where[0]], tokens[where[0] : where[-1] + 1], tokens[where[-1] + 1 :]


@pytest.mark.parametrize("frames", [1, 3])
def test_each_frame_is_256_codes_then_eof_and_the_last_eov(frames):
    codes = _codes(frames)
    tokens = vision_layout.vision_tokens(codes)
    assert tokens.dtype == np.int32 and len(tokens) == frames * 257
    per_frame = tokens.reshape(frames, 257)
    assert np.array_equal(per_frame[:, :256], codes.reshape(frames, 256))
    assert per_frame[:-1, 256].tolist() == [vocab.EOF_ID] * (frames - 1)
    assert per_frame[-1, 256] == vocab.EOV_ID


def test_vision_tokens_reject_bad_codes():
    with pytest.raises(ValueError, match="codes must be in"):
        vision_layout.vision_tokens(np.full((1, 16, 16), vocab.EOF_ID))
    with pytest.raises(ValueError, match="expected codes"):
        vision_layout.vision_tokens(np.zeros((0, 16, 16), np.int32))


@settings(max_examples=20, deadline=None)
@given(frames=st.integers(1, 4), kind=st.sampled_from([GENERATION, UNDERSTANDING]), modality=st.sampled_from(["image", "video"]),
       template=st.sampled_from(["plain", "chat"]), seed=st.integers(0, 1000))
def test_decoded_example_has_frames_markers_and_an_exact_vision_mask(tokenizer, markers, frames, kind, modality, template, seed):
    config = LayoutConfig(template=template)
    codes = _codes(frames, seed)
    record = _decoded(tokenizer, markers, config, _id_with(kind, config), codes, modality)
    before, vision, after = _split(record)
    assert len(vision) == 257 * frames
    assert np.count_nonzero(vision == vocab.EOF_ID) == frames - 1 and vision[-1] == vocab.EOV_ID
    assert np.array_equal(np.flatnonzero(vision >= vocab.VISION_CODEBOOK_SIZE) % 257, [256] * frames)
    assert record["tokens"][0] == tokenizer.bos_id and record["tokens"][-1] == tokenizer.eos_id
    assert not np.isin(record["tokens"][1:-1][~record["vision_mask"][1:-1]], [tokenizer.bos_id, tokenizer.eos_id]).any()
    assert tokenizer.decode(before[1:]).endswith(vocab.VISION_OPEN)
    assert tokenizer.decode(after[:-1]).startswith(vocab.VISION_CLOSE)
    text_before, text_after = tokenizer.decode(before[1:]), tokenizer.decode(after[:-1])
    if kind == GENERATION:
        assert CAPTION in text_before and CAPTION not in text_after
    else:
        assert CAPTION in text_after and CAPTION not in text_before
    if template == "chat":
        assert text_before.startswith(prompts.SYSTEM_PROMPT)
        assert f"{modality} of {CAPTION}" in text_before if kind == GENERATION else f"the {modality}" in text_before


def test_loss_weights_per_modality_and_side(tokenizer, markers):
    codes = _codes(2)
    for kind in (GENERATION, UNDERSTANDING):
        for condition_loss in (True, False):
            config = LayoutConfig(text_weight=0.5, vision_weight=2.0, condition_loss=condition_loss)
            record = _decoded(tokenizer, markers, config, _id_with(kind, config), codes)
            weights, vision_mask = record["loss_weights"], record["vision_mask"]
            before, vision, after = (len(p) for p in _split(record))
            assert weights[0] == 0.0  # the first token has no context
            assert np.all(weights[vision_mask] == (2.0 if condition_loss or kind == GENERATION else 0.0))
            caption_side = weights[1:before - len(markers.vision_open)] if kind == GENERATION else weights[before + vision + len(markers.vision_close):-1]
            expected_caption = 0.5 if condition_loss or kind == UNDERSTANDING else 0.0
            assert np.all(caption_side == expected_caption)
            assert weights[-1] == 0.5  # EOS is always learnt


def test_direction_is_stable_and_follows_the_fraction():
    config = LayoutConfig(generation_fraction=0.3)
    ids = [f"clip-{i}" for i in range(4000)]
    kinds = [examples.direction(i, config) for i in ids]
    assert kinds == [examples.direction(i, config) for i in ids]
    assert 0.27 < kinds.count(GENERATION) / len(ids) < 0.33
    assert {examples.direction(i, LayoutConfig(generation_fraction=0.0)) for i in ids} == {UNDERSTANDING}
    assert {examples.direction(i, LayoutConfig(generation_fraction=1.0)) for i in ids} == {GENERATION}
    salted = [examples.direction(i, LayoutConfig(generation_fraction=0.3, salt="other")) for i in ids]
    assert salted != kinds


def test_no_bos_or_eos_when_the_policy_says_so(tokenizer):
    markers = Markers.from_tokenizer(tokenizer, SpecialTokens(bos=False, eos=False))
    config = LayoutConfig(generation_fraction=0.0)
    record = _decoded(tokenizer, markers, config, "x", _codes(1))
    assert tokenizer.bos_id not in record["tokens"] and tokenizer.eos_id not in record["tokens"]
    assert record["loss_weights"][0] == 0.0


@settings(max_examples=50, deadline=None)
@given(frames=st.integers(1, 40), limit=st.integers(0, 12000))
def test_frames_that_fit_is_the_most_that_fit(markers, frames, limit):
    parts = [(np.arange(17, dtype=np.int32), False), (vision_layout.VISION, True)]
    fit = vision_layout.frames_that_fit(parts, markers, frames, limit)
    length = lambda f: vision_layout.text_length(parts, markers) + 257 * f
    assert 0 <= fit <= frames
    assert fit == 0 or length(fit) <= limit
    assert fit == frames or length(fit + 1) > limit


@given(total=st.integers(1, 500), data=st.data())
def test_frames_kept_to_fit_follow_lwms_rule(total, data):
    keep = data.draw(st.integers(1, total))
    chosen = media.sample_frame_indices(total, keep)
    assert len(chosen) == keep and np.all(np.diff(chosen) > 0) and chosen[0] == 0
    assert keep == 1 or chosen[-1] == total - 1
    assert np.array_equal(chosen, np.linspace(0, total - 1, keep).astype(int))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_the_chat_template_is_the_vision_chat_prompt_token_for_token(tokenizer, markers, modality):
    """A chat understanding example, up to its caption, is exactly what ``lwm chat`` feeds for that question."""
    config = LayoutConfig(template="chat", generation_fraction=0.0)
    codes = _codes(2)
    record = _decoded(tokenizer, markers, config, "x", codes, modality)
    question = prompts.description_request(modality)
    tokens, mask = vision_layout.conversation([vision_layout.Turn("user", question, vision=True)], codes,
                                              tokenizer.encode, markers)
    assert record["tokens"][:len(tokens)].tolist() == tokens.tolist()
    assert record["vision_mask"][:len(tokens)].tolist() == mask.tolist()
    caption = tokenizer.encode(CAPTION).tolist() + [tokenizer.eos_id]
    assert record["tokens"][len(tokens):].tolist() == caption
    assert tokenizer.decode(tokens[1:np.flatnonzero(mask)[0]]).startswith(f"{prompts.OPENING} {question}")


def test_a_conversation_has_one_bos_an_eos_after_each_ended_answer_and_later_turns_appended(tokenizer, markers):
    turns = [vision_layout.Turn("user", "What is it?", vision=True), vision_layout.Turn("assistant", (40, 41)),
             vision_layout.Turn("user", "And then?"), vision_layout.Turn("assistant", (42,), ended=False),
             vision_layout.Turn("user", "Why?")]
    tokens, mask = vision_layout.conversation(turns, _codes(1), tokenizer.encode, markers)
    later = [tokenizer.encode(t).tolist() for t in (" USER: And then? ASSISTANT:", " USER: Why? ASSISTANT:")]
    first, _ = vision_layout.conversation(turns[:1], _codes(1), tokenizer.encode, markers)
    assert tokens.tolist() == first.tolist() + [40, 41, tokenizer.eos_id] + later[0] + [42] + later[1]
    assert tokens.tolist().count(tokenizer.bos_id) == 1 and mask.sum() == 257
    with pytest.raises(ValueError, match="one image or video"):
        vision_layout.conversation(turns[:1] * 2, _codes(1), tokenizer.encode, markers)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="generation_fraction"):
        LayoutConfig(generation_fraction=1.5)
    with pytest.raises(ValueError, match="template"):
        LayoutConfig(template="fancy")
    with pytest.raises(ValueError, match="non-negative"):
        LayoutConfig(vision_weight=-1)
