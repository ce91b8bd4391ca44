"""Where each token of a packed batch sits on the ring, and what it must predict.

Pure numpy, shared by the Grain loader (``trainer.data``), tests and benchmarks.

A ring layout is a permutation of the sequence axis: ``permuted = natural[..., perm]``
puts tokens ``perm[r * L:(r + 1) * L]`` on ring device ``r`` (``L = S / P``). The
ring kernel masks from segment ids and positions that travel with the tokens, so
every layout gives the same attention; layouts differ only in how evenly the causal
work falls on the devices at each hop of the ring, and in how many tiles the kernel
can skip. Static layouts (``zigzag``, ``contiguous``, ``striped``) use one order for
every row; ``segments`` chooses each packed row's order from its segment ids
(:func:`segment_permutation`). The kernel skips a tile only if it is invisible in every
row a device holds, so with several rows per device it computes the union of the
rows' tiles, and each row's balance holds only approximately. Next-token targets are a function of the natural order (the token
after ``t`` in its segment), so they are computed before the layout is applied.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

LAYOUTS = ("segments", "zigzag", "contiguous", "striped")
STATIC_LAYOUTS = ("contiguous", "zigzag", "striped")
DEFAULT_BLOCK = 512  # the ring kernel's default tile size


def layout_permutation(seq_len: int, num_shards: int, layout: str) -> np.ndarray:
    """Token order of a static layout (the same for every row), placing a natural-order
    sequence on ``num_shards`` ring devices.

    Returns an index array ``perm`` with ``permuted = natural[..., perm]``; device ``r``
    then holds ``permuted[..., r * L:(r + 1) * L]`` with ``L = seq_len // num_shards``.

    - ``contiguous``: device r holds tokens ``[r L, (r + 1) L)``.
    - ``zigzag``: the sequence is cut into 2P chunks; device r holds chunks r and
      2P - 1 - r, so under a causal mask every device has the same work.
    - ``striped``: token i goes to device ``i mod P``.
    """
    check_layout(seq_len, num_shards, layout)
    if layout not in STATIC_LAYOUTS:
        raise ValueError(f"layout {layout!r} depends on the segment ids: use batch_permutation")
    idx = np.arange(seq_len)
    if layout == "contiguous":
        return idx
    if layout == "striped":
        return idx.reshape(seq_len // num_shards, num_shards).T.reshape(-1)
    chunks = idx.reshape(2 * num_shards, -1)
    order = [c for r in range(num_shards) for c in (r, 2 * num_shards - 1 - r)]
    return chunks[order].reshape(-1)


def inverse_layout_permutation(seq_len: int, num_shards: int, layout: str) -> np.ndarray:
    """Index array undoing :func:`layout_permutation`: ``natural = permuted[..., inv]``."""
    return np.argsort(layout_permutation(seq_len, num_shards, layout))


def batch_permutation(segment_ids_BxS: np.ndarray, num_shards: int, layout: str,
                      block: int = DEFAULT_BLOCK, positions_BxS: np.ndarray | None = None) -> np.ndarray:
    """Per-row token order ``[B, S]`` for a natural-order batch: ``np.take_along_axis(x, perm, 1)``.

    Static layouts give every row the same order; ``segments`` chooses each row's
    order from its segment ids and the positions the kernel will mask with (default:
    the natural token indices) for the ring kernel's tiles of ``block`` tokens
    (:func:`segment_permutation`).
    """
    segment_ids_BxS = np.asarray(segment_ids_BxS)
    if segment_ids_BxS.ndim != 2:
        raise ValueError(f"segment_ids must be [B, S], got shape {segment_ids_BxS.shape}")
    b, seq_len = segment_ids_BxS.shape
    if layout != "segments":
        return np.broadcast_to(layout_permutation(seq_len, num_shards, layout), (b, seq_len))
    check_layout(seq_len, num_shards, layout)
    if positions_BxS is None:
        positions_BxS = np.broadcast_to(np.arange(seq_len), (b, seq_len))
    return np.stack([segment_permutation(row, num_shards, block, positions)
                     for row, positions in zip(segment_ids_BxS, np.asarray(positions_BxS))])


def segment_permutation(segment_ids_S: np.ndarray, num_shards: int, block: int = DEFAULT_BLOCK,
                        positions_S: np.ndarray | None = None) -> np.ndarray:
    """The ``segments`` layout of one packed row: the candidate order with the shortest ring.

    Candidates: ``zigzag``, ``contiguous``, ``striped``, and per-document placements in
    which the documents longer than a threshold (``L`` or ``L / 2`` tokens, ``L = S / P``)
    are cut into 2P chunks and zigzagged on their own (or, over ``L``, striped token by
    token), while the others stay whole and go to the device with the least causal work
    that has room (longest first), padding filling what is left; each device keeps its
    tokens in natural order. Each candidate is
    scored by replaying the ring's tile schedule (:func:`ring_work`, the kernel's skip
    rule on blocks of ``block`` tokens with ``positions_S``, default the natural token
    indices): the shortest critical path wins, then the fewest tiles, then the order
    above. One causal document therefore keeps zigzag, and no row is slower than under
    a static layout.
    """
    segment_ids_S = np.asarray(segment_ids_S)
    seq_len = segment_ids_S.shape[0]
    check_layout(seq_len, num_shards, "segments")
    positions_S = np.arange(seq_len) if positions_S is None else np.asarray(positions_S)
    if num_shards == 1:
        return np.arange(seq_len)
    local = seq_len // num_shards
    block = max(1, min(block, local))
    while local % block:
        block -= 1
    candidates = [layout_permutation(seq_len, num_shards, "zigzag")] if seq_len % (2 * num_shards) == 0 else []
    candidates += [np.arange(seq_len), layout_permutation(seq_len, num_shards, "striped")]
    candidates += [_per_document(segment_ids_S, num_shards, split_over, block, striped)
                   for split_over, striped in ((local, False), (local // 2, False), (local, True))]
    scores = []
    for perm in candidates:
        work = ring_work(segment_ids_S[perm], positions_S[perm], num_shards, block)
        scores.append((int(work.max(axis=1).sum()), int(work.sum())))
    return candidates[min(range(len(candidates)), key=lambda i: scores[i])]


def ring_work(segment_ids_S: np.ndarray, positions_S: np.ndarray, num_shards: int, block: int) -> np.ndarray:
    """Tiles each device computes at each hop, ``[hop, device]``, for one laid-out row.

    The kernel's skip rule (``trainer.ring_attention.tile_kinds``) in numpy: a
    (query block, key block) tile is computed unless the blocks' segment id ranges
    (over non-padding tokens) are disjoint or every key comes after every query. At hop
    h device r holds the keys of device (r - h) mod P.
    """
    seg = np.asarray(segment_ids_S, np.int64).reshape(num_shards, -1, block)
    pos = np.asarray(positions_S, np.int64).reshape(num_shards, -1, block)
    valid = seg > 0
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    pmin, pmax = np.where(valid, pos, big).min(-1), np.where(valid, pos, small).max(-1)
    smin, smax = np.where(valid, seg, big).min(-1), np.where(valid, seg, small).max(-1)
    # visible[r, s, i, j]: queries of block i on device r, keys of block j on device s
    visible = ((smin[:, None, :, None] <= smax[None, :, None, :])
               & (smin[None, :, None, :] <= smax[:, None, :, None])
               & (pmin[None, :, None, :] <= pmax[:, None, :, None]))
    tiles = visible.sum(axis=(2, 3))
    devices = np.arange(num_shards)
    return tiles[devices[None, :], (devices[None, :] - devices[:, None]) % num_shards]


def _per_document(segment_ids_S, num_shards, split_over, block, striped=False):
    """Documents longer than ``split_over`` zigzagged over 2P chunks (or ``striped`` token by
    token), the rest whole (see :func:`segment_permutation`)."""
    seq_len = segment_ids_S.shape[0]
    local = seq_len // num_shards
    starts = np.r_[0, np.flatnonzero(np.diff(segment_ids_S)) + 1]
    ends = np.r_[starts[1:], seq_len]
    lengths, ids = ends - starts, segment_ids_S[starts]
    device = np.zeros(seq_len, np.int32)  # the device each token goes to
    load, work = np.zeros(num_shards, np.int64), np.zeros(num_shards)
    split = (ids > 0) & (lengths > split_over)
    zigzag = np.r_[np.arange(num_shards), np.arange(num_shards)[::-1]]
    for start, end in zip(starts[split], ends[split]):
        index = np.arange(end - start)
        if striped:
            device[start:end] = index % num_shards
        else:
            device[start:end] = zigzag[index * (2 * num_shards) // (end - start)]
        load += np.bincount(device[start:end], minlength=num_shards)
    whole = np.flatnonzero((ids > 0) & ~split)
    for i in whole[np.argsort(-lengths[whole], kind="stable")]:
        room = np.flatnonzero(load + lengths[i] <= local)
        if len(room):
            r = room[np.lexsort((load[room], work[room]))[0]]
            device[starts[i]:ends[i]] = r
            load[r] += lengths[i]
            work[r] += lengths[i] / block + (lengths[i] / block) ** 2 / 2  # its causal tiles
        else:
            _fill(device, load, local, starts[i], ends[i])
    for i in np.flatnonzero(ids == 0):
        _fill(device, load, local, starts[i], ends[i])
    return np.argsort(device, kind="stable")  # by device, natural order within each


def _fill(device, load, local, start, end):
    """Tokens ``[start, end)`` onto the devices with the most room, in pieces."""
    while start < end:
        r = int(np.argmax(local - load))
        take = min(local - load[r], end - start)
        device[start:start + take] = r
        load[r] += take
        start += take


def apply_layout(batch: Mapping[str, np.ndarray], keys: Sequence[str], num_shards: int, layout: str,
                 block: int = DEFAULT_BLOCK, columns: slice = slice(None)) -> dict[str, np.ndarray]:
    """The ``[B, S]`` arrays ``keys`` of a natural-order batch in ``layout`` over ``num_shards``
    devices, keeping the permuted sequence ``columns`` (one host's devices)."""
    perm_BxS = batch_permutation(batch["segment_ids"], num_shards, layout, block, batch.get("positions"))[:, columns]
    return {key: np.take_along_axis(np.asarray(batch[key]), perm_BxS, axis=1) for key in keys}


def check_layout(seq_len: int, num_shards: int, layout: str) -> None:
    """``ValueError`` unless ``layout`` is known and places ``seq_len`` tokens on ``num_shards`` devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    unit = 2 * num_shards if layout == "zigzag" else num_shards
    if seq_len <= 0 or seq_len % unit:
        raise ValueError(
            f"seq_len {seq_len} must be a positive multiple of {unit} for layout "
            f"{layout!r} on {num_shards} shards"
        )


def next_token_targets(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Targets for next-token prediction, from a NATURAL-order batch (``[S]`` or ``[B, S]``).

    Reads ``tokens``, ``vision_mask``, ``segment_ids`` and ``loss_weights``; returns
    ``targets`` (int32), ``target_vision_mask`` (bool) and ``target_weights``
    (float32) of the same shape, aligned with the predicting position: ``targets[t]``
    is the token after ``t`` in its segment, scored with that token's loss weight
    (0 where ``t`` is the last token of its segment or padding; see ``trainer.loss``).
    Call it before any layout permutation.
    """
    missing = {"tokens", "vision_mask", "segment_ids", "loss_weights"} - set(batch)
    if missing:
        raise ValueError(f"batch is missing {sorted(missing)}")
    tokens = np.asarray(batch["tokens"])
    shapes = {k: np.shape(batch[k]) for k in ("tokens", "vision_mask", "segment_ids", "loss_weights")}
    if len(set(shapes.values())) != 1 or tokens.ndim not in (1, 2):
        raise ValueError(f"batch arrays must share one [S] or [B, S] shape, got {shapes}")
    segments = np.asarray(batch["segment_ids"])

    def shift(a, fill):
        return np.concatenate([a[..., 1:], np.full(a.shape[:-1] + (1,), fill, a.dtype)], axis=-1)

    same_segment = (shift(segments, 0) == segments) & (segments != 0)
    return {
        "targets": np.where(same_segment, shift(tokens, 0), 0).astype(np.int32),
        "target_vision_mask": same_segment & shift(np.asarray(batch["vision_mask"], bool), False),
        "target_weights": np.where(
            same_segment, shift(np.asarray(batch["loss_weights"], np.float32), 0.0), 0.0
        ).astype(np.float32),
    }
