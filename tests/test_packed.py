"""The packed record format: exact round trip, compact layout, malformed or damaged bytes rejected."""

import struct
import tracemalloc
import zlib

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


def reseal(record: bytes | bytearray) -> bytes:
    """A record edited in place with its checksum recomputed: what a bug (not damage) would write."""
    body = bytes(record[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


@given(examples(), st.data())
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_is_a_value_error(example, data):
    record = bytearray(packed.encode(**example))
    bit = data.draw(st.integers(0, 8 * len(record) - 1))
    record[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ValueError):
        packed.decode(bytes(record))


@given(examples(), st.data())
@settings(max_examples=200, deadline=None)
def test_resealed_edits_decode_to_full_length_arrays_or_raise_value_error(example, data):
    # Behind the checksum the layout is still validated: no other exception, no wrong-sized field.
    record = bytearray(packed.encode(**example))
    offset = data.draw(st.integers(8, len(record) - 5))  # past magic and version, before the checksum
    record[offset] = data.draw(st.integers(0, 255))
    try:
        decoded = packed.decode(reseal(record), seq_len=len(example["tokens"]))
    except ValueError:
        return
    assert {v.shape for v in decoded.values()} == {(len(example["tokens"]),)}


def _seq_len_bit_flipped(bit: int) -> bytes:
    record = bytearray(packed.encode(**packed.from_segments([], 1024)))
    record[8 + bit // 8] ^= 1 << (bit % 8)
    return bytes(record)


@pytest.mark.parametrize("bit", [0, 10, 20, 31])
def test_a_flipped_length_bit_is_refused_before_anything_is_allocated(bit):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="CRC-32"):
            packed.decode(_seq_len_bit_flipped(bit))
        with pytest.raises(ValueError, match="seq_len 1024"):
            packed.decode(reseal(_seq_len_bit_flipped(bit)), seq_len=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_records_of_another_length_than_the_manifests_are_refused():
    segment = {"tokens": np.arange(5), "vision_mask": np.zeros(5, bool), "loss_weights": np.ones(5, np.float32)}
    record = packed.encode(**packed.from_segments([segment], 1024))
    assert packed.decode(record, seq_len=1024)["tokens"].shape == (1024,)
    with pytest.raises(ValueError, match="sequence length 1024, not the expected seq_len 512"):
        packed.decode(record, seq_len=512)


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
    with pytest.raises(ValueError, match="version 9; this code reads version 2"):
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
        packed.decode(reseal(record))


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
