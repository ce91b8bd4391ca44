"""Masked sequence packing: cut long documents, pack segments into fixed-length sequences.

Pure functions over :class:`Segment` values, shared by every pipeline (books,
image-text, video-text) and by tests. Each segment becomes one segment of a packed
example (its own segment id, positions restarting at 0, attending only to itself:
docs/LWM.md, "Sequence construction").

Example, L = 8: three text documents framed by BOS (1) and EOS (2)::

    a = [1 11 12 13 2]                     5 tokens
    b = [1 21 22 2]                        4 tokens
    c = [1 31 32 33 34 35 36 37 38 39 2]   11 tokens > L: cut(c, 8) gives
        c@0 = [1 31 32 33 34 35 36 37]     and the splittable tail c@8 = [38 39 2]

``pack([a, b, c@0, c@8], 8, min_piece=2)`` places whole segments longest first
(c@0, a, b: each into the fullest sequence it fits), then tails fill the gaps
(c@8 after a); ``to_example`` gives the five fields of each sequence::

    tokens        [1 31 32 33 34 35 36 37]  [1 11 12 13 2 38 39 2]  [1 21 22 2 0 0 0 0]
    segment_ids   [1  1  1  1  1  1  1  1]  [1  1  1  1 1  2  2 2]  [1  1  1 1 0 0 0 0]
    positions     [0  1  2  3  4  5  6  7]  [0  1  2  3 4  0  1 2]  [0  1  2 3 0 0 0 0]
    loss_weights  [0  1  1  1  1  1  1  1]  [0  1  1  1 1  0  1 1]  [0  1  1 1 0 0 0 0]
    vision_mask   all False

Each segment's first token has weight 0 (nothing before it to predict it from, the
tail c@8 included: it starts a new segment); padding (segment 0) has weight 0.
Utilization here is 20 of 24 tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
import struct
from typing import Mapping, Sequence

import numpy as np

from pipelines.kit.naming import stable_hash
from schemas import packed


@dataclasses.dataclass(frozen=True)
class Segment:
    """Tokens of one example (or one piece of a cut document) with their vision mask and loss weights.

    ``key`` orders segments deterministically: (document id, offset of the piece's
    first token in the document). ``splittable`` marks the last piece of a text
    document longer than L, which the packer may split further to fill gaps.
    """

    key: tuple[str, int]
    tokens: np.ndarray  # int32[n]
    vision_mask: np.ndarray  # bool[n]
    loss_weights: np.ndarray  # float32[n]
    splittable: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


_SEGMENT_HEADER = struct.Struct("<IqIB")  # id bytes, offset, tokens, flags (1: splittable, 2: 16-bit tokens)


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start of each run of equal values, its value)."""
    if not len(values):
        return np.zeros(0, np.int64), values[:0]
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    return starts, values[starts]


def _pack_runs(values: np.ndarray, dtype: str) -> bytes:
    starts, firsts = _runs(values)
    return struct.pack("<I", len(starts)) + starts.astype("<u4").tobytes() + firsts.astype(dtype).tobytes()


def _unpack_runs(data: bytes, at: int, dtype: str, length: int) -> tuple[np.ndarray, int]:
    (runs,) = struct.unpack_from("<I", data, at)
    starts = np.frombuffer(data, "<u4", runs, at + 4)
    values = np.frombuffer(data, dtype, runs, at + 4 + 4 * runs)
    return np.repeat(values, np.diff(np.append(starts, length))), at + 4 + runs * (4 + np.dtype(dtype).itemsize)


def segment_to_bytes(segment: Segment) -> bytes:
    """A compact, deterministic encoding of a segment (what moves between workers while packing).

    Tokens as 16-bit ids where they fit (else 32-bit), the vision mask and the loss
    weights as runs: about 2 bytes per token, where pickling the three arrays takes 9.
    """
    key = segment.key[0].encode()
    tokens = segment.tokens
    narrow = len(tokens) == 0 or (tokens.min() >= 0 and tokens.max() < 1 << 16)
    flags = int(segment.splittable) | (2 if narrow else 0)
    return b"".join([
        _SEGMENT_HEADER.pack(len(key), segment.key[1], len(tokens), flags), key,
        tokens.astype("<u2" if narrow else "<i4").tobytes(),
        _pack_runs(segment.vision_mask, "u1"), _pack_runs(segment.loss_weights, "<f4"),
    ])


def segment_length(data: bytes) -> int:
    """The token count of an encoded segment (:func:`segment_to_bytes`), read from its header."""
    return _SEGMENT_HEADER.unpack_from(data)[2]


def segment_from_bytes(data: bytes) -> Segment:
    """The inverse of :func:`segment_to_bytes`."""
    key_length, offset, length, flags = _SEGMENT_HEADER.unpack_from(data)
    at = _SEGMENT_HEADER.size
    key = data[at:at + key_length].decode()
    at += key_length
    dtype = np.dtype("<u2" if flags & 2 else "<i4")
    tokens = np.frombuffer(data, dtype, length, at).astype(np.int32)
    at += length * dtype.itemsize
    vision_mask, at = _unpack_runs(data, at, "u1", length)
    loss_weights, _ = _unpack_runs(data, at, "<f4", length)
    return Segment((key, offset), tokens, vision_mask.astype(bool), loss_weights.astype(np.float32), bool(flags & 1))


def text_segment(doc_id: str, tokens: np.ndarray, weight: float = 1.0) -> Segment:
    """A text-only segment: ``weight`` on every token but the first (which has no context)."""
    weights = np.full(len(tokens), weight, np.float32)
    weights[:1] = 0.0
    return Segment((doc_id, 0), np.asarray(tokens, np.int32), np.zeros(len(tokens), bool), weights)


def _piece(segment: Segment, start: int, stop: int, splittable: bool) -> Segment:
    """Tokens [start, stop) of a segment as a segment of their own (first weight 0: it has no context)."""
    weights = segment.loss_weights[start:stop].copy()
    weights[0] = 0.0
    return Segment(
        (segment.key[0], segment.key[1] + start),
        segment.tokens[start:stop],
        segment.vision_mask[start:stop],
        weights,
        splittable,
    )


def cut(segment: Segment, seq_len: int) -> list[Segment]:
    """Split a segment longer than ``seq_len`` into ``seq_len``-sized pieces (the last may be shorter).

    Each piece is its own segment, so its first token gets weight 0; the last piece
    is ``splittable``. A segment holding vision tokens is never cut: it raises
    ``ValueError`` if it does not fit.
    """
    if len(segment) <= seq_len:
        return [segment]
    if segment.vision_mask.any():
        raise ValueError(f"a vision span is never cut: segment {segment.key[0]!r} has {len(segment)} > {seq_len} tokens")
    starts = range(0, len(segment), seq_len)
    return [_piece(segment, start, min(start + seq_len, len(segment)), start + seq_len >= len(segment)) for start in starts]


SEQUENCES_PER_GROUP = 16  # sequences' worth of tokens per hash group a bucket needs for its groups to pack alone


def hash_group(segment: Segment, groups: int) -> int:
    """The hash group of a segment: by its document id, so a document's pieces pack together."""
    return stable_hash(segment.key[0]) % groups


def packed_in_place(group_tokens: Mapping[int, int], seq_len: int, groups: int) -> list[int]:
    """The hash groups of a bucket packed on their own (sorted), from each group's token total.

    A bucket's segments are hashed into ``groups`` groups (its packing parallelism).
    Where the bucket holds at least :data:`SEQUENCES_PER_GROUP` sequences' worth of
    tokens per group, each group is packed on its own and gives up its least full
    sequence (:func:`split_leftover`); those few sequences' segments are packed
    together as one more group, the leftovers, so no group's partly filled
    sequence costs utilization. A smaller bucket is all leftovers: one group, and
    one shard. So the leftovers never exceed ``groups × SEQUENCES_PER_GROUP``
    sequences' worth. With one group, it is packed whole.
    """
    if groups == 1 or sum(group_tokens.values()) >= groups * SEQUENCES_PER_GROUP * seq_len:
        return sorted(group_tokens)
    return []


def split_leftover(sequences: list[list[Segment]], seq_len: int) -> tuple[list[list[Segment]], list[Segment]]:
    """An in-place group's sequences without their least full one, and that one's segments (none when
    every sequence is full): what the group adds to the leftovers (:func:`packed_in_place`)."""
    fill = [sum(len(s) for s in sequence) for sequence in sequences]
    if not sequences or min(fill) == seq_len:
        return sequences, []
    least = min(range(len(sequences)), key=lambda i: (fill[i], i))
    return sequences[:least] + sequences[least + 1:], sequences[least]


def pack_in_place(segments: Sequence[Segment], seq_len: int, groups: int) -> tuple[list[list[Segment]], list[Segment]]:
    """One in-place group (:func:`packed_in_place`) packed: its sequences, less its least full one where other
    groups share the leftovers (:func:`split_leftover`; one group keeps all), and that one's segments."""
    sequences = pack(segments, seq_len)
    return split_leftover(sequences, seq_len) if groups > 1 else (sequences, [])


def pack_hash_groups(groups: Mapping[int, Sequence[Segment]], seq_len: int, hash_groups: int) -> list[list[Segment]]:
    """A bucket's sequences from its ``hash_groups`` groups of segments, in one process: what the packed-dataset
    writer does in two steps (:func:`packed_in_place`); the in-place groups' sequences first, then the leftovers'."""
    in_place = packed_in_place({g: sum(map(len, s)) for g, s in groups.items() if s}, seq_len, hash_groups)
    sequences, leftovers = [], [s for g, segments in groups.items() if g not in in_place for s in segments]
    for group in in_place:
        kept, leftover = pack_in_place(groups[group], seq_len, hash_groups)
        sequences += kept
        leftovers += leftover
    return sequences + (pack(leftovers, seq_len) if leftovers else [])


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest items first, each into the fullest bin it still fits.

    Deterministic: ties in length keep index order, ties in free space go to the
    oldest bin. Bins come out in creation order, items inside a bin in insertion order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for item in order:
        size = lengths[item]
        if size > capacity or size <= 0:
            raise ValueError(f"item {item} has length {size}, outside 1..{capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([item])
            remaining, index = capacity - size, len(bins) - 1
        else:
            remaining, index = free.pop(slot)
            bins[index].append(item)
            remaining -= size
        if remaining > 0:
            bisect.insort(free, (remaining, index))
    return bins


def pack(segments: Sequence[Segment], seq_len: int, *, min_piece: int = 128) -> list[list[Segment]]:
    """Group segments (each at most ``seq_len`` long) into sequences; input order does not matter.

    Whole segments go in with best-fit-decreasing. Then the splittable tails of cut
    documents fill what space is left, split where a bin ends (no new piece shorter
    than ``min_piece``), and what remains of them fills new sequences end to end. So
    every sequence is full but the last few, whatever the length mix, and no
    document that fits a sequence is ever split.
    """
    ordered = sorted(segments, key=lambda s: s.key)
    whole = [s for s in ordered if not s.splittable]
    tails = [s for s in ordered if s.splittable]
    bins = [[whole[i] for i in items] for items in best_fit_decreasing([len(s) for s in whole], seq_len)]
    free = [seq_len - sum(len(s) for s in b) for b in bins]
    pending = list(reversed(tails))  # a stack: next tail on top
    for index in range(len(bins)):
        while pending and free[index] >= min(min_piece, len(pending[-1])):
            free[index] -= _place(pending, bins[index], free[index])
    while pending:
        bins.append([])
        room = seq_len
        while pending and room >= min(min_piece, len(pending[-1])):
            room -= _place(pending, bins[-1], room)
    return bins


def _place(pending: list[Segment], sequence: list[Segment], room: int) -> int:
    """Put the top tail (or its first ``room`` tokens) into ``sequence``; returns tokens used."""
    tail = pending.pop()
    if len(tail) <= room:
        sequence.append(tail)
        return len(tail)
    sequence.append(_piece(tail, 0, room, False))
    pending.append(_piece(tail, room, len(tail), True))
    return room


def to_example(segments: Sequence[Segment], seq_len: int) -> dict[str, np.ndarray]:
    """The packed example (the five fields of :mod:`schemas.packed`) of one sequence's segments."""
    return packed.from_segments(
        [{"tokens": s.tokens, "vision_mask": s.vision_mask, "loss_weights": s.loss_weights} for s in segments],
        seq_len,
    )
