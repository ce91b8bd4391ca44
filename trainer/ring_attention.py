"""RingAttention: exact blockwise attention over a sequence sharded on a device ring.

Each device on the mesh axis ``axis_name`` holds ``L = S / P`` tokens of the sequence
(queries, keys, values, segment ids and global positions). Queries stay put; key/value
blocks travel around the ring with ``jax.lax.ppermute`` while every device folds the
block it currently holds into an online softmax (fp32 running max, normaliser and
output). Masks are computed from the segment ids and global positions that travel with
each block, so every token layout (contiguous, zigzag, striped, per-row segments) shares
one code path.
(query block, key block) tiles that the mask makes entirely invisible are skipped, not
computed and masked, and tiles it leaves entirely visible run without building a mask
(``lax.switch`` on the tile's kind).

The whole ring is one ``jax.custom_vjp``: the forward saves q, k, v, the output and the
logsumexp; the backward is a second ring in which dk/dv travel with their key/value
blocks and probabilities are recomputed tile by tile. Memory per device is linear in
``L`` (plus one ``block_q x block_kv`` tile), never in ``S``. Token layouts live in
``trainer.ring_layout``; the global-array wrapper and tile replay for tests and benchmarks
in ``trainer.ring_testing``.

Shape legend: B batch, S global length, L local length (S / P), P ring size, Hq query
heads, K key/value heads, G = Hq // K query heads per key/value head, D head dim,
nq/nk number of query/key blocks on a device, bq/bk their lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Hashable

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min


# ----------------------------------------------------------------------------- reference


def dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    causal: bool = True):
    """Plain O(S^2) attention with the same mask semantics as :func:`ring_attention`.

    A query attends to a key iff both carry the same non-zero segment id and, if
    ``causal``, the key's position is <= the query's. Query rows with no visible key
    return zeros. Softmax runs in fp32; the result has q's dtype. Scale 1/sqrt(D).
    """
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    b, sq, hq, d = q.shape
    kh = k.shape[2]
    q_BxSxKxGxD = q.reshape(b, sq, kh, hq // kh, d).astype(_F32)
    s_BxKxGxSxT = jnp.einsum("bqkgd,bskd->bkgqs", q_BxSxKxGxD, k.astype(_F32)) * d**-0.5
    mask = _mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
    s_BxKxGxSxT = jnp.where(mask, s_BxKxGxSxT, -jnp.inf)
    m = jax.lax.stop_gradient(_finite(jnp.max(s_BxKxGxSxT, axis=-1, keepdims=True)))
    p = jnp.exp(s_BxKxGxSxT - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(_F32))
    return out.reshape(b, sq, hq, d).astype(q.dtype)


def _mask(q_seg_BxQ, kv_seg_BxT, q_pos_BxQ, kv_pos_BxT, causal):
    """Visibility [B, 1, 1, Q, T]: same non-zero segment and, if causal, key pos <= query pos."""
    visible = (q_seg_BxQ[:, :, None] == kv_seg_BxT[:, None, :]) & (q_seg_BxQ[:, :, None] > 0)
    if causal:
        visible &= kv_pos_BxT[:, None, :] <= q_pos_BxQ[:, :, None]
    return visible[:, None, None]


def _varying_like(x, *refs):
    """Mark ``x`` as varying over the mesh axes any of ``refs`` varies over (shard_map vma).

    Fresh accumulators (zeros) are device-invariant; loop carries and ``lax.switch``
    branches must agree with the device-varying values folded into them.
    """
    axes = set().union(*(_vma(r) for r in refs)) - _vma(x)
    return jax.lax.pcast(x, tuple(sorted(axes, key=str)), to="varying") if axes else x


def _vma(x) -> frozenset:
    """Mesh axes ``x`` varies over (``aval.mat.varying`` since JAX 0.10, ``aval.vma`` before)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _finite(x):
    """Replace -inf (rows with no visible key yet) by 0 so ``exp(s - m)`` never sees inf - inf."""
    return jnp.where(jnp.isneginf(x), 0.0, x)


def _check_shapes(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,S,Hq,D] and k == v [B,S,K,D], got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    b, sq, hq, d = q.shape
    _, sk, kh, dk = k.shape
    if k.shape[0] != b or dk != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if hq % kh:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {kh}")
    for name, arr, want in (("q_segment_ids", q_seg, (b, sq)), ("kv_segment_ids", kv_seg, (b, sk)),
                            ("q_positions", q_pos, (b, sq)), ("kv_positions", kv_pos, (b, sk))):
        if tuple(arr.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {arr.dtype}")


# ----------------------------------------------------------------------------- ring


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    """Static settings of one ring (hashable: it is a custom_vjp non-differentiable arg)."""

    axis_name: Hashable
    causal: bool
    block_q: int
    block_kv: int
    float32_logits: bool


def ring_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                   axis_name: Hashable, causal: bool = True, block_q: int = 512,
                   block_kv: int = 512, float32_logits: bool = True):
    """Exact attention of this device's queries against all keys on the ``axis_name`` ring.

    Call per shard inside ``jax.shard_map``; only collectives over ``axis_name`` are
    used, so the shard_map may cover other mesh axes too (batch over dp/fsdp, heads
    over tp). Shapes per shard: q [B, L, Hq, D], k and v [B, L, K, D] with Hq % K == 0
    (key/value heads rotate un-repeated), segment ids and positions [B, L] integer.
    Segment id 0 is padding. The causal mask compares positions only between tokens of
    one segment, so positions may be global token indices (best: tiles are skipped by
    position ranges) or positions restarting at 0 in each segment (same result, provided
    each segment is one run of tokens in natural order). Query rows with no visible key
    return zeros. Blocks of ``block_q``
    queries and ``block_kv`` keys (clipped to L, must divide it) bound the working set;
    ``float32_logits`` runs the tile matmuls in fp32 (else in the input dtype with fp32
    accumulation). Statistics, accumulators and gradients are fp32 either way.
    Returns [B, L, Hq, D] in q's dtype.
    """
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    length = q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"q and k must hold the same number of tokens per device, got "
                         f"{length} and {k.shape[1]}")
    cfg = _RingConfig(axis_name, bool(causal), _block(block_q, length, "block_q"),
                      _block(block_kv, length, "block_kv"), bool(float32_logits))
    return _ring(cfg, q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                 q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32))


def _block(block: int, length: int, name: str) -> int:
    block = min(int(block), length)
    if block < 1 or length % block:
        raise ValueError(f"{name}={block} must be >= 1 and divide the local length {length}")
    return block


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    return _ring_fwd(cfg, q, k, v, q_seg, kv_seg, q_pos, kv_pos)[0]


def _rotate(tree, axis_name, size):
    """Send every leaf to the next device on the ring."""
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.lax.ppermute(tree, axis_name, perm)


def _ring_loop(cfg, hop, state, kv):
    """Apply ``state = hop(state, kv)`` for each of the P shards that visit this device.

    One ``lax.scan`` over the first P - 1 hops (program size independent of P); each
    step starts the rotation of the shard it holds before computing on it, so XLA can
    overlap the two. The last hop runs after the scan and sends nothing: the rotation
    that would only bring the shards home is never made.
    """
    size = jax.lax.axis_size(cfg.axis_name)

    def step(carry, _):
        state, kv = carry
        incoming = _rotate(kv, cfg.axis_name, size)
        return (hop(state, kv), incoming), None

    if size > 1:
        (state, kv), _ = jax.lax.scan(step, (state, kv), length=size - 1)
    return hop(state, kv)


def _split(x, block, axis=1):
    """Cut ``axis`` into blocks and put the block index first (for ``lax.scan``).

    [B, L] -> [L / block, B, block]; with ``axis=3``, [B, K, G, L, D] -> [nq, B, K, G, bq, D].
    """
    x = x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis=1):
    """Inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _heads_major(x, kv_heads):
    """[B, L, K * G, D] -> [B, K, G, L, D]: tile matmuls then need no per-tile transposes."""
    b, length, h, d = x.shape
    return x.reshape(b, length, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _tokens_major(x):
    """Inverse of :func:`_heads_major`."""
    b, k, g, length, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, length, k * g, d)


SKIP, FULL, PARTIAL = 0, 1, 2  # tile kinds, see tile_kinds


def _block_ranges(seg_NxBxb, pos_NxBxb):
    """Per block and batch row over non-padding tokens: min/max position, min/max segment,
    and whether the block has no padding at all."""
    valid = seg_NxBxb > 0
    return (jnp.min(jnp.where(valid, pos_NxBxb, _INT_MAX), axis=-1),
            jnp.max(jnp.where(valid, pos_NxBxb, _INT_MIN), axis=-1),
            jnp.min(jnp.where(valid, seg_NxBxb, _INT_MAX), axis=-1),
            jnp.max(jnp.where(valid, seg_NxBxb, 0), axis=-1),
            jnp.all(valid, axis=-1))


def tile_kinds(q_seg_NxBxb, q_pos_NxBxb, kv_seg_MxBxb, kv_pos_MxBxb, causal: bool):
    """Int [nq, nk] saying how the ring treats (query block i, key block j).

    ``SKIP``: no query of block i can see a key of block j in any batch row, so the tile
    is not computed; ``FULL``: every query sees every key (one segment, no padding, and
    if causal all keys at or before all queries), so no mask is built; ``PARTIAL``: the
    rest, computed with the mask. Conservative: a tile with a visible pair is never
    skipped, and it is exact at block level for causal masks and non-interleaved segments.
    """
    q_pmin, q_pmax, q_smin, q_smax, q_dense = (
        x[:, None] for x in _block_ranges(q_seg_NxBxb, q_pos_NxBxb))
    k_pmin, k_pmax, k_smin, k_smax, k_dense = (
        x[None] for x in _block_ranges(kv_seg_MxBxb, kv_pos_MxBxb))
    visible = (q_smin <= k_smax) & (k_smin <= q_smax)
    full = q_dense & k_dense & (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin)
    if causal:
        visible &= k_pmin <= q_pmax
        full &= k_pmax <= q_pmin
    return jnp.where(jnp.any(visible, axis=-1),
                     jnp.where(jnp.all(full, axis=-1), FULL, PARTIAL), SKIP).astype(jnp.int32)


def _compute_dtype(cfg, x):
    return _F32 if cfg.float32_logits else x.dtype


def _dot(cfg, spec, x, y):
    """A tile matmul: operands in fp32 or the input dtype, fp32 accumulation."""
    dtype = _compute_dtype(cfg, y)
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=_F32)


def _query_side(cfg, q, kv_heads, q_seg, q_pos):
    """Query blocks [nq, B, K, G, bq, D] pre-scaled by 1/sqrt(D), their segment ids and positions."""
    scaled = (q.astype(_F32) * q.shape[-1] ** -0.5).astype(_compute_dtype(cfg, q))
    return (_split(_heads_major(scaled, kv_heads), cfg.block_q, axis=3),
            _split(q_seg, cfg.block_q), _split(q_pos, cfg.block_q))


def _kv_shard(k, v, kv_seg, kv_pos):
    """What travels the ring: k, v as [B, K, L, D] (input dtype), segment ids, positions."""
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), kv_seg, kv_pos


def _kv_blocks(cfg, kv):
    k, v, kv_seg, kv_pos = kv
    return (_split(k, cfg.block_kv, axis=2), _split(v, cfg.block_kv, axis=2),
            _split(kv_seg, cfg.block_kv), _split(kv_pos, cfg.block_kv))


def _logits(cfg, masked, q_i, q_seg_i, q_pos_i, k_j, kv_seg_j, kv_pos_j):
    """Logits [B, K, G, bq, bk] in fp32; if ``masked``, -inf where the key is invisible."""
    s = _dot(cfg, "bkgqd,bksd->bkgqs", q_i, k_j)
    if not masked:
        return s
    return jnp.where(_mask(q_seg_i, kv_seg_j, q_pos_i, kv_pos_j, cfg.causal), s, -jnp.inf)


def _take(blocks, i):
    """Block ``i`` of each accumulator (accumulators are loop carries updated in place,
    not scanned over, so XLA keeps one buffer of each instead of an input and an output)."""
    return tuple(jax.lax.dynamic_index_in_dim(x, i, keepdims=False) for x in blocks)


def _put(blocks, i, values):
    return tuple(jax.lax.dynamic_update_index_in_dim(x, y, i, 0) for x, y in zip(blocks, values))


def _by_kind(kind, tile, carry):
    """Skip, or run ``tile(carry, masked)`` without (FULL) or with (PARTIAL) the mask."""
    return jax.lax.switch(kind, (lambda c: c, functools.partial(tile, masked=False),
                                 functools.partial(tile, masked=True)), carry)


def _tie(*arrays):
    """Make segment ids and positions depend on the activations they travel with.

    Inside ``lax.scan`` over layers under ``grad``, JAX hoists whatever is computed only
    from loop-invariant values (the batch's segment ids and positions) out of the loop;
    for the ring that means every hop's tile masks at once, quadratic in S. An
    optimization barrier over all inputs makes each output depend on all of them. This
    is the only guard: the model passes loop-invariant segment ids and positions to its
    layer scan (its former ``+ 0 * layer_index`` tie measured the same memory).
    """
    return jax.lax.optimization_barrier(arrays)


def _ring_fwd(cfg, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    """Forward ring. Residuals: the inputs, the output and the logsumexp [nq, B, K, G, bq]."""
    q, k, v, q_seg, kv_seg, q_pos, kv_pos = _tie(q, k, v, q_seg, kv_seg, q_pos, kv_pos)
    kv_heads = k.shape[2]
    q_blocks, q_seg_blocks, q_pos_blocks = _query_side(cfg, q, kv_heads, q_seg, q_pos)
    refs = (q, k, v, q_seg, kv_seg, q_pos, kv_pos)
    o = _varying_like(jnp.zeros(q_blocks.shape, _F32), *refs)
    m = _varying_like(jnp.full(q_blocks.shape[:-1], -jnp.inf, _F32), *refs)
    l = jnp.zeros_like(m)

    def hop(acc, kv):
        return _hop_forward(cfg, q_blocks, q_seg_blocks, q_pos_blocks, acc, _kv_blocks(cfg, kv))

    o, m, l = _ring_loop(cfg, hop, (o, m, l), _kv_shard(k, v, kv_seg, kv_pos))
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    out = _tokens_major(_merge(o, axis=3)).astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _hop_forward(cfg, q_blocks, q_seg_blocks, q_pos_blocks, acc, kv_blocks):
    """Fold one key/value shard into the running (output, max, normaliser) of every query block."""
    kinds_NxM = tile_kinds(q_seg_blocks, q_pos_blocks, *kv_blocks[2:], cfg.causal)

    def tile(carry, q_i, q_seg_i, q_pos_i, k_j, v_j, kv_seg_j, kv_pos_j, masked):
        o_i, m_i, l_i = carry
        s = _logits(cfg, masked, q_i, q_seg_i, q_pos_i, k_j, kv_seg_j, kv_pos_j)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
        m_safe = _finite(m_new) if masked else m_new  # a FULL tile gives every row a key
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m_i - m_safe)
        l_new = l_i * correction + jnp.sum(p, axis=-1)
        o_new = o_i * correction[..., None] + _dot(cfg, "bkgqs,bksd->bkgqd", p, v_j)
        return o_new, m_new, l_new

    def per_query_block(acc, xs):
        i, q_i, q_seg_i, q_pos_i, kinds_j = xs

        def per_key_block(carry, ys):
            *kv_j, kind = ys
            run = functools.partial(tile, q_i=q_i, q_seg_i=q_seg_i, q_pos_i=q_pos_i,
                                    k_j=kv_j[0], v_j=kv_j[1], kv_seg_j=kv_j[2], kv_pos_j=kv_j[3])
            return _by_kind(kind, run, carry), None

        carry, _ = jax.lax.scan(per_key_block, _take(acc, i), (*kv_blocks, kinds_j))
        return _put(acc, i, carry), None

    acc, _ = jax.lax.scan(per_query_block, acc, (jnp.arange(len(q_blocks)), q_blocks, q_seg_blocks,
                                                 q_pos_blocks, kinds_NxM))
    return acc


def _ring_bwd(cfg, res, g):
    """Backward ring: dq stays home, dk/dv travel with their blocks and get one last hop home."""
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse, g = _tie(*res, g)
    size = jax.lax.axis_size(cfg.axis_name)
    kv_heads = k.shape[2]
    q_blocks, q_seg_blocks, q_pos_blocks = _query_side(cfg, q, kv_heads, q_seg, q_pos)
    do_blocks = _split(_heads_major(g.astype(_compute_dtype(cfg, g)), kv_heads), cfg.block_q, 3)
    delta = jnp.sum(g.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
    delta_blocks = _split(_heads_major(delta, kv_heads)[..., 0], cfg.block_q, axis=3)
    q_side = (q_blocks, q_seg_blocks, q_pos_blocks, do_blocks, lse, delta_blocks)
    kv = _kv_shard(k, v, kv_seg, kv_pos)
    refs = (q, k, v, q_seg, kv_seg, q_pos, kv_pos, g)
    dq = _varying_like(jnp.zeros(q_blocks.shape, _F32), *refs)
    dkv = tuple(_varying_like(jnp.zeros(x.shape, _F32), *refs) for x in kv[:2])

    def hop(grads, kv):
        dq, dkv = _hop_backward(cfg, q_side, grads, _kv_blocks(cfg, kv))
        return dq, _rotate(dkv, cfg.axis_name, size)

    dq, (dk, dv) = _ring_loop(cfg, hop, (dq, dkv), kv)
    # q was pre-scaled, so the tiles produced dq / sqrt(D) (and dk already includes it).
    dq = _tokens_major(_merge(dq, axis=3)) * q.shape[-1] ** -0.5
    return (dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dv.transpose(0, 2, 1, 3).astype(v.dtype), None, None, None, None)


def _hop_backward(cfg, q_side, grads, kv_blocks):
    """Accumulate dq (home) and dk/dv (of the visiting shard) over all visible tiles."""
    q_blocks, q_seg_blocks, q_pos_blocks = q_side[:3]
    dq, dkv = grads
    dkv_blocks = tuple(_split(x, cfg.block_kv, axis=2) for x in dkv)
    kinds_NxM = tile_kinds(q_seg_blocks, q_pos_blocks, *kv_blocks[2:], cfg.causal)

    def tile(carry, q_side_i, kv_j, masked):
        dq_i, dk_j, dv_j = carry
        q_i, q_seg_i, q_pos_i, do_i, lse_i, delta_i = q_side_i
        k_j, v_j, kv_seg_j, kv_pos_j = kv_j
        s = _logits(cfg, masked, q_i, q_seg_i, q_pos_i, k_j, kv_seg_j, kv_pos_j)
        p = jnp.exp(s - lse_i[..., None])
        dv_j = dv_j + _dot(cfg, "bkgqs,bkgqd->bksd", p, do_i)
        ds = p * (_dot(cfg, "bkgqd,bksd->bkgqs", do_i, v_j) - delta_i[..., None])
        dq_i = dq_i + _dot(cfg, "bkgqs,bksd->bkgqd", ds, k_j)
        dk_j = dk_j + _dot(cfg, "bkgqs,bkgqd->bksd", ds, q_i)
        return dq_i, dk_j, dv_j

    def per_query_block(grads, xs):
        i, *q_side_i, kinds_j = xs
        dq, dkv_blocks = grads

        def per_key_block(carry, ys):
            j, *kv_j, kind = ys
            dq_i, dkv_blocks = carry
            run = functools.partial(tile, q_side_i=q_side_i, kv_j=kv_j)
            dq_i, *dkv_j = _by_kind(kind, run, (dq_i, *_take(dkv_blocks, j)))
            return (dq_i, _put(dkv_blocks, j, dkv_j)), None

        (dq_i, dkv_blocks), _ = jax.lax.scan(
            per_key_block, (_take((dq,), i)[0], dkv_blocks),
            (jnp.arange(len(kv_blocks[0])), *kv_blocks, kinds_j))
        return (_put((dq,), i, (dq_i,))[0], dkv_blocks), None

    (dq, dkv_blocks), _ = jax.lax.scan(per_query_block, (dq, dkv_blocks),
                                       (jnp.arange(len(q_blocks)), *q_side, kinds_NxM))
    return dq, tuple(_merge(x, axis=2) for x in dkv_blocks)


_ring.defvjp(_ring_fwd, _ring_bwd)
