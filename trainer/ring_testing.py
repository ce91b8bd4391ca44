"""Ring attention on global arrays, for tests and benchmarks (not used in training).

:func:`sharded_attention` runs ``trainer.ring_attention.ring_attention`` on natural-order
global arrays through a ring layout and returns natural order, or the dense reference
on the same inputs; :func:`ring_tile_counts` replays the ring's tile schedule without
running attention, for the load-balance benchmark and tests.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from trainer.ring_layout import batch_permutation, layout_permutation
from trainer.ring_attention import SKIP, _block, _split, dense_attention, ring_attention, tile_kinds


def ring_tile_counts(segment_ids, num_shards: int, layout: str, block_q: int, block_kv: int,
                     causal: bool = True) -> np.ndarray:
    """Tiles the ring computes, as an int array [hop, device], for one natural-order batch.

    ``segment_ids`` is [B, S] in natural order; positions are the natural token indices,
    permuted with the tokens. At hop h device r holds the key/value shard of device
    (r - h) mod P and computes the tiles :func:`tile_kinds` does not skip.
    """
    segment_ids = np.asarray(segment_ids, np.int32)
    b, seq_len = segment_ids.shape
    perm = batch_permutation(segment_ids, num_shards, layout, block_q)
    length = seq_len // num_shards
    bq, bk = _block(block_q, length, "block_q"), _block(block_kv, length, "block_kv")
    seg = np.take_along_axis(segment_ids, perm, axis=1).reshape(b, num_shards, length)
    pos = perm.astype(np.int32).reshape(b, num_shards, length)
    counts = np.zeros((num_shards, num_shards), np.int64)
    for hop in range(num_shards):
        for r in range(num_shards):
            src = (r - hop) % num_shards
            kinds = tile_kinds(_split(seg[:, r], bq), _split(pos[:, r], bq),
                               _split(seg[:, src], bk), _split(pos[:, src], bk), causal)
            counts[hop, r] = int(np.sum(kinds != SKIP))
    return counts


def sharded_attention(q, k, v, segment_ids, *, mesh, axis_name: str = "sp", causal: bool = True,
                      layout: str = "zigzag", impl: str = "ring", block_q: int = 512,
                      block_kv: int = 512, float32_logits: bool = True):
    """Attention over global natural-order arrays, computed on the ``axis_name`` ring.

    q [B, S, Hq, D], k and v [B, S, K, D], segment_ids [B, S] (0 = padding); positions
    are the natural token indices. ``layout`` places tokens on devices (see
    ``trainer.ring_layout``; the ``segments`` order is computed on the host from the segment
    ids, also under jit); the result comes back in natural order. ``impl="dense"`` is the single-device O(S^2)
    reference on the same inputs (mesh and layout unused).
    """
    if impl not in ("ring", "dense"):
        raise ValueError(f"impl must be 'ring' or 'dense', got {impl!r}")
    b, seq_len = segment_ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
    if impl == "dense":
        return dense_attention(q, k, v, segment_ids, segment_ids, positions, positions, causal)
    num_shards = mesh.shape[axis_name]
    if layout == "segments":
        perm = jax.pure_callback(
            lambda ids: batch_permutation(ids, num_shards, layout, block_q).astype(np.int32),
            jax.ShapeDtypeStruct((b, seq_len), jnp.int32), segment_ids)
    else:
        perm = jnp.asarray(np.broadcast_to(layout_permutation(seq_len, num_shards, layout), (b, seq_len)))
    inverse = jnp.argsort(perm, axis=1)
    spec = PartitionSpec(None, axis_name)
    per_shard = functools.partial(_ring_shard, axis_name=axis_name, causal=causal,
                                  block_q=block_q, block_kv=block_kv,
                                  float32_logits=float32_logits)
    args = [_place(_gather(x, perm), mesh, axis_name, spec) for x in (q, k, v, segment_ids, positions)]
    out = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)(*args)
    return _gather(_place(out, mesh, axis_name, PartitionSpec()), inverse)


def _gather(x, perm_BxS):
    """``x`` [B, S, ...] with each row's sequence axis reordered by its row of ``perm_BxS``."""
    index = perm_BxS.reshape(perm_BxS.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _place(x, mesh, axis_name, spec):
    """Reshard ``x`` to ``spec`` where ``axis_name`` is an Explicit mesh axis (jax.make_mesh's
    default), which needs arrays laid out as shard_map's specs say; Auto axes need nothing."""
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    if axis_types[axis_name] != jax.sharding.AxisType.Explicit:
        return x
    return jax.reshard(x, jax.sharding.NamedSharding(mesh, spec))


def _ring_shard(q, k, v, segment_ids, positions, **kwargs: Any):
    return ring_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                          q_positions=positions, kv_positions=positions, **kwargs)
