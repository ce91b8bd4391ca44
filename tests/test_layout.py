"""Ring layouts (trainer/ring_layout.py): permutations, the per-row ``segments`` choice and its work model."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from trainer import ring_testing
from trainer import ring_layout as layout


def _row(lengths, seq_len):
    """Segment ids of one row packed from ``lengths`` (cut at seq_len), the rest padding."""
    ids = np.zeros(seq_len, np.int32)
    start = 0
    for i, n in enumerate(lengths, start=1):
        ids[start:start + n] = i
        start = min(start + n, seq_len)
    return ids


def _critical_path(row, perm, num_shards, block):
    return int(layout.ring_work(row[perm], perm, num_shards, block).max(axis=1).sum())


packings = st.lists(st.integers(1, 200), min_size=1, max_size=20)


@settings(max_examples=30, deadline=None)
@given(packings, st.sampled_from([2, 4, 8]))
def test_segments_order_is_a_permutation_keeping_natural_order_on_each_device(lengths, num_shards):
    row = _row(lengths, 256)
    perm = layout.segment_permutation(row, num_shards, 8)
    np.testing.assert_array_equal(np.sort(perm), np.arange(256))
    assert np.all(np.diff(perm.reshape(num_shards, -1), axis=1) > 0)


@settings(max_examples=30, deadline=None)
@given(packings, st.sampled_from([2, 4, 8]))
def test_segments_ring_is_never_longer_than_a_static_layout(lengths, num_shards):
    row = _row(lengths, 256)
    chosen = _critical_path(row, layout.segment_permutation(row, num_shards, 8), num_shards, 8)
    for name in layout.STATIC_LAYOUTS:
        assert chosen <= _critical_path(row, layout.layout_permutation(256, num_shards, name), num_shards, 8)


def test_one_causal_document_keeps_zigzag():
    row = np.ones(1024, np.int32)
    np.testing.assert_array_equal(layout.segment_permutation(row, 8, 16), layout.layout_permutation(1024, 8, "zigzag"))


def _log_uniform_row(seq_len, seed):
    """Documents of log-uniform length (64 tokens to seq_len / 4) packed in order, then padding."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(64), np.log(seq_len / 4), 64)).astype(int)
    return _row(lengths[np.cumsum(lengths) <= seq_len - seq_len // 16], seq_len)


def _block_tile_set(row, positions, perm, block):
    """The kernel's tiles of the laid-out row, as pairs of the natural-order blocks they join."""
    blocks = perm[::block] // block
    tiles = layout.block_tiles(row[perm], positions[perm], block)
    return {(blocks[q], blocks[k]) for q, k in zip(*np.nonzero(tiles))}


@settings(max_examples=25, deadline=None)
@given(packings, st.sampled_from([2, 4, 8]), st.booleans())
def test_segments_moves_whole_blocks_and_computes_contiguous_tiles(lengths, num_shards, restart_positions):
    """Blocks of the kernel's size move whole, so the ring computes exactly contiguous's tiles,
    with natural positions or positions restarting in each segment (as the loader's)."""
    row = _row(lengths, 256)
    starts = np.r_[0, np.flatnonzero(np.diff(row)) + 1]
    positions = np.arange(256) - np.repeat(starts, np.diff(np.r_[starts, 256])) if restart_positions else np.arange(256)
    perm = layout.segment_permutation(row, num_shards, 8, positions)
    chunks = perm.reshape(-1, 8)
    np.testing.assert_array_equal(chunks, chunks[:, :1] + np.arange(8))
    assert np.all(chunks[:, 0] % 8 == 0)
    natural = np.arange(256)
    assert _block_tile_set(row, positions, perm, 8) == _block_tile_set(row, positions, natural, 8)


def test_long_rows_move_runs_of_blocks_and_keep_contiguous_tiles():
    """1024 blocks: runs of consecutive blocks move together (one descent step stays cheap);
    the tiles are still contiguous's and the ring no longer than contiguous's or zigzag's."""
    row = _log_uniform_row(8192, seed=1)
    perm = layout.segment_permutation(row, 4, 8)
    natural = np.arange(8192)
    assert _block_tile_set(row, natural, perm, 8) == _block_tile_set(row, natural, natural, 8)
    for name in ("contiguous", "zigzag"):
        assert _critical_path(row, perm, 4, 8) <= _critical_path(row, layout.layout_permutation(8192, 4, name), 4, 8)


def test_segments_order_is_a_pure_function_of_the_row():
    row = _log_uniform_row(4096, seed=3)
    first = layout.segment_permutation(row, 8, 64)
    np.testing.assert_array_equal(layout.segment_permutation(row.copy(), 8, 64), first)
    np.testing.assert_array_equal(layout.batch_permutation(np.stack([row, row]), 8, "segments", 64), [first, first])


def test_packed_row_is_balanced_at_contiguous_tile_count():
    """The issue's goal at full size (P = 8, S = 32K, blocks of 512): critical path within 10%
    of the mean device's work, and no more tiles than contiguous."""
    row = _log_uniform_row(32768, seed=0)
    perm = layout.segment_permutation(row, 8, 512)
    work = layout.ring_work(row[perm], perm, 8, 512)
    contiguous = layout.ring_work(row, np.arange(32768), 8, 512)
    assert work.sum() == contiguous.sum()
    assert work.max(axis=1).sum() <= 1.1 * work.sum() / 8
    assert work.max(axis=1).sum() < contiguous.max(axis=1).sum()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.sampled_from(layout.LAYOUTS))
def test_work_model_equals_the_kernels_tile_schedule(lengths, name):
    """``ring_work`` (numpy, used by the loader) counts the tiles the kernel's ``tile_kinds`` computes,
    blocks of padding included."""
    row = _row(lengths, 128)
    perm = layout.batch_permutation(row[None], 4, name, 8)[0]
    np.testing.assert_array_equal(layout.ring_work(row[perm], perm, 4, 8),
                                  ring_testing.ring_tile_counts(row[None], 4, name, 8, 8))


def test_apply_layout_moves_every_key_with_its_row_order():
    rows = np.stack([_row([60, 4], 64), _row([3] * 20, 64)])
    batch = {"segment_ids": rows, "tokens": np.arange(128).reshape(2, 64)}
    out = layout.apply_layout(batch, ("tokens", "segment_ids"), 4, "segments", 4, columns=slice(16, 48))
    perm = layout.batch_permutation(rows, 4, "segments", 4)[:, 16:48]
    np.testing.assert_array_equal(out["tokens"], np.take_along_axis(batch["tokens"], perm, axis=1))
    np.testing.assert_array_equal(out["segment_ids"], np.take_along_axis(rows, perm, axis=1))


def test_unknown_layout_and_indivisible_length_are_refused():
    with pytest.raises(ValueError, match="layout must be one of"):
        layout.layout_permutation(64, 4, "spiral")
    with pytest.raises(ValueError, match="multiple of 8"):
        layout.layout_permutation(60, 4, "zigzag")
    with pytest.raises(ValueError, match="multiple of 4"):
        layout.segment_permutation(np.ones(62, np.int32), 4)
    with pytest.raises(ValueError, match="depends on the segment ids"):
        layout.layout_permutation(64, 4, "segments")
