"""Tokens per second the Grain loader delivers from local shards, against what training consumes.

A 7B model on one TPU v4 host consumes about 6·7e9 FLOPs per token at 40% MFU of
4 chips × 275 TFLOP/s: 4·275e12·0.4 / (6·7e9) ≈ 10.5K tokens/s. The loader's goal
is ≥ 50× that per host, so data never limits training.

The shards hold synthetic packed records (random text ids of a 32000 vocabulary,
segments of random lengths, as `lwm data books` packs them) at L = 32768. Figures:
the numpy pipeline (read, decode, batch, targets, ring layout: ``--layout``, default the
per-row ``segments`` layout) with 0 and N worker processes, and the full ``Loader``
including the copy into global ``jax.Array``s on 8 simulated CPU devices (fsdp 2 × sp 4).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      .venv/bin/python benchmarks/loader_throughput.py --records 256 --batches 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from pipelines.kit.packed_writer import write_shard
from schemas import manifest, packed
from trainer.training import loader as data
from trainer.config import DataConfig, DatasetConfig
from trainer.sharding import MeshConfig, make_mesh

TPU_V4_HOST_TOKENS_PER_S = 4 * 275e12 * 0.4 / (6 * 7e9)


def write_synthetic(directory: str, records: int, seq_len: int, shards: int, seed: int = 0) -> None:
    """A packed dataset of ``records`` synthetic sequences in ``shards`` shards, with its manifest."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(records):
        lengths = rng.integers(seq_len // 16, seq_len // 2, 8)
        lengths = lengths[np.cumsum(lengths) <= seq_len - 64]
        segments = [{"tokens": rng.integers(3, 32000, n), "vision_mask": np.zeros(n, bool),
                     "loss_weights": np.r_[0.0, np.ones(n - 1)].astype(np.float32)} for n in lengths]
        encoded.append(packed.encode(**packed.from_segments(segments, seq_len)))
    per_shard = np.array_split(np.arange(records), shards)
    infos = tuple(write_shard(os.path.join(directory, manifest.shard_name("synthetic", i, shards)),
                              [encoded[j] for j in idx]) for i, idx in enumerate(per_shard))
    manifest.write(directory, manifest.Manifest(
        job="benchmark", name="synthetic", seq_len=seq_len, tokenizer={"path": "", "sha256": ""}, shards=infos,
        counts={}, tokens=0, pad_tokens=0, config={}))


def _rate(next_batch, batches: int, tokens_per_batch: int) -> float:
    next_batch()  # first batch: start-up (worker processes, thread pools) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next_batch()
    return batches * tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--layout", default="segments", help="ring layout (trainer.ring_layout.LAYOUTS)")
    args = parser.parse_args()
    tokens = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as root:
        write_synthetic(root, args.records, args.seq_len, 4)
        print(f"{args.records} records of {args.seq_len} tokens in 4 local shards; batch {args.batch_size}, "
              f"sp 4 {args.layout}; reference: {TPU_V4_HOST_TOKENS_PER_S:,.0f} tokens/s per TPU v4 host (7B)")
        for workers in (0, args.workers):
            config = DataConfig(datasets=(DatasetConfig(root),), seq_len=args.seq_len, batch_size=args.batch_size,
                                worker_count=workers, read_threads=args.read_threads, layout=args.layout)
            iterator = iter(data.dataset(config, data.read_manifests(config), batch_size=args.batch_size, sp=4))
            rate = _rate(lambda: next(iterator), args.batches, tokens)
            print(f"numpy pipeline, {workers} workers: {rate:,.0f} tokens/s = "
                  f"{rate / TPU_V4_HOST_TOKENS_PER_S:.1f}x", flush=True)
            if workers:
                iterator.close()
        config = DataConfig(datasets=(DatasetConfig(root),), seq_len=args.seq_len, batch_size=args.batch_size,
                            read_threads=args.read_threads, layout=args.layout)
        loader = data.Loader(config, make_mesh(MeshConfig(dp=1, fsdp=2, sp=4, tp=1)))
        rate = _rate(lambda: jax.block_until_ready(next(loader)), args.batches, tokens)
        print(f"Loader to global jax.Arrays (8 CPU devices), 0 workers: {rate:,.0f} tokens/s = "
              f"{rate / TPU_V4_HOST_TOKENS_PER_S:.1f}x")
        loader.close()


if __name__ == "__main__":
    main()
