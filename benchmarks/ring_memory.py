"""Peak device memory of RingAttention forward + backward, from XLA's compiled memory analysis.

Nothing is run: each program is compiled for P simulated devices and its per-device
memory analysis read (arguments + outputs + temporaries - aliased). Two sweeps:

1. fixed per-device chunk c, P and S = P * c growing together: should stay flat;
2. fixed S, P (and so c = S / P) varying: should be linear in c.

Both for our ring (causal, zigzag) and, when installed (`pip install -e '.[bench]'`),
the reference `ringattention` 0.1.2 on the same inputs and block sizes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/python benchmarks/ring_memory.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring_vs_reference import (forward_backward, inputs, load_reference,  # noqa: E402
                               our_attention, reference_attention)


def peak_bytes(fn, args):
    """Per-device peak of the compiled program: arguments + outputs + temporaries - aliases."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def measure(num_shards, seq_len, args, reference):
    """{name: peak MiB} for ours and (if given) the reference at one (P, S)."""
    mesh = jax.make_mesh((num_shards,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:num_shards])
    arrays = inputs(mesh, args.batch, seq_len, args.heads, args.heads, args.head_dim,
                    jnp.float32)
    block = min(args.block, seq_len // num_shards // 2)
    programs = {"ours": our_attention(mesh, block, block)}
    if reference is not None:
        programs["reference"] = reference_attention(reference, mesh, block, block)
    return {name: peak_bytes(forward_backward(fn), arrays) / 2**20
            for name, fn in programs.items()}


def report(label, value, peaks, first):
    cells = "  ".join(f"{name} {mib:7.2f} MiB (x{mib / first[name]:.2f})"
                      for name, mib in peaks.items())
    print(f"{label}={value:6d}  {cells}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per device, sweep 1")
    parser.add_argument("--seq-len", type=int, default=8192, help="total tokens, sweep 2")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args(argv)
    reference = None if args.no_reference else load_reference()
    device_counts = [p for p in (1, 2, 4, 8) if p <= len(jax.devices())]
    print(f"causal fwd+bwd, fp32, B={args.batch} H={args.heads} D={args.head_dim} "
          f"block={args.block}; per-device peak (ratio to the first row)")
    print(f"1. fixed chunk c={args.chunk}, S = P * c")
    first = None
    for p in device_counts:
        peaks = measure(p, p * args.chunk, args, reference)
        first = first or peaks
        report("P", p, peaks, first)
    print(f"2. fixed S={args.seq_len}, chunk c = S / P")
    first = None
    for p in reversed(device_counts):
        peaks = measure(p, args.seq_len, args, reference)
        first = first or peaks
        report("c", args.seq_len // p, peaks, first)


if __name__ == "__main__":
    main()
