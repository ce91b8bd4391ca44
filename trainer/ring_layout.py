"""Where each token of a packed batch sits on the ring, and what it must predict.

Pure numpy, shared by the Grain loader (``trainer.training.loader``), tests and benchmarks.

A ring layout is a permutation of the sequence axis: ``permuted = natural[..., perm]``
puts tokens ``perm[r * L:(r + 1) * L]`` on ring device ``r`` (``L = S / P``). The
ring kernel masks from segment ids and positions that travel with the tokens, so
every layout gives the same attention; layouts differ only in how evenly the causal
work falls on the devices at each hop of the ring, and in how many tiles the kernel
can skip. Static layouts (``zigzag``, ``contiguous``, ``striped``) use one order for
every row; ``segments`` chooses, per packed row from its segment ids and positions, a
placement of whole kernel blocks that keeps contiguous's tiles and balances them over
the hops (:func:`segment_permutation`). The kernel skips a tile only if it is invisible
in every row a device holds, so with several rows per device it computes the union of
the rows' tiles, and each row's balance holds only approximately. Next-token targets are a
function of the natural order (the token after ``t`` in its segment), so they are
computed before the layout is applied.
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
    """The ``segments`` layout of one packed row: whole blocks placed for the shortest ring.

    The row is cut, in natural order, into blocks of ``block`` tokens (the ring kernel's
    tile size) and only whole blocks move between devices, each device keeping its blocks
    in natural order. The kernel's tile skipping depends only on each block's segment id
    and position ranges (``positions_S``, default the natural token indices), so every
    such placement computes exactly the tiles of ``contiguous``; they differ only in how
    evenly those tiles fall on the devices at each hop. Candidates: ``zigzag`` (where its
    chunks are whole blocks), ``contiguous`` and, unless one of those is already perfectly
    balanced, the placement found by :func:`balanced_blocks`; the shortest critical path
    (:func:`ring_work`: the busiest device's tiles at each hop, summed) wins, ties going
    to the earlier. One causal document therefore keeps zigzag, and no row is slower
    than under contiguous or zigzag.

    Token-striped and per-document orders are not candidates: they mix documents within
    blocks, compute up to 3-4x the tiles, and on the rows measured (BENCHMARKS.md) never
    had the shortest critical path once whole blocks are balanced.
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
    tiles_NxN = block_tiles(segment_ids_S, positions_S, block)
    num_blocks = len(tiles_NxN)
    placements = [np.arange(num_blocks) // (local // block)]
    if (local // block) % 2 == 0:
        zigzag = np.r_[np.arange(num_shards), np.arange(num_shards)[::-1]]
        placements.insert(0, zigzag[np.arange(num_blocks) * 2 * num_shards // num_blocks])

    def critical_path(device_N):
        return _critical_path(_hop_work(_device_tiles(tiles_NxN, device_N, num_shards)))

    device_N = min(placements, key=critical_path)
    if critical_path(device_N) > _lower_bound(tiles_NxN, num_shards):
        device_N = min([device_N, balanced_blocks(tiles_NxN, num_shards)], key=critical_path)
    blocks = np.argsort(device_N, kind="stable")  # by device, natural order within each
    return (blocks[:, None] * block + np.arange(block)).reshape(-1)


def block_tiles(segment_ids_S: np.ndarray, positions_S: np.ndarray, block: int) -> np.ndarray:
    """Int ``[N, N]``: 1 where the ring kernel computes the tile (query block i, key block j)
    of a row cut into ``N = S / block`` blocks, 0 where it skips it.

    The kernel's skip rule (``trainer.ring_attention.tile_kinds``) in numpy: a tile is
    computed unless the blocks' segment id ranges (over non-padding tokens) are disjoint
    or every key comes after every query. It depends only on each block's id and position
    ranges, so it does not change when whole blocks move between devices.
    """
    seg = np.asarray(segment_ids_S, np.int64).reshape(-1, block)  # int64: room for the sentinels
    pos = np.asarray(positions_S, np.int64).reshape(-1, block)
    valid = seg > 0
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    pmin, pmax = np.where(valid, pos, big).min(-1), np.where(valid, pos, small).max(-1)
    smin, smax = np.where(valid, seg, big).min(-1), np.where(valid, seg, small).max(-1)
    visible = ((smin[:, None] <= smax[None, :]) & (smin[None, :] <= smax[:, None])
               & (pmin[None, :] <= pmax[:, None]))
    return visible.astype(np.int64)


def ring_work(segment_ids_S: np.ndarray, positions_S: np.ndarray, num_shards: int, block: int) -> np.ndarray:
    """Tiles each device computes at each hop, ``[hop, device]``, for one laid-out row.

    Device r holds the row's r-th ``S / P`` tokens and computes the tiles of
    :func:`block_tiles` whose query block it holds; at hop h it holds the keys of device
    (r - h) mod P.
    """
    tiles_NxN = block_tiles(segment_ids_S, positions_S, block)
    device_N = np.arange(len(tiles_NxN)) // (len(tiles_NxN) // num_shards)
    return _hop_work(_device_tiles(tiles_NxN, device_N, num_shards))


def balanced_blocks(tiles_NxN: np.ndarray, num_shards: int, max_swaps: int = 64) -> np.ndarray:
    """The device of each of N blocks, ``N / P`` per device, for a short causal ring.

    ``tiles_NxN`` holds the kernel's tiles between blocks in natural order
    (:func:`block_tiles`). Moving whole blocks keeps that tile set, so only the balance
    changes: the critical path (the busiest device's tiles at each hop, summed) is
    shortened, starting from blocks striped over the devices (block i on device i mod P;
    of contiguous, zigzag, striped and snake starts it ends best on packed rows), by
    steepest descent over swaps of two blocks, ties broken by the sum of squared per-hop
    device work (it keeps the descent moving where the critical path is flat), for at
    most ``max_swaps`` swaps or until the path is as short as the mean device's work.
    Deterministic: the same tiles give the same placement. Where N is large, runs of
    consecutive blocks move together so that one step stays cheap (about 2^19 numbers;
    on rings so large that even one run per device exceeds that, no swaps are made).
    """
    n = len(tiles_NxN)
    unit = _unit_blocks(n, num_shards)
    if unit is None:  # one step would cost too much: the striped start alone
        unit, max_swaps = n // num_shards, 0
    units = n // unit
    tiles_UxU = tiles_NxN.reshape(units, unit, units, unit).sum(axis=(1, 3))
    return np.repeat(_swap_descent(tiles_UxU, np.arange(units) % num_shards, num_shards, max_swaps), unit)


def _swap_descent(tiles_UxU, device_U, num_shards, max_swaps):
    """Steepest descent of (critical path, sum of squared work) over all swaps of two units.

    With ``A`` the unit -> device one-hot, device tiles are ``M = Aᵀ T A``. Swapping unit
    i (on device a) with unit j (on b) changes it by a low-rank term: with ``R = T A``,
    ``C = Tᵀ A``, ``r = R[i] - R[j]``, ``c = C[i] - C[j]``, ``v = e_b - e_a`` and
    ``s = T[i,i] + T[j,j] - T[i,j] - T[j,i]``, ``ΔM = v (r + s v)ᵀ + c vᵀ``; so every swap
    is scored at once, as ``[P, P, pairs]`` arrays (exact integers in float32).
    """
    p = num_shards
    device_U = device_U.copy()
    tiles = np.asarray(tiles_UxU, np.float32)
    eye = np.eye(p, dtype=np.float32)
    i, j = np.triu_indices(len(tiles), 1)
    s = np.diag(tiles)[i] + np.diag(tiles)[j] - tiles[i, j] - tiles[j, i]
    hop_index = _hop_index(p).reshape(-1)
    lower_bound = _lower_bound(tiles_UxU, p)
    for _ in range(max_swaps):
        a_UxP = eye[device_U]
        r_UxP, c_UxP = tiles @ a_UxP, tiles.T @ a_UxP
        m_PxP = a_UxP.T @ r_UxP
        work = m_PxP.reshape(-1)[hop_index].astype(np.float64)
        current = (work.reshape(p, p).max(axis=0).sum(), np.square(work).sum())
        if current[0] <= lower_bound:
            break
        v = eye[:, device_U[j]] - eye[:, device_U[i]]
        r, c = (r_UxP[i] - r_UxP[j]).T, (c_UxP[i] - c_UxP[j]).T
        y = r + s * v
        m_new = np.empty((p, p, len(i)), np.float32)
        for row in range(p):  # row by row: broadcasting over the pairs axis stays contiguous
            m_new[row] = v[row] * y + c[row] * v + m_PxP[row, :, None]
        work_new = m_new.reshape(p * p, -1)[hop_index]
        critical = work_new.reshape(p, p, -1).max(axis=0).sum(axis=0)
        shortest = np.flatnonzero(critical == critical.min())
        squares = np.square(work_new[:, shortest].astype(np.float64)).sum(axis=0)
        k = shortest[np.argmin(squares)]
        if (critical[k], squares.min()) >= current:
            break
        device_U[i[k]], device_U[j[k]] = device_U[j[k]], device_U[i[k]]
    return device_U


def _unit_blocks(num_blocks, num_shards, budget=1 << 19):
    """Blocks that move together: the fewest, dividing each device's blocks, that keep one
    descent step (pairs × P² numbers) within ``budget``; None if even one unit per device
    does not (rings of several dozen devices)."""
    per_device = num_blocks // num_shards
    for unit in range(1, per_device + 1):
        units = num_blocks // unit
        if per_device % unit == 0 and units * (units - 1) // 2 * num_shards ** 2 <= budget:
            return unit
    return None


def _device_tiles(tiles_NxN, device_N, num_shards):
    """``[P, P]``: tiles whose query block is on device d and key block on device e."""
    a_NxP = np.eye(num_shards)[device_N]  # float64: BLAS, and exact for any tile count here
    return np.rint(a_NxP.T @ (tiles_NxN @ a_NxP)).astype(np.int64)


def _hop_index(num_shards):
    """Flat indices into a ``[P, P]`` device-tile matrix giving ``[device, hop]``: M[d, (d - h) mod P]."""
    d = np.arange(num_shards)
    return d[:, None] * num_shards + (d[:, None] - d[None, :]) % num_shards


def _hop_work(m_PxP):
    """``[hop, device]`` work from device tiles: at hop h device d computes M[d, (d - h) mod P]."""
    return m_PxP.reshape(-1)[_hop_index(len(m_PxP))].T


def _lower_bound(tiles, num_shards):
    """No placement's critical path is shorter than the mean device's tiles, rounded up."""
    return -(-int(tiles.sum()) // num_shards)


def _critical_path(work):
    return int(work.max(axis=1).sum())


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
