"""Step time and MFU of a 7B-shaped layer stack at 32K tokens on the available GPUs.

LWM-7B's layer shapes (d_model 4096, 32 heads, SwiGLU 11008, text vocab 32000 plus
vision vocab 8448; docs/LWM.md, "Training recipe") with fewer layers so one GPU holds
parameters, gradients and activations. Sequence parallel over every device
(``sp = number of devices``, zigzag ring layout), bf16 compute, fp32 parameters,
scan over layers with remat, chunked MLP and cross-entropy. One step = loss and
gradients plus an SGD update (AdamW's arithmetic is negligible next to it).

MFU counts model FLOPs only (no rematerialisation): 6 x tokens x matmul parameters
(layers and both output heads) plus causal attention, 6 x S^2 x d_model per layer and
sequence (forward 2 S^2 d, backward twice that), over the devices' peak bf16 FLOP/s.

Needs only JAX (with CUDA), flax, numpy and the trainer's model modules (model,
loss, sharding, ring_attention); runs in a few minutes on one GPU:

    python benchmarks/train_gpu.py [--layers 4] [--seq-len 32768] [--steps 5] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainer import loss, model, sharding
from trainer import ring_layout as layout
from trainer.ring_layout import layout_permutation  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor datasheets, SXM parts, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind.upper()
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def model_flops(config: model.ModelConfig, batch: int, seq_len: int) -> float:
    """Model FLOPs of one forward+backward step (see module docstring)."""
    d = config.d_model
    attn_proj = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    matmul_params = config.num_layers * (attn_proj + 3 * d * config.mlp_dim)
    matmul_params += d * (config.vocab_size + config.vision_vocab_size)
    tokens = batch * seq_len
    return 6.0 * tokens * matmul_params + 6.0 * batch * seq_len**2 * d * config.num_layers


def make_batch(config: model.ModelConfig, batch: int, seq_len: int, sp: int) -> dict[str, np.ndarray]:
    """One full-length causal sequence per row (no packing), 10% vision tokens, ring layout."""
    rng = np.random.default_rng(0)
    vision = rng.random((batch, seq_len)) < 0.1
    tokens = np.where(vision, rng.integers(0, config.vision_vocab_size, (batch, seq_len)),
                      rng.integers(0, config.vocab_size, (batch, seq_len))).astype(np.int32)
    natural = {
        "tokens": tokens,
        "vision_mask": vision,
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "loss_weights": np.ones((batch, seq_len), np.float32),
    }
    natural.update(layout.next_token_targets(natural))
    del natural["loss_weights"]
    perm = layout_permutation(seq_len, sp, "zigzag")
    return {k: v[:, perm] for k, v in natural.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--block", type=int, default=1024, help="ring attention query/key block")
    parser.add_argument("--mlp-chunk", type=int, default=8192)
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--remat", default="nothing_saveable", choices=sorted(model.REMAT_POLICIES))
    parser.add_argument("--peak-tflops", type=float, help="per-device peak bf16 TFLOP/s (default: by device kind)")
    args = parser.parse_args()

    devices = jax.devices()
    config = dataclasses.replace(
        model.get_preset("lwm-7b"), num_layers=args.layers, dtype="bfloat16", remat_policy=args.remat,
        mlp_chunk_size=args.mlp_chunk, attention_block_q=args.block, attention_block_kv=args.block)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, sp=len(devices)))
    sharding.validate(config, mesh, args.batch, args.seq_len)
    loss_config = loss.LossConfig(chunk_size=args.loss_chunk)
    lwm = model.LWM(config, sharding.attention_fn(mesh, config))
    param_sh = sharding.param_shardings(mesh, model.abstract_params(config))

    def step(params, batch):
        (value, _), grads = jax.value_and_grad(
            lambda p: loss.loss_and_metrics(lwm, p, batch, loss_config), has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 1e-5 * g.astype(p.dtype), params, grads), value

    with sharding.activate(mesh):
        params = model.init_params(config, jax.random.key(0), param_sh)
        batch = sharding.shard_batch(make_batch(config, args.batch, args.seq_len, mesh.shape["sp"]), mesh)
        train_step = jax.jit(step, donate_argnums=0)
        start = time.perf_counter()
        params, value = train_step(params, batch)
        jax.block_until_ready(value)
        compile_s = time.perf_counter() - start
        params, value = train_step(params, batch)
        jax.block_until_ready(value)
        start = time.perf_counter()
        for _ in range(args.steps):
            params, value = train_step(params, batch)
        jax.block_until_ready(value)
        step_s = (time.perf_counter() - start) / args.steps

    peak = args.peak_tflops or peak_tflops(devices[0])
    flops = model_flops(config, args.batch, args.seq_len)
    achieved = flops / step_s / len(devices) / 1e12
    print(f"device: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}")
    print(f"model: {config.num_layers} layers of LWM-7B shape, {config.num_params() / 1e9:.2f}B params, "
          f"bf16 compute, remat {config.remat_policy}, block {args.block}")
    print(f"batch {args.batch} x {args.seq_len} tokens, sp={mesh.shape['sp']}; loss {float(value):.3f}")
    print(f"compile+first step {compile_s:.1f} s; step {step_s * 1e3:.1f} ms; "
          f"{args.batch * args.seq_len / step_s:,.0f} tokens/s")
    print(f"model FLOPs/step {flops / 1e12:.1f} T; {achieved:.1f} TFLOP/s per device; "
          + (f"MFU {100 * achieved / peak:.1f}% of {peak:.0f}" if peak else "MFU: pass --peak-tflops"))
    print(f"peak memory: {devices[0].memory_stats().get('peak_bytes_in_use', 0) / 2**30:.1f} GiB"
          if devices[0].memory_stats() else "peak memory: n/a")


if __name__ == "__main__":
    main()
