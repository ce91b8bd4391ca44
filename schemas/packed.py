"""The packed training example: one fixed-length sequence of several packed segments.

A record is what one ArrayRecord entry holds and what the trainer reads:

=============== ============ ==========================================================
field           dtype        meaning
=============== ============ ==========================================================
tokens          int32[L]     text ids where ``vision_mask`` is 0, vision ids where 1
vision_mask     bool[L]      which vocabulary each token belongs to
segment_ids     int32[L]     1..n for the n packed segments; 0 is padding (at the end)
positions       int32[L]     position inside the token's own segment (0 on padding)
loss_weights    float32[L]   weight of the loss for predicting this token from the
                             tokens before it in its segment (0 at a segment's first
                             token and on padding)
=============== ============ ==========================================================

Byte layout, version 2 (all little-endian). Only what cannot be derived is stored:
segments as lengths (segment ids and positions follow), tokens without padding in
the narrowest unsigned type that holds them, the vision mask and loss weights as
runs::

    offset  size            field
    0       4               magic b"LWMP"
    4       1               version (2)
    5       1               token width in bytes (2 or 4)
    6       2               reserved, zero
    8       4               L, sequence length
    12      4               n_seg, number of segments
    16      4               n_vis, number of vision runs
    20      4               n_wt, number of loss-weight runs
    24      4*n_seg         segment lengths (uint32, each >= 1, sum <= L)
    ...     w*T             tokens of the segments, T = sum of lengths (no padding)
    ...     8*n_vis         vision runs: (start, length) uint32 pairs, sorted, disjoint
    ...     12*n_wt         weight runs: (start, length) uint32 pairs, then n_wt float32
                            values; positions outside every run weigh 0
    end-4   4               CRC-32 (zlib) of every byte before it

Decoding is a handful of ``np.frombuffer`` / ``np.repeat`` calls: no Python work
per token. Malformed bytes (bad magic, unknown version, checksum mismatch,
truncated, trailing bytes, runs out of range) raise ``ValueError``.

Why a checksum: padding is not stored, so the header's L cannot be bounded by the
record's size (a 1M-token sequence holding one short document is a few hundred
bytes). The CRC makes any flipped bit, in L or anywhere else, a ``ValueError`` before
anything of size L is allocated, even where shard hashes are not verified; readers
that know the dataset's ``seq_len`` pass it to :func:`decode`, which refuses a record
of any other length.
"""

from __future__ import annotations

import struct
import zlib
from typing import Mapping

import numpy as np

MAGIC = b"LWMP"
VERSION = 2
FIELDS = ("tokens", "vision_mask", "segment_ids", "positions", "loss_weights")
_HEADER = struct.Struct("<4sBBHIIII")
_CHECKSUM = struct.Struct("<I")
_TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def segment_arrays(segment_lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1..n, then 0 padding) and per-segment positions for ``seq_len``."""
    lengths = np.asarray(segment_lengths, dtype=np.int64)
    used = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:used] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    positions = np.zeros(seq_len, np.int32)
    positions[:used] = np.arange(used) - np.repeat(starts, lengths)
    return segment_ids, positions


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal non-zero values: (starts, lengths, values)."""
    if values.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, values[:0]
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [values.size]]))
    run_values = values[starts]
    keep = run_values != 0
    return starts[keep], lengths[keep], run_values[keep]


def _segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Lengths of segments 1..n, checking they are consecutive runs followed by padding."""
    used = int(np.count_nonzero(segment_ids))
    if np.any(segment_ids[used:] != 0):
        raise ValueError("segment_ids: padding (0) may only come at the end of the sequence")
    body = segment_ids[:used]
    steps = np.diff(body)
    if used and (body[0] != 1 or np.any((steps != 0) & (steps != 1))):
        raise ValueError("segment_ids: segments must be numbered 1..n in order, each one contiguous")
    return np.bincount(body, minlength=int(body.max(initial=0)) + 1)[1:]


def encode(
    tokens: np.ndarray,
    vision_mask: np.ndarray,
    segment_ids: np.ndarray,
    positions: np.ndarray,
    loss_weights: np.ndarray,
) -> bytes:
    """Serialise one packed example; the inverse of :func:`decode`.

    All five arrays have the same length L. Positions must restart at 0 in each
    segment and padding (segment 0) must be all zeros: both are derived on decode,
    so anything else cannot be represented and raises ``ValueError``.
    """
    tokens = np.asarray(tokens)
    vision_mask = np.asarray(vision_mask, bool)
    segment_ids = np.asarray(segment_ids)
    positions = np.asarray(positions)
    loss_weights = np.asarray(loss_weights, np.float32)
    seq_len = tokens.shape[0] if tokens.ndim == 1 else -1
    for name, array in zip(FIELDS, (tokens, vision_mask, segment_ids, positions, loss_weights)):
        if array.shape != (seq_len,):
            raise ValueError(f"{name}: expected shape ({max(seq_len, 0)},), got {array.shape}")
    lengths = _segment_lengths(segment_ids)
    used = int(lengths.sum())
    expected_ids, expected_positions = segment_arrays(lengths, seq_len)
    if not np.array_equal(positions, expected_positions):
        raise ValueError("positions: must restart at 0 at each segment start and be 0 on padding")
    if np.any(tokens[used:] != 0) or np.any(vision_mask[used:]) or np.any(loss_weights[used:] != 0):
        raise ValueError("padding positions must have token 0, vision_mask 0 and loss weight 0")
    if used and (tokens[:used].min() < 0):
        raise ValueError("tokens: ids must be non-negative")
    width = 2 if used == 0 or int(tokens[:used].max()) < 2**16 else 4
    vis_starts, vis_lengths, _ = _runs(vision_mask.astype(np.int8))
    wt_starts, wt_lengths, wt_values = _runs(loss_weights)
    header = _HEADER.pack(MAGIC, VERSION, width, 0, seq_len, len(lengths), len(vis_starts), len(wt_starts))
    body = b"".join(
        [
            header,
            lengths.astype("<u4").tobytes(),
            tokens[:used].astype(_TOKEN_DTYPES[width]).tobytes(),
            np.stack([vis_starts, vis_lengths], -1).astype("<u4").tobytes(),
            np.stack([wt_starts, wt_lengths], -1).astype("<u4").tobytes(),
            wt_values.astype("<f4").tobytes(),
        ]
    )
    return body + _CHECKSUM.pack(zlib.crc32(body))


def _run_mask(runs: np.ndarray, seq_len: int, name: str) -> np.ndarray:
    """Expand (start, length) runs to the index of each covered position, validating them."""
    starts, lengths = runs[:, 0].astype(np.int64), runs[:, 1].astype(np.int64)
    ends = starts + lengths
    if np.any(lengths == 0) or np.any(ends > seq_len) or np.any(starts[1:] < ends[:-1]):
        raise ValueError(f"malformed packed record: {name} runs are empty, overlapping or out of range")
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def decode(record: bytes, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Parse one packed example into exactly the five fields of the module docstring.

    ``seq_len``: the sequence length the reader expects (the manifest's); a record of
    any other length raises ``ValueError`` before its arrays are built. Damaged bytes
    (see the module docstring) raise ``ValueError`` too.
    """
    buffer = memoryview(record)
    if len(buffer) < _HEADER.size + _CHECKSUM.size:
        raise ValueError(f"malformed packed record: {len(buffer)} bytes is shorter than the header and checksum")
    magic, version, width, reserved, length, n_seg, n_vis, n_wt = _HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise ValueError(f"not a packed record: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(
            f"unsupported packed record version {version}; this code reads version {VERSION} "
            "(rebuild the dataset with this version's `lwm data` job)"
        )
    buffer = buffer[: -_CHECKSUM.size]
    (stored,) = _CHECKSUM.unpack_from(record, len(buffer))
    computed = zlib.crc32(buffer)
    if computed != stored:
        raise ValueError(f"damaged packed record: its CRC-32 is {computed:08x}, the stored one {stored:08x}")
    if width not in _TOKEN_DTYPES or reserved != 0:
        raise ValueError(f"malformed packed record: token width {width}, reserved {reserved}")
    if seq_len is not None and length != seq_len:
        raise ValueError(
            f"packed record has sequence length {length}, not the expected seq_len {seq_len} "
            "(the dataset manifest's): the manifest does not describe these shards"
        )
    offset = _HEADER.size

    def take(count: int, dtype: str) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        if offset + size > len(buffer):
            raise ValueError(f"malformed packed record: truncated ({len(buffer)} bytes)")
        array = np.frombuffer(buffer, dtype, count, offset)
        offset += size
        return array

    lengths = take(n_seg, "<u4")
    if np.any(lengths == 0) or int(lengths.sum(dtype=np.int64)) > length:
        raise ValueError("malformed packed record: segment lengths are zero or exceed the sequence length")
    used = int(lengths.sum(dtype=np.int64))
    body = take(used, _TOKEN_DTYPES[width].str)
    vision_runs = take(2 * n_vis, "<u4").reshape(n_vis, 2)
    weight_runs = take(2 * n_wt, "<u4").reshape(n_wt, 2)
    weight_values = take(n_wt, "<f4")
    if offset != len(buffer):
        raise ValueError(f"malformed packed record: {len(buffer) - offset} unexpected trailing bytes")

    tokens = np.zeros(length, np.int32)
    tokens[:used] = body
    vision_mask = np.zeros(length, bool)
    vision_mask[_run_mask(vision_runs, used, "vision")] = True
    loss_weights = np.zeros(length, np.float32)
    weighted = _run_mask(weight_runs, used, "loss weight")  # validates the runs before np.repeat sizes by them
    loss_weights[weighted] = np.repeat(weight_values, weight_runs[:, 1])
    segment_ids, positions = segment_arrays(lengths, length)
    return {
        "tokens": tokens,
        "vision_mask": vision_mask,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_weights": loss_weights,
    }


def from_segments(segments: list[Mapping[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Lay segments (each with ``tokens``, ``vision_mask``, ``loss_weights``) end to end, padded to ``seq_len``."""
    lengths = np.array([len(s["tokens"]) for s in segments], np.int64)
    used = int(lengths.sum())
    if used > seq_len:
        raise ValueError(f"segments hold {used} tokens, more than the sequence length {seq_len}")
    example = {
        "tokens": np.zeros(seq_len, np.int32),
        "vision_mask": np.zeros(seq_len, bool),
        "loss_weights": np.zeros(seq_len, np.float32),
    }
    for name, array in example.items():
        if segments:
            array[:used] = np.concatenate([np.asarray(s[name]) for s in segments])
    example["segment_ids"], example["positions"] = segment_arrays(lengths, seq_len)
    return {name: example[name] for name in FIELDS}
