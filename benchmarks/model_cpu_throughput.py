"""Forward+backward tokens/s of the tiny preset on CPU (loss and gradients, no optimizer update).

Two set-ups: one device with dense attention, and 8 simulated devices (fsdp=8, or
sp=8 with ring attention in the zigzag layout). On a 2-core machine the simulated
devices share the cores, so the mesh figures measure overhead, not speed-up.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/model_cpu_throughput.py [--batch 8] [--seq-len 512] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

from trainer import loss, model, sharding
from trainer import ring_layout as layout
from trainer.ring_layout import layout_permutation  # noqa: E402

CONFIG = model.get_preset("tiny")
LOSS = loss.LossConfig(chunk_size=256)


def _batch(batch_size: int, seq_len: int, sp: int) -> dict:
    batch = model.example_batch(CONFIG, batch_size, seq_len)
    batch.update(layout.next_token_targets(batch))
    del batch["loss_weights"]
    perm = layout_permutation(seq_len, sp, "zigzag")
    return {k: v[:, perm] for k, v in batch.items()}


def tokens_per_second(mesh_config: sharding.MeshConfig | None, batch_size: int, seq_len: int, steps: int) -> float:
    params = model.init_params(CONFIG, jax.random.key(0))
    if mesh_config is None:
        lwm, context, batch = model.LWM(CONFIG), contextlib.nullcontext(), _batch(batch_size, seq_len, 1)
    else:
        mesh = sharding.make_mesh(mesh_config)
        lwm, context = model.LWM(CONFIG, sharding.attention_fn(mesh, CONFIG)), sharding.activate(mesh)
        params = jax.device_put(params, sharding.param_shardings(mesh, model.abstract_params(CONFIG)))
        batch = sharding.shard_batch(_batch(batch_size, seq_len, mesh.shape["sp"]), mesh)
    with context:
        step = jax.jit(jax.value_and_grad(lambda p, b: loss.loss_and_metrics(lwm, p, b, LOSS)[0]))
        jax.block_until_ready(step(params, batch))  # compile and warm up
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(step(params, batch))
        return batch_size * seq_len * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"tiny preset: {CONFIG.num_params() / 1e6:.2f}M params; batch {args.batch} x {args.seq_len} tokens; fp32")
    setups = {"1 device, dense attention": None,
              "8 devices, fsdp=8": sharding.MeshConfig(fsdp=8),
              "8 devices, sp=8 ring (zigzag)": sharding.MeshConfig(fsdp=1, sp=8)}
    for name, mesh_config in setups.items():
        print(f"{name:32s} {tokens_per_second(mesh_config, args.batch, args.seq_len, args.steps):10.0f} tokens/s")


if __name__ == "__main__":
    main()
