"""Per-device blockwise attention throughput on one GPU: ours against the reference.

On one device the ring has a single hop, so this measures the blockwise kernel each
device runs per hop: causal, forward + backward (one vjp), bf16 inputs, at sequence
lengths 8K-64K. TFLOP/s counts the matmuls a causal attention needs, 7 * B * S^2 * H * D
(forward 2, backward 5 matmuls of 2 * S^2 * H * D / 2 flops each), divided by wall time.
Ours runs twice: bf16 tile matmuls with fp32 accumulation (`ours`), and fp32 logits
(`ours-f32`), the mode the reference must use (with bf16 inputs and float32_logits=False
its backward fails to trace). The reference is the pure-JAX `ringattention_jax.py` of
`ringattention` 0.1.2 (loaded by path, see ring_vs_reference.py); it is skipped, with a
note, where it or its imports (einops, flax) are missing. A small correctness check against dense attention runs first.
Stops adding sequence lengths once --budget-s seconds have passed.

    .venv/bin/python benchmarks/ring_gpu.py [--heads 32 --head-dim 128 --block 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ring_vs_reference import (forward_backward, inputs, load_reference,  # noqa: E402
                               our_attention, reference_attention, time_it)

from trainer import ring_attention as ra  # noqa: E402


def check_against_dense(mesh, block):
    """Max abs error of our bf16 forward and vjp against fp32 dense attention, S = 2048."""
    q, k, v, g = inputs(mesh, 1, 2048, 8, 8, 128, jnp.bfloat16)
    got = forward_backward(our_attention(mesh, block, block, float32_logits=False))(q, k, v, g)
    seg = jnp.ones((1, 2048), jnp.int32)
    pos = jnp.arange(2048, dtype=jnp.int32)[None]
    dense = lambda q, k, v: ra.dense_attention(q, k, v, seg, seg, pos, pos, True)  # noqa: E731
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    _, pullback = jax.vjp(dense, *f32[:3])
    want = pullback(f32[3])
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip(got, want))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    mesh = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=[device])
    print(f"{device.device_kind} ({device.platform}), JAX {jax.__version__}; causal fwd+bwd, "
          f"bf16, B=1 H={args.heads} D={args.head_dim} block={args.block}")
    print(f"check vs fp32 dense (S=2048): max abs error {check_against_dense(mesh, min(args.block, 512)):.3g}")
    try:
        reference = load_reference()
    except (ImportError, SystemExit) as err:  # its imports or the package missing there
        reference = None
        print(f"reference unavailable: {err}")
    for seq_len in args.seq_lens:
        if time.perf_counter() - start > args.budget_s:
            print(f"S={seq_len}: skipped, budget of {args.budget_s:.0f} s spent")
            continue
        arrays = inputs(mesh, 1, seq_len, args.heads, args.heads, args.head_dim, jnp.bfloat16)
        flops = 7 * seq_len**2 * args.heads * args.head_dim
        programs = {"ours": our_attention(mesh, args.block, args.block, float32_logits=False),
                    "ours-f32": our_attention(mesh, args.block, args.block)}
        if reference is not None:
            programs["reference"] = reference_attention(reference, mesh, args.block, args.block)
        cells = []
        for name, fn in programs.items():
            try:
                t = time_it(forward_backward(fn), arrays, args.repeats)
                cells.append(f"{name} {t * 1e3:8.1f} ms {flops / t / 1e12:6.1f} TFLOP/s")
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: report and go on
                cells.append(f"{name} failed: {type(err).__name__}: {str(err)[:120]}")
        print(f"S={seq_len:6d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
