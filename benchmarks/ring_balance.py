"""Work balance of the causal ring per token layout (no attention is run; tiles are counted).

At hop h device r computes the (query block, key block) tiles that the mask leaves
visible for the shard it holds (the same `tile_kinds` the ring uses to skip tiles).
All devices wait for each other at every hop, so the ring's critical path is the sum over
hops of the busiest device's tile count. Printed per layout: that critical path in tiles,
divided by the average device's total tile count (1.0 = perfectly balanced), the tiles
computed in all, and the spread between devices at the worst hop (in tiles); for one
causal document and for a row of packed documents (segment masks skip most tiles), with
the time taken to compute the order.
Then, over ``--rows`` rows from the real packer (`pipelines.kit.packing.pack` on a corpus of
log-uniform document lengths, 64 tokens to S), the median and worst of: critical path /
mean, tiles / contiguous's tiles, and critical path / zigzag's critical path; and the time
the ``segments`` layout takes to choose one row's order (what the loader pays per row).

    .venv/bin/python benchmarks/ring_balance.py [--devices 8 --seq-len 32768 --block 512 --rows 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.kit import packing
from trainer import ring_layout
from trainer import ring_testing  # noqa: E402


def balance(segment_ids, num_shards, layout, block):
    """(critical path, its ratio to mean device work, total tiles, worst per-hop spread)."""
    counts = ring_testing.ring_tile_counts(segment_ids, num_shards, layout, block, block, causal=True)
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


def packer_rows(seq_len, rows, seed=0):
    """``rows`` segment-id rows [rows, S] packed by ``pipelines.kit.packing.pack`` from documents of
    log-uniform length (64 tokens to seq_len), as many as fill ``rows`` sequences."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < rows * seq_len:
        lengths.append(int(np.exp(rng.uniform(np.log(64), np.log(seq_len)))))
        total += lengths[-1]
    segments = [packing.text_segment(f"doc{i}", np.zeros(n, np.int32)) for i, n in enumerate(lengths)]
    sequences = packing.pack(segments, seq_len)
    return np.stack([packing.to_example(s, seq_len)["segment_ids"] for s in sequences[:rows]])


def row_figures(segment_ids_S, num_shards, block):
    """Per layout: (critical path, total tiles, seconds to choose the order) of one row, from the
    numpy tile replay."""
    out = {}
    for name in ring_layout.LAYOUTS:
        start = time.perf_counter()
        perm = ring_layout.batch_permutation(segment_ids_S[None], num_shards, name, block)[0]
        seconds = time.perf_counter() - start
        work = ring_layout.ring_work(segment_ids_S[perm], perm, num_shards, block)
        out[name] = (int(work.max(axis=1).sum()), int(work.sum()), seconds)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--rows", type=int, default=100)
    args = parser.parse_args(argv)
    batches = {"one document": np.ones((1, args.seq_len), np.int32),
               "packed documents": packed_documents(args.seq_len)}
    print(f"P={args.devices} S={args.seq_len} block={args.block}, causal")
    for name, segment_ids in batches.items():
        for layout in ring_layout.LAYOUTS:
            critical, ratio, total, spread = balance(segment_ids, args.devices, layout, args.block)
            start = time.perf_counter()
            ring_layout.batch_permutation(segment_ids, args.devices, layout, args.block)
            print(f"{name:17s} {layout:10s} critical path {critical:4d} tiles, /mean "
                  f"{ratio:5.3f}  all tiles {total:5d}  "
                  f"worst-hop spread {spread} tiles  order in {(time.perf_counter() - start) * 1e3:.0f} ms")
    if not args.rows:
        return
    rows = packer_rows(args.seq_len, args.rows)
    figures = [row_figures(row, args.devices, args.block) for row in rows]
    print(f"\n{len(rows)} rows from pipelines.kit.packing.pack (log-uniform documents, 64 to {args.seq_len} "
          f"tokens): median / worst")
    for name in ring_layout.LAYOUTS:
        ratio = [f[name][0] / (f[name][1] / args.devices) for f in figures]
        tiles = [f[name][1] / f["contiguous"][1] for f in figures]
        speed = [f[name][0] / f["zigzag"][0] for f in figures]
        print(f"{name:10s} critical/mean {np.median(ratio):5.3f} / {max(ratio):5.3f}   "
              f"tiles/contiguous {np.median(tiles):5.3f} / {max(tiles):5.3f}   "
              f"critical/zigzag's {np.median(speed):5.3f} / {max(speed):5.3f}")
    seconds = [f["segments"][2] * 1e3 for f in figures]
    print(f"segments: time to choose one row's order {np.median(seconds):.1f} ms median, "
          f"{max(seconds):.1f} ms worst (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
