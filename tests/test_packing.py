"""Packing: every token once, in order, in one segment; sequences never overflow; padding at the end."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.kit import packing
from schemas import packed


def _documents(lengths):
    return {f"doc{i}": np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)}


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(8, 128))
@settings(max_examples=150, deadline=None)
def test_every_token_appears_once_in_order_in_one_segment(lengths, seq_len):
    documents = _documents(lengths)
    segments = [p for d, t in documents.items() for p in packing.cut(packing.text_segment(d, t), seq_len)]
    sequences = packing.pack(segments, seq_len)
    pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for sequence in sequences:
        example = packed.decode(packed.encode(**packing.to_example(sequence, seq_len)))
        ids, positions = example["segment_ids"], example["positions"]
        assert len(ids) == seq_len
        used = int(np.count_nonzero(ids))
        assert np.all(ids[used:] == 0) and np.all(example["tokens"][used:] == 0)  # padding only at the end
        assert np.all(np.diff(ids[:used]) >= 0)
        for segment_id, segment in enumerate(sequence, start=1):
            where = np.flatnonzero(ids == segment_id)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            np.testing.assert_array_equal(example["tokens"][where], segment.tokens)
            assert example["loss_weights"][where][0] == 0.0
            pieces.setdefault(segment.key[0], []).append((segment.key[1], example["tokens"][where]))
    for doc_id, tokens in documents.items():
        ordered = [t for _, t in sorted(pieces[doc_id], key=lambda p: p[0])]
        np.testing.assert_array_equal(np.concatenate(ordered), tokens)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(50, 100))
@settings(max_examples=100, deadline=None)
def test_best_fit_decreasing_never_overflows_and_places_every_item_once(lengths, capacity):
    bins = packing.best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # No two bins could be merged: best fit leaves at most one bin at most half full.
    assert sum(sum(lengths[i] for i in b) <= capacity // 2 for b in bins) <= 1


@given(st.lists(st.integers(1, 60), min_size=1, max_size=30), st.randoms())
@settings(max_examples=50, deadline=None)
def test_packing_does_not_depend_on_input_order(lengths, rng):
    segments = [packing.text_segment(d, t) for d, t in _documents(lengths).items()]
    shuffled = list(segments)
    rng.shuffle(shuffled)
    keys = [[s.key for s in seq] for seq in packing.pack(segments, 64)]
    assert keys == [[s.key for s in seq] for seq in packing.pack(shuffled, 64)]


def test_cut_pieces_restart_their_loss_weights():
    pieces = packing.cut(packing.text_segment("d", np.arange(10), weight=0.5), 4)
    assert [len(p) for p in pieces] == [4, 4, 2]
    assert [p.key for p in pieces] == [("d", 0), ("d", 4), ("d", 8)]
    assert [p.splittable for p in pieces] == [False, False, True]
    assert all(p.loss_weights[0] == 0 and np.all(p.loss_weights[1:] == 0.5) for p in pieces)


def test_a_vision_span_is_never_cut():
    segment = packing.Segment(("v", 0), np.arange(10), np.ones(10, bool), np.ones(10, np.float32))
    with pytest.raises(ValueError, match="never cut"):
        packing.cut(segment, 4)


def test_tails_of_long_documents_fill_the_gaps_left_by_whole_documents():
    lengths = [700, 600, 300, 2500, 3300, 1900]  # three fit whole, three are cut at 1024
    segments = [p for d, t in _documents(lengths).items() for p in packing.cut(packing.text_segment(d, t), 1024)]
    sequences = packing.pack(segments, 1024, min_piece=16)
    fill = [sum(len(s) for s in seq) for seq in sequences]
    assert all(f == 1024 for f in fill[:-1]) and sum(fill) == sum(lengths)
    whole = {f"doc{i}" for i in range(3)}
    for sequence in sequences:  # documents that fit are never split
        assert all(len(s) == lengths[int(s.key[0][3:])] for s in sequence if s.key[0] in whole)


def test_no_fill_piece_is_shorter_than_min_piece():
    segments = [packing.text_segment("short", np.arange(1000))] + packing.cut(packing.text_segment("long", np.arange(1500)), 1024)
    sequences = packing.pack(segments, 1024, min_piece=100)
    assert [[len(s) for s in seq] for seq in sequences] == [[1024], [1000], [476]]


def test_the_module_docstring_example_is_what_pack_does():
    text = lambda key, ids: packing.text_segment(key, np.array(ids))
    c = packing.cut(text("c", [1, 31, 32, 33, 34, 35, 36, 37, 38, 39, 2]), 8)
    sequences = packing.pack([text("a", [1, 11, 12, 13, 2]), text("b", [1, 21, 22, 2]), *c], 8, min_piece=2)
    examples = [packing.to_example(s, 8) for s in sequences]
    assert [e["tokens"].tolist() for e in examples] == [
        [1, 31, 32, 33, 34, 35, 36, 37], [1, 11, 12, 13, 2, 38, 39, 2], [1, 21, 22, 2, 0, 0, 0, 0]]
    assert examples[1]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert examples[1]["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert examples[1]["loss_weights"].tolist() == [0, 1, 1, 1, 1, 0, 1, 1]


def test_groups_pack_alone_only_where_the_bucket_gives_each_16_sequences():
    per_group = 1024 * packing.SEQUENCES_PER_GROUP
    assert packing.packed_in_place({0: 3_000, 5: 4_000}, 1024, 16) == []  # the demo's image-text set: all leftovers
    assert packing.packed_in_place({g: per_group - 1 for g in range(16)}, 1024, 16) == []
    assert packing.packed_in_place({3: 16 * per_group, 1: 10}, 1024, 16) == [1, 3]  # by the bucket, not the group
    assert packing.packed_in_place({0: 10}, 1024, 1) == [0]  # one group: always packed whole


def test_a_group_gives_up_its_least_full_sequence_unless_every_one_is_full():
    text = lambda key, n: packing.text_segment(key, np.ones(n, np.int32))
    full, half, third = [text("a", 8)], [text("b", 4)], [text("c", 3), text("d", 1)]
    assert packing.split_leftover([full, third, half], 8) == ([full, half], third)
    assert packing.split_leftover([full, full], 8) == ([full, full], [])
    assert packing.split_leftover([], 8) == ([], [])


@given(st.lists(st.integers(1, 300), min_size=1, max_size=60), st.integers(1, 4), st.integers(16, 64), st.randoms())
@settings(max_examples=100, deadline=None)
def test_hash_group_packing_packs_every_token_once_whatever_the_order(lengths, hash_groups, seq_len, rng):
    documents = _documents(lengths)
    segments = [p for d, t in documents.items() for p in packing.cut(packing.text_segment(d, t), seq_len)]
    groups: dict[int, list[packing.Segment]] = {}
    for segment in segments:
        groups.setdefault(packing.hash_group(segment, hash_groups), []).append(segment)
    layout = lambda sequences: [[(s.key, s.tokens.tolist()) for s in sequence] for sequence in sequences]
    sequences = packing.pack_hash_groups(groups, seq_len, hash_groups)
    for members in groups.values():
        rng.shuffle(members)
    assert layout(packing.pack_hash_groups(groups, seq_len, hash_groups)) == layout(sequences)
    assert all(sum(map(len, sequence)) <= seq_len for sequence in sequences)
    packed_tokens: dict[str, list[tuple[int, np.ndarray]]] = {}
    for segment in (s for sequence in sequences for s in sequence):
        packed_tokens.setdefault(segment.key[0], []).append((segment.key[1], segment.tokens))
    for doc_id, tokens in documents.items():
        np.testing.assert_array_equal(np.concatenate([t for _, t in sorted(packed_tokens[doc_id], key=lambda p: p[0])]),
                                      tokens)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 70_000), max_size=300), st.booleans(), st.integers(0, 2**40), st.data())
def test_segments_survive_their_compact_encoding(tokens, splittable, offset, data):
    n = len(tokens)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    weights = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n)), np.float32)
    segment = packing.Segment(("doc é", offset), np.array(tokens, np.int32), mask, weights, splittable)
    decoded = packing.segment_from_bytes(packing.segment_to_bytes(segment))
    assert decoded.key == segment.key and decoded.splittable == splittable
    for field in ("tokens", "vision_mask", "loss_weights"):
        assert np.array_equal(getattr(decoded, field), getattr(segment, field))
        assert getattr(decoded, field).dtype == getattr(segment, field).dtype


def test_a_text_segment_encodes_in_about_two_bytes_per_token():
    segment = packing.text_segment("d", np.arange(32768) % 32000)
    assert len(packing.segment_to_bytes(segment)) < 2.01 * 32768  # 16-bit ids; mask and weights as runs
