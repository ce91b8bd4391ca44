"""Compiled peak memory of one training step (loss + gradients) as sequence length grows.

Memory must stay linear in sequence length: ring attention over ``sp``, blockwise MLP
and chunked cross-entropy never build ``[S, S]`` or ``[S, vocab]`` tensors. Figures
come from XLA's memory analysis of the compiled per-device program (nothing runs).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/model_memory.py [--seq-lens 2048 4096 8192 16384] [--sp 8] [--batch 4] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainer import loss, model, sharding
from trainer import ring_layout as layout

CONFIG = dataclasses.replace(model.get_preset("tiny"), d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=512,
                             mlp_chunk_size=512, attention_block_q=256, attention_block_kv=256)
LOSS = loss.LossConfig(chunk_size=512)


def step_memory(seq_len: int, sp: int, batch_size: int) -> dict[str, int]:
    """Per-device bytes of the compiled loss+gradient step at ``seq_len`` on a (sp,) mesh."""
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, sp=sp), jax.devices()[:sp])
    lwm = model.LWM(CONFIG, sharding.attention_fn(mesh, CONFIG))
    batch = model.example_batch(CONFIG, batch_size, seq_len)
    batch.update(layout.next_token_targets(batch))
    del batch["loss_weights"]
    with sharding.activate(mesh):
        param_sh = sharding.param_shardings(mesh, model.abstract_params(CONFIG))
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              model.param_shapes(CONFIG), param_sh)
        batch_sh = sharding.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
        step = jax.jit(jax.value_and_grad(lambda p, b: loss.loss_and_metrics(lwm, p, b, LOSS), has_aux=True))
        analysis = step.lower(params, batch).compile().memory_analysis()
    figures = {
        "temp": analysis.temp_size_in_bytes,
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
    }
    figures["peak"] = figures["temp"] + figures["arguments"] + figures["outputs"] - figures["aliased"]
    return {"seq_len": seq_len, "sp": sp, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--sp", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    rows = [step_memory(s, args.sp, args.batch) for s in args.seq_lens]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"model: {CONFIG.num_params() / 1e6:.2f}M params, d_model {CONFIG.d_model}, layers {CONFIG.num_layers}; "
          f"sp={args.sp}, batch {args.batch}, fp32")
    print(f"{'seq_len':>8} {'peak MiB':>9} {'temp MiB':>9} {'increment MiB':>14}")
    previous = None
    for row in rows:
        increment = "" if previous is None else f"{(row['peak'] - previous) / 2**20:.2f}"
        print(f"{row['seq_len']:>8} {row['peak'] / 2**20:>9.2f} {row['temp'] / 2**20:>9.2f} {increment:>14}")
        previous = row["peak"]
    peaks = np.array([r["peak"] for r in rows], float)
    if len(rows) > 2:
        growth = np.diff(peaks)[1:] / np.diff(peaks)[:-1]
        print("growth of the increment per doubling (linear: 2, quadratic: 4):", np.round(growth, 2).tolist())


if __name__ == "__main__":
    main()
