"""Start-up time of a training process (process start to the first batch's data) against the dataset's size.

Every process of every (re)start reads the manifests and opens the shards before step 0.
This measures that in fresh processes, as a restart does: from ``Popen`` to the first
global batch on the mesh (``Loader(...)`` and ``next``: imports, manifests, shard
checks, Grain pipeline, the first read), for a dataset and one 16x larger, with the
start-up check as it is (sizes from one listing, ``data.verify_hashes: false``) and
with every shard hashed (``verify_hashes: true``, what start-up did before). The data
is synthetic packed records at L = 32768 (``loader_throughput.write_synthetic``).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      .venv/bin/python benchmarks/startup_time.py --records 128 --shards 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from loader_throughput import write_synthetic

SEQ_LEN = 32768
CHILD = """
import sys
from trainer.config import DataConfig, DatasetConfig
from trainer.sharding import MeshConfig, make_mesh
from trainer.training.loader import Loader

config = DataConfig(datasets=(DatasetConfig(sys.argv[1]),), seq_len={seq_len}, batch_size=8,
                    verify_hashes=sys.argv[2] == "1")
loader = Loader(config, make_mesh(MeshConfig(dp=1, fsdp=-1, sp=1, tp=1)))
next(loader)["tokens"].block_until_ready()
print("first batch", flush=True)
loader.close()
"""


def startup_s(directory: str, verify_hashes: bool) -> float:
    """Seconds from starting a process to its first batch on the mesh."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(seq_len=SEQ_LEN), directory,
                              "1" if verify_hashes else "0"], stdout=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline()
    elapsed = time.perf_counter() - start
    child.wait()
    if "first batch" not in line or child.returncode:
        raise RuntimeError(f"the start-up child failed (exit {child.returncode})")
    return elapsed


def size_mb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=128, help="records of the small dataset (the large: 16x)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the small dataset (the large: 16x)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        datasets = {}
        for label, factor in (("1x", 1), ("16x", 16)):
            datasets[label] = os.path.join(scratch, label)
            os.makedirs(datasets[label])
            write_synthetic(datasets[label], args.records * factor, SEQ_LEN, args.shards * factor)
        startup_s(datasets["1x"], False)  # warm the file cache and Python's bytecode cache
        for verify in (False, True):
            runs = {label: [] for label in datasets}
            for _ in range(args.repeats):  # alternated, so that a busy machine slows both alike
                for label, path in datasets.items():
                    runs[label].append(startup_s(path, verify))
            figures = {label: statistics.median(seconds) for label, seconds in runs.items()}
            print(f"verify_hashes={str(verify).lower():5}  " + "  ".join(
                f"{label} ({size_mb(datasets[label]):,.0f} MB, {args.shards * (16 if label == '16x' else 1)} shards): "
                f"{seconds:.2f} s" for label, seconds in figures.items())
                + f"  ratio 16x/1x {figures['16x'] / figures['1x']:.3f}", flush=True)


if __name__ == "__main__":
    main()
