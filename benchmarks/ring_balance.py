"""Work balance of the causal ring per token layout (no attention is run; tiles are counted).

At hop h device r computes the (query block, key block) tiles that the mask leaves
visible for the shard it holds (the same `tile_kinds` the ring uses to skip tiles).
All devices wait for each other at every hop, so the ring's critical path is the sum over
hops of the busiest device's tile count. Printed per layout: that critical path in tiles,
divided by the average device's total tile count (1.0 = perfectly balanced), the tiles
computed in all, and the spread between devices at the worst hop (in tiles); for one
causal document and for a row of packed documents (segment masks skip most tiles).

    .venv/bin/python benchmarks/ring_balance.py [--devices 8 --seq-len 32768 --block 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import ring_attention as ra  # noqa: E402


def balance(segment_ids, num_shards, layout, block):
    """(critical path, its ratio to mean device work, total tiles, worst per-hop spread)."""
    counts = ra.ring_tile_counts(segment_ids, num_shards, layout, block, block, causal=True)
    critical = counts.max(axis=1).sum()
    mean_work = counts.sum() / num_shards
    spread = int((counts.max(axis=1) - counts.min(axis=1)).max())
    return int(critical), critical / mean_work, int(counts.sum()), spread


def packed_documents(seq_len, seed=0):
    """One row of documents with log-uniform lengths (64 tokens to seq_len / 4), then padding."""
    rng = np.random.default_rng(seed)
    ids, start, segment = np.zeros(seq_len, np.int32), 0, 1
    while True:
        length = int(np.exp(rng.uniform(np.log(64), np.log(seq_len / 4))))
        if start + length > seq_len - seq_len // 16:
            return ids[None]
        ids[start:start + length] = segment
        start, segment = start + length, segment + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--block", type=int, default=512)
    args = parser.parse_args(argv)
    batches = {"one document": np.ones((1, args.seq_len), np.int32),
               "packed documents": packed_documents(args.seq_len)}
    print(f"P={args.devices} S={args.seq_len} block={args.block}, causal")
    for name, segment_ids in batches.items():
        for layout in ra.LAYOUTS:
            critical, ratio, total, spread = balance(segment_ids, args.devices, layout,
                                                     args.block)
            print(f"{name:17s} {layout:10s} critical path {critical:4d} tiles, /mean "
                  f"{ratio:5.3f}  all tiles {total:5d}  "
                  f"worst-hop spread {spread} tiles")


if __name__ == "__main__":
    main()
