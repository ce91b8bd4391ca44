"""RingAttention equals dense attention (values and gradients) on 1-8 simulated devices.

Every comparison runs fp32 with highest matmul precision on unit-scale random inputs and
checks the forward output and the vjp (dq, dk, dv) for a random cotangent. The batch
rows carry the segment patterns that matter: packed segments crossing device
boundaries with one-token segments, a long segment with trailing padding, and a row
that is mostly padding (query rows with no visible key, in some hops or in all).
"""

import functools
import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from trainer import ring_layout
from trainer import ring_attention as ra
from trainer import ring_testing

SEQ = 64
HEAD_DIM = 8
KV_HEADS = 2
TOL = 1e-5


def _segments(*rows):
    """[len(rows), SEQ] segment ids from per-row segment lengths; the rest is padding."""
    out = np.zeros((len(rows), SEQ), np.int32)
    for b, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths, start=1):
            out[b, start:start + n] = i
            start += n
    return jnp.asarray(out)


SEGMENTS = _segments([5, 1, 13, 1, 1, 20, 9, 14], [50], [2, 9, 1])


def _mesh(num_shards, names=("sp",), shape=None):
    shape = shape or (num_shards,)
    devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _inputs(gqa, batch=3, dtype=jnp.float32, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, SEQ, KV_HEADS * gqa, HEAD_DIM))
    k = jax.random.normal(kk, (batch, SEQ, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(kv, (batch, SEQ, KV_HEADS, HEAD_DIM))
    g = jax.random.normal(kg, q.shape)
    return tuple(x.astype(dtype) for x in (q, k, v)) + (g,)


def _value_and_vjp(attention):
    """jit(q, k, v, segment_ids, cotangent) -> (output, (dq, dk, dv)), fp32 matmuls."""

    @jax.jit
    def run(q, k, v, segment_ids, g):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids), q, k, v)
        return out, pullback(g.astype(out.dtype))

    def call(*args):
        with jax.default_matmul_precision("highest"):
            return run(*args)

    return call


@functools.cache
def _dense(causal):
    return _value_and_vjp(functools.partial(ring_testing.sharded_attention, mesh=None, causal=causal,
                                            impl="dense"))


def _assert_ring_matches_dense(num_shards, layout, causal, gqa, block_q=4, block_kv=4,
                               segment_ids=SEGMENTS):
    ring = _value_and_vjp(functools.partial(
        ring_testing.sharded_attention, mesh=_mesh(num_shards), causal=causal, layout=layout,
        block_q=block_q, block_kv=block_kv))
    q, k, v, g = _inputs(gqa, batch=segment_ids.shape[0])
    got, want = ring(q, k, v, segment_ids, g), _dense(causal)(q, k, v, segment_ids, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)
    padding = np.asarray(segment_ids == 0)
    assert np.all(np.asarray(got[0])[padding] == 0), "padding queries must return zeros"


# Every (devices, layout) pair, causal, with the GQA ratio varying across device counts;
# a few non-causal ones and unequal block sizes. The full product is the slow test below.
GQA_FOR = {1: 4, 2: 1, 4: 2, 8: 4}


@pytest.mark.parametrize("num_shards,layout", [(1, "contiguous")] + [
    (p, layout) for p in (2, 4, 8) for layout in ring_layout.LAYOUTS])
def test_causal_ring_equals_dense(num_shards, layout):
    """On one device every layout is the natural order, so P=1 runs once."""
    _assert_ring_matches_dense(num_shards, layout, True, GQA_FOR[num_shards])


@pytest.mark.parametrize("num_shards,layout,gqa", [(2, "striped", 2), (4, "contiguous", 4),
                                                   (8, "zigzag", 1), (4, "segments", 2)])
def test_bidirectional_ring_equals_dense(num_shards, layout, gqa):
    _assert_ring_matches_dense(num_shards, layout, False, gqa)


def test_unequal_query_and_key_blocks_equal_dense():
    _assert_ring_matches_dense(2, "zigzag", True, 2, block_q=8, block_kv=2)


@pytest.mark.parametrize("causal", [True, False])
def test_unpadded_rows_take_the_unmasked_tile_path_and_equal_dense(causal):
    """Rows without padding whose segments span whole blocks: FULL tiles run without a mask."""
    segment_ids = _segments([SEQ], [32, 32])
    on_device_0 = ring_layout.layout_permutation(SEQ, 2, "zigzag")[:SEQ // 2]
    seg = ra._split(segment_ids[:, on_device_0], 8)
    pos = ra._split(jnp.broadcast_to(jnp.asarray(on_device_0), (2, SEQ // 2)), 8)
    assert ra.FULL in np.asarray(ra.tile_kinds(seg, pos, seg, pos, causal))
    _assert_ring_matches_dense(2, "zigzag", causal, 2, block_q=8, block_kv=8,
                               segment_ids=segment_ids)


@pytest.mark.slow
@pytest.mark.parametrize("num_shards,layout,causal,gqa", itertools.product(
    [1, 2, 4, 8], ring_layout.LAYOUTS, [True, False], [1, 2, 4]))
def test_ring_equals_dense_full_grid(num_shards, layout, causal, gqa):
    _assert_ring_matches_dense(num_shards, layout, causal, gqa)


def test_segments_layout_places_rows_differently_and_equals_dense():
    """Per row: some of SEGMENTS' rows get a balanced placement of whole blocks (neither zigzag
    nor contiguous) on 2 and 4 devices, and the ring still equals dense attention."""
    for num_shards in (2, 4):
        perms = ring_layout.batch_permutation(SEGMENTS, num_shards, "segments", 4)
        static = [ring_layout.layout_permutation(SEQ, num_shards, name) for name in ("zigzag", "contiguous")]
        assert any(not any(np.array_equal(p, s) for s in static) for p in perms)
        _assert_ring_matches_dense(num_shards, "segments", True, 2)


@given(st.lists(st.integers(1, 24), min_size=1, max_size=12), st.integers(0, 20))
@settings(max_examples=12, deadline=None)
def test_random_packings_equal_dense(lengths, padding):
    """Any packing (segments cut at SEQ - padding tokens) gives the dense result."""
    ids = np.zeros(SEQ, np.int32)
    ends = np.minimum(np.cumsum(lengths), SEQ - padding)
    starts = np.concatenate([[0], ends[:-1]])
    for i, (s, e) in enumerate(zip(starts, ends), start=1):
        ids[s:e] = i
    segment_ids = jnp.asarray(ids[None])
    q, k, v, g = (x[:1] for x in _inputs(2, seed=len(lengths)))
    got = _random_packing_ring("zigzag")(q, k, v, segment_ids, g)
    want = _dense(True)(q, k, v, segment_ids, g)
    segments = _random_packing_ring("segments")(q, k, v, segment_ids, g)
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(segments)):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        np.testing.assert_allclose(c, b, atol=TOL, rtol=0)


@functools.cache
def _random_packing_ring(layout):
    return _value_and_vjp(functools.partial(ring_testing.sharded_attention, mesh=_mesh(4), layout=layout,
                                            block_q=2, block_kv=4))


@pytest.mark.parametrize("float32_logits", [True, False])
def test_bf16_inputs_within_bf16_tolerance_of_fp32_dense(float32_logits):
    """bf16 in and out; tile matmuls in fp32, or in bf16 with fp32 accumulation."""
    q, k, v, g = _inputs(2)
    ring = _value_and_vjp(functools.partial(ring_testing.sharded_attention, mesh=_mesh(4), block_q=4,
                                            block_kv=4, float32_logits=float32_logits))
    got = ring(*(x.astype(jnp.bfloat16) for x in (q, k, v)), SEGMENTS, g)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v, g)]
    want = _dense(True)(*rounded[:3], SEGMENTS, rounded[3])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2, rtol=2e-2)


def test_scan_over_layers_with_checkpoint_matches_dense():
    """Gradients through scan(checkpoint(layer)) with ring attention equal the dense model's."""
    q, k, v, _ = _inputs(2, batch=3)
    scales = jnp.asarray([[0.7, 1.3], [1.1, 0.5]])

    def model(impl, x, scales):
        def layer(h, scale):
            kv = h[:, :, ::2] * scale[1]
            out = ring_testing.sharded_attention(h * scale[0], kv, kv, SEGMENTS, mesh=_mesh(4), impl=impl,
                                       layout="striped", block_q=4, block_kv=4)
            return h + out, None

        policy = jax.checkpoint_policies.nothing_saveable
        h, _ = jax.lax.scan(jax.checkpoint(layer, policy=policy), x, scales)
        return jnp.sum(jnp.sin(h))

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.value_and_grad(functools.partial(model, "ring"), argnums=(0, 1)))(q, scales)
        want = jax.jit(jax.value_and_grad(functools.partial(model, "dense"), argnums=(0, 1)))(q, scales)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_sharded_attention_accepts_a_mesh_with_explicit_axes():
    """jax.make_mesh's default (Explicit axis types) works as well as Auto."""
    mesh = jax.make_mesh((2,), ("sp",), devices=jax.devices()[:2])
    q, k, v, _ = _inputs(2)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(functools.partial(ring_testing.sharded_attention, mesh=mesh, block_q=8,
                                        block_kv=8))(q, k, v, SEGMENTS)
        want = ring_testing.sharded_attention(q, k, v, SEGMENTS, mesh=None, impl="dense")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _positions_in_segment(segment_ids):
    """Positions restarting at 0 in each segment (as the packed examples carry them)."""
    ids = np.asarray(segment_ids)
    starts = np.concatenate([np.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    index = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return jnp.asarray(index - np.maximum.accumulate(np.where(starts, index, 0), axis=1),
                       jnp.int32)


def test_memory_stays_linear_inside_a_scan_over_layers_under_grad():
    """Masks come from loop-invariant segment ids and positions; they must not be hoisted
    out of the layer scan for all hops and tiles at once (quadratic in S)."""
    spec = PartitionSpec(None, "sp")

    def per_shard(x, seg, pos):
        def layer(h, scale):
            out = ra.ring_attention(h * scale, h, h, q_segment_ids=seg, kv_segment_ids=seg,
                                    q_positions=pos, kv_positions=pos, axis_name="sp",
                                    block_q=128, block_kv=128)
            return h + out, None

        return jax.lax.scan(layer, x, jnp.ones(2))[0]

    attention = jax.shard_map(per_shard, mesh=_mesh(8), in_specs=(spec,) * 3, out_specs=spec)
    temp = []
    for seq_len in (2048, 4096):
        x = jnp.ones((1, seq_len, 2, 16))
        seg = jnp.ones((1, seq_len), jnp.int32)
        pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
        grad = jax.jit(jax.grad(lambda x: jnp.sum(attention(x, seg, pos))))
        temp.append(grad.lower(x).compile().memory_analysis().temp_size_in_bytes)
    assert temp[1] / temp[0] < 2.5, temp


@pytest.mark.parametrize("layout", ["zigzag", "segments"])
def test_ring_inside_multi_axis_shard_map_uses_only_its_axis(layout):
    """Batch on dp, heads on tp, sequence on sp: the per-shard call still equals dense, with
    positions restarting in each segment (the mask compares positions within a segment), as
    the model passes them, in a static and in the per-row layout."""
    mesh = _mesh(8, ("dp", "sp", "tp"), (2, 2, 2))
    q, k, v, g = _inputs(2, batch=2)
    segment_ids = SEGMENTS[:2]
    perm = ring_layout.batch_permutation(segment_ids, 2, layout, 4)
    inverse = np.argsort(perm, axis=1)
    positions = _positions_in_segment(segment_ids)
    assert int(positions[0, 5]) == 0 and int(positions[0, 7]) == 1

    def per_shard(q, k, v, seg, pos):
        return ra.ring_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                                 kv_positions=pos, axis_name="sp", block_q=4, block_kv=8)

    heads, tokens = PartitionSpec("dp", "sp", "tp"), PartitionSpec("dp", "sp")
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(heads,) * 3 + (tokens,) * 2,
                            out_specs=heads)

    def attention(q, k, v, seg):
        def gather(x, index):
            return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

        return gather(sharded(*(gather(x, perm) for x in (q, k, v, seg, positions))), inverse)

    got = _value_and_vjp(attention)(q, k, v, segment_ids, g)
    want = _dense(True)(q, k, v, segment_ids, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


def _rotations(jaxpr, times=1):
    """Tensors sent by ppermute when ``jaxpr`` runs (scan bodies count once per iteration)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            count += times * len(eqn.invars)
        inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
                if isinstance(sub, jax.extend.core.Jaxpr):
                    count += _rotations(sub, inner)
    return count


@pytest.mark.parametrize("num_shards", [1, 2, 8])
def test_forward_rotates_each_tensor_p_minus_1_times(num_shards):
    """k, v, segment ids, positions: P-1 sends each, from one loop body in the lowered program;
    the backward adds P-1 per key/value tensor plus P for dk/dv (their last hop brings them home)."""
    q, k, v, _ = _inputs(1, batch=1)
    attention = functools.partial(ring_testing.sharded_attention, segment_ids=SEGMENTS[:1],
                                  mesh=_mesh(num_shards), block_q=4, block_kv=4)
    assert _rotations(jax.make_jaxpr(attention)(q, k, v).jaxpr) == 4 * (num_shards - 1)
    lowered = jax.jit(attention).lower(q, k, v).as_text()
    assert lowered.count("collective_permute") == (4 if num_shards > 1 else 0)
    grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))
    assert _rotations(jax.make_jaxpr(grad)(q, k, v).jaxpr) == 8 * (num_shards - 1) + 2 * num_shards


# ----------------------------------------------------------------------------- layouts, balance


@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from(ring_layout.STATIC_LAYOUTS))
def test_layout_permutation_is_a_permutation_with_inverse(num_shards, chunk, layout):
    seq_len = 2 * num_shards * chunk
    perm = ring_layout.layout_permutation(seq_len, num_shards, layout)
    np.testing.assert_array_equal(np.sort(perm), np.arange(seq_len))
    inverse = ring_layout.inverse_layout_permutation(seq_len, num_shards, layout)
    np.testing.assert_array_equal(np.arange(seq_len)[perm][inverse], np.arange(seq_len))


@given(st.integers(1, 8), st.integers(1, 6))
def test_zigzag_device_r_holds_chunks_r_and_mirror(num_shards, chunk):
    seq_len = 2 * num_shards * chunk
    shards = ring_layout.layout_permutation(seq_len, num_shards, "zigzag").reshape(num_shards, 2, chunk)
    for r in range(num_shards):
        np.testing.assert_array_equal(shards[r, 0], np.arange(r * chunk, (r + 1) * chunk))
        mirror = 2 * num_shards - 1 - r
        np.testing.assert_array_equal(shards[r, 1], np.arange(mirror * chunk, (mirror + 1) * chunk))


@given(st.integers(1, 8), st.integers(1, 6))
def test_striped_token_i_on_device_i_mod_p(num_shards, per_device):
    seq_len = num_shards * per_device
    shards = ring_layout.layout_permutation(seq_len, num_shards, "striped").reshape(num_shards, -1)
    for r in range(num_shards):
        assert np.all(shards[r] % num_shards == r)


def test_causal_tile_kinds_skip_above_mask_on_and_fill_below_the_diagonal():
    positions = ra._split(jnp.arange(16, dtype=jnp.int32)[None], 4)
    segment_ids = jnp.ones_like(positions)
    kinds = ra.tile_kinds(segment_ids, positions, segment_ids, positions, causal=True)
    want = np.full((4, 4), ra.SKIP)
    want[np.tril_indices(4, -1)] = ra.FULL
    want[np.diag_indices(4)] = ra.PARTIAL
    np.testing.assert_array_equal(kinds, want)


def test_contiguous_causal_tiles_form_the_block_triangle():
    counts = ring_testing.ring_tile_counts(np.ones((1, 64), np.int32), 4, "contiguous", 4, 4)
    triangle, full = 4 * 5 // 2, 16
    want = np.array([[triangle] * 4] + [[full if r >= h else 0 for r in range(4)] for h in range(1, 4)])
    np.testing.assert_array_equal(counts, want)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_balanced_layouts_give_every_device_equal_work_per_hop(layout):
    counts = ring_testing.ring_tile_counts(np.ones((1, 1024), np.int32), 8, layout, 16, 16)
    assert np.all(counts.max(axis=1) - counts.min(axis=1) <= 1024 // 8 // 16)
    assert counts.max(axis=1).sum() / counts.mean(axis=1).sum() <= 1.1


def test_tiles_of_other_segments_are_skipped():
    """Two segments that each fill one device's tokens never meet on the ring."""
    segment_ids = np.repeat(np.array([[1, 2]], np.int32), 32, axis=1)
    counts = ring_testing.ring_tile_counts(segment_ids, 2, "contiguous", 8, 8, causal=False)
    np.testing.assert_array_equal(counts, [[16, 16], [0, 0]])


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_errors():
    q, k, v, _ = _inputs(2, batch=1)
    seg = SEGMENTS[:1]
    with pytest.raises(ValueError, match="layout"):
        ring_layout.layout_permutation(64, 4, "spiral")
    with pytest.raises(ValueError, match="multiple of 8"):
        ring_layout.layout_permutation(60, 4, "zigzag")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ra.dense_attention(q[..., :3, :], k, v, seg, seg, seg, seg)
    with pytest.raises(ValueError, match="q_positions"):
        ra.dense_attention(q, k, v, seg, seg, seg[:, :5], seg)
    with pytest.raises(ValueError, match="impl"):
        ring_testing.sharded_attention(q, k, v, seg, mesh=_mesh(2), impl="flash")
    with pytest.raises(ValueError, match="block_q"):
        ring_testing.sharded_attention(q, k, v, seg, mesh=_mesh(2), block_q=5)
