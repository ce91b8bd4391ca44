"""Start-up of the light commands: `lwm --help`, `lwm env --no-devices` and `lwm env`.

Each command runs as a fresh process (``python -m orchestration.cli``, as the
``lwm`` script runs it) ``--runs`` times; printed: the median wall time to exit and,
for `lwm env`, to its first line of output (the fast facts come before JAX starts).
Also the bare interpreter's start (``python -c pass``) and ``import jax`` with
``jax.devices()``, the floors the figures sit on.

    .venv/bin/python benchmarks/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LWM = [sys.executable, "-m", "orchestration.cli"]


def timed(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first line on stdout, seconds to exit) of one run of ``argv``."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    process.stdout.readline()
    first = time.perf_counter() - start
    process.stdout.read()
    process.wait()
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "print()"],
        "import jax; jax.devices()": [sys.executable, "-c", "import jax; jax.devices(); print()"],
        "lwm --help": [*LWM, "--help"],
        "lwm env --no-devices": [*LWM, "env", "--no-devices"],
        "lwm env": [*LWM, "env"],
    }
    print(f"{'command':<28} {'first line (s)':>15} {'exit (s)':>9}   median of {args.runs}")
    for name, argv in commands.items():
        timed(argv)  # warm the file cache
        runs = [timed(argv) for _ in range(args.runs)]
        print(f"{name:<28} {statistics.median(r[0] for r in runs):>15.3f} {statistics.median(r[1] for r in runs):>9.3f}")


if __name__ == "__main__":
    main()
