"""Speed of our RingAttention against the reference `ringattention` 0.1.2 package.

Same inputs, devices, block sizes; causal; forward + backward (one vjp); the two take
turns run by run. Prints the best times of each and their ratio (and the ratio of
medians), for multi-head attention and for GQA (4 query heads per key/value head; the
reference gets its key/value heads repeated, inside the timed program). The reference cannot be imported on current JAX (its package `__init__` uses
`jax.lib.xla_bridge`), so its `ringattention_jax.py` is loaded by path; install it with
`pip install -e '.[bench]'`. On CPU the simulated devices share the host's cores, so the
ratio measures total work, not the ring's critical path (see ring_balance.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/python benchmarks/ring_vs_reference.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import ring_attention as ra  # noqa: E402
from trainer.ring_layout import layout_permutation  # noqa: E402


def load_reference():
    """The reference package's pure-JAX ring attention module, loaded by file path."""
    spec = importlib.util.find_spec("ringattention")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("reference not installed: pip install -e '.[bench]'")
    path = os.path.join(spec.submodule_search_locations[0], "ringattention_jax.py")
    module_spec = importlib.util.spec_from_file_location("ringattention_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def reference_attention(reference, mesh, block_q, block_kv, axis_name="sp", float32_logits=True):
    """(q, k, v) -> causal output with the reference ring over ``axis_name`` (contiguous layout)."""
    options = dict(causal_block_size=1, query_chunk_size=block_q, key_chunk_size=block_kv,
                   deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32,
                   policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                   prevent_cse=True)

    def per_shard(q, k, v):
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return reference.ring_attention(q, k, v, None, None, None, axis_name, float32_logits,
                                        options)

    spec = PartitionSpec(None, axis_name)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)


def our_attention(mesh, block_q, block_kv, axis_name="sp", float32_logits=True):
    """(q, k, v) -> causal output with our ring on inputs already in zigzag order.

    Inputs are laid out once per batch in training, so the permutation is not timed.
    """

    def per_shard(q, k, v, segment_ids, positions):
        return ra.ring_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                 q_positions=positions, kv_positions=positions,
                                 axis_name=axis_name, block_q=block_q, block_kv=block_kv,
                                 float32_logits=float32_logits)

    spec = PartitionSpec(None, axis_name)
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)

    def attention(q, k, v):
        b, seq_len = q.shape[:2]
        perm = layout_permutation(seq_len, mesh.shape[axis_name], "zigzag")
        positions = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (b, seq_len))
        return sharded(q, k, v, jnp.ones((b, seq_len), jnp.int32), positions)

    return attention


def forward_backward(attention):
    """jit((q, k, v, cotangent) -> (dq, dk, dv)): one forward and one backward."""

    @jax.jit
    def run(q, k, v, g):
        _, pullback = jax.vjp(attention, q, k, v)
        return pullback(g)

    return run


def time_it(fn, args, repeats):
    """Median wall time of ``fn(*args)`` over ``repeats`` runs after one warm-up (compile) run."""
    return statistics.median(interleaved_times({"fn": fn}, args, repeats)["fn"])


def interleaved_times(fns, args, repeats):
    """{name: [seconds per run]}: one warm-up each, then the functions take turns.

    Taking turns exposes every function to the same background load, so ratios of the
    fastest runs stay meaningful on a shared machine.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times


def inputs(mesh, batch, seq_len, q_heads, kv_heads, head_dim, dtype, axis_name="sp", seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    sharding = NamedSharding(mesh, PartitionSpec(None, axis_name))
    shapes = [(batch, seq_len, q_heads, head_dim), (batch, seq_len, kv_heads, head_dim),
              (batch, seq_len, kv_heads, head_dim), (batch, seq_len, q_heads, head_dim)]
    return [jax.device_put(jax.random.normal(key, shape, dtype), sharding)
            for key, shape in zip(keys, shapes)]


def compare(mesh, reference, *, batch, seq_len, q_heads, kv_heads, head_dim, block, dtype,
            repeats):
    """{"ours": [seconds], "reference": [seconds]} for one configuration, runs interleaved."""
    args = inputs(mesh, batch, seq_len, q_heads, kv_heads, head_dim, dtype)
    return interleaved_times({"ours": forward_backward(our_attention(mesh, block, block)),
                              "reference": forward_backward(
                                  reference_attention(reference, mesh, block, block))},
                             args, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    mesh = jax.make_mesh((args.devices,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:args.devices])
    reference = load_reference()
    print(f"{jax.devices()[0].platform} x{args.devices}, B={args.batch} S={args.seq_len} "
          f"D={args.head_dim} block={args.block}, causal fwd+bwd, fp32")
    for name, kv_heads in (("MHA", args.heads), ("GQA 4:1", args.heads // 4)):
        times = compare(mesh, reference, batch=args.batch, seq_len=args.seq_len,
                        q_heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim,
                        block=args.block, dtype=jnp.float32, repeats=args.repeats)
        ours, theirs = min(times["ours"]), min(times["reference"])
        median = statistics.median(times["ours"]) / statistics.median(times["reference"])
        print(f"{name:8s} Hq={args.heads} Hkv={kv_heads}: best of {args.repeats}: ours "
              f"{ours * 1e3:7.1f} ms, reference {theirs * 1e3:7.1f} ms, ours/reference "
              f"{ours / theirs:.2f} (medians: {median:.2f})")


if __name__ == "__main__":
    main()
