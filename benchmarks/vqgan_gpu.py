"""VQGAN (aMUSEd config) encoder frames/s on one GPU at batch 64.

Two figures per precision: "device" runs the jitted encoder on frames already on the
GPU (the chip's rate); "from host" goes through ``VQGAN.encode`` with numpy frames, as
the video pipeline does (adds the 50 MB host→device copy per batch). "highest" keeps
float32 convs (codes equal the float32 reference); "default" lets the GPU use TF32.
Needs only numpy, jax and flax (no Beam); random weights, so nothing to download.
Runs in about two minutes, most of it compilation.

    python benchmarks/vqgan_gpu.py [--batch 64] [--iters 10] [--config amused]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.tokens.vqgan import PRESETS, VQGAN, VQModel  # noqa: E402


def frames_per_second(fn, batch: int, iters: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--config", default="amused", choices=sorted(PRESETS))
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; config {args.config}")
    frames = np.random.default_rng(0).random((args.batch, 256, 256, 3), dtype=np.float32)
    for precision in ("highest", "default"):
        vq = VQGAN.init_random(PRESETS[args.config], seed=0, batch_size=args.batch, precision=precision)
        encode = jax.jit(lambda p, x, m=vq.model: m.apply({"params": p}, x, method=VQModel.encode))
        on_device = jax.device_put(frames)
        device_fps = frames_per_second(lambda: encode(vq.params, on_device), args.batch, args.iters)
        host_fps = frames_per_second(lambda: vq.encode(frames), args.batch, args.iters)
        print(f"precision {precision:8s} batch {args.batch}: device {device_fps:9.1f} frames/s, "
              f"from host {host_fps:9.1f} frames/s")


if __name__ == "__main__":
    main()
