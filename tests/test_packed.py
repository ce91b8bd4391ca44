"""The packed record format: exact round trip, compact layout, malformed bytes rejected."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import packed


@st.composite
def examples(draw, max_len=64):
    seq_len = draw(st.integers(1, max_len))
    lengths, room = [], seq_len
    while room and draw(st.booleans()):
        length = draw(st.integers(1, room))
        lengths.append(length)
        room -= length
    segments = []
    vocab = draw(st.sampled_from([300, 32000, 70000]))
    for length in lengths:
        segments.append(
            {
                "tokens": np.array(draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))),
                "vision_mask": np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length))),
                "loss_weights": np.array(
                    draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0]), min_size=length, max_size=length)), np.float32
                ),
            }
        )
    return packed.from_segments(segments, seq_len)


@given(examples())
@settings(max_examples=200, deadline=None)
def test_decode_inverts_encode(example):
    decoded = packed.decode(packed.encode(**example))
    assert tuple(decoded) == packed.FIELDS
    for name in packed.FIELDS:
        assert decoded[name].dtype == example[name].dtype
        np.testing.assert_array_equal(decoded[name], example[name])


@given(examples(), st.data())
@settings(max_examples=200, deadline=None)
def test_truncated_or_extended_bytes_are_rejected(example, data):
    record = packed.encode(**example)
    cut = data.draw(st.integers(0, len(record) - 1))
    with pytest.raises(ValueError):
        packed.decode(record[:cut])
    with pytest.raises(ValueError):
        packed.decode(record + data.draw(st.binary(min_size=1, max_size=8)))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_decode_or_raise_value_error(data):
    try:
        packed.decode(data)
    except ValueError:
        pass


def test_wrong_version_is_rejected_with_its_number():
    record = bytearray(packed.encode(**packed.from_segments([], 4)))
    record[4] = 9
    with pytest.raises(ValueError, match="version 9"):
        packed.decode(bytes(record))


def test_wrong_magic_is_rejected():
    record = packed.encode(**packed.from_segments([], 4))
    with pytest.raises(ValueError, match="magic"):
        packed.decode(b"XXXX" + record[4:])


def test_runs_out_of_range_are_rejected():
    segment = {"tokens": np.arange(3), "vision_mask": np.ones(3, bool), "loss_weights": np.ones(3, np.float32)}
    record = bytearray(packed.encode(**packed.from_segments([segment], 8)))
    vision_run = 24 + 4 + 3 * 2  # header, one segment length, three uint16 tokens
    struct.pack_into("<II", record, vision_run, 2, 5)  # a run past the 3 used tokens
    with pytest.raises(ValueError, match="vision runs"):
        packed.decode(bytes(record))


def test_small_vocabularies_use_two_bytes_per_token():
    tokens = np.arange(1000) % 32000
    segment = {"tokens": tokens, "vision_mask": np.zeros(1000, bool), "loss_weights": np.ones(1000, np.float32)}
    record = packed.encode(**packed.from_segments([segment], 1024))
    assert len(record) < 2 * 1000 + 64


def test_segment_ids_and_positions_derive_from_lengths():
    ids, positions = packed.segment_arrays(np.array([3, 2]), 7)
    assert ids.tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e["positions"].__setitem__(1, 5), "positions"),
        (lambda e: e["segment_ids"].__setitem__(0, 2), "segment_ids"),
        (lambda e: e["tokens"].__setitem__(7, 3), "padding"),
        (lambda e: e["loss_weights"].__setitem__(7, 1.0), "padding"),
    ],
)
def test_encode_refuses_what_the_format_cannot_represent(change, message):
    segment = {"tokens": np.arange(1, 4), "vision_mask": np.zeros(3, bool), "loss_weights": np.ones(3, np.float32)}
    example = packed.from_segments([segment, segment], 8)
    change(example)
    with pytest.raises(ValueError, match=message):
        packed.encode(**example)
