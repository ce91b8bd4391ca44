"""Several processes on one machine: tokens/s of 2 processes × 4 CPU devices against 1 × 8, and save time.

Both runs train ``configs/train_tiny.yaml`` (fsdp 2 × sp 4, zigzag ring) on a small
books dataset built first; tokens/s is the median of the logged steps after the first
two (compilation). The save time is one full training checkpoint (params, AdamW
state, data position, config) of the tiny model, written by every process together,
median of three. On one machine the difference is the cost of the distributed runtime
(gloo collectives over TCP between processes), not a speed-up.

    .venv/bin/python benchmarks/multihost.py [--steps 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "train_tiny.yaml")


def build_dataset(workdir: Path, seq_len: int) -> Path:
    from trainer.evaluation.synthetic_books import write_books
    from pipelines import books
    from pipelines.tokens import text_tokenizer
    from pipelines.kit.buckets import Bucket
    from pipelines.kit.output import OutputConfig
    from pipelines.kit.beam_runner import pipeline_options
    from schemas import raw

    source = write_books(workdir / "books.jsonl", 60)
    with open(source, "rb") as stream:
        texts = [d.text for d in raw.iter_documents(stream, str(source))]
    tokenizer = text_tokenizer.train(texts, 512, str(workdir / "tok.model"))
    books.run(books.BooksConfig(inputs=(str(source),), tokenizer=tokenizer,
                                output=OutputConfig(str(workdir / "data"), (Bucket(seq_len),), num_shards=2)),
              pipeline_options([]))
    return workdir / "data" / f"seq{seq_len}"


def _sets(run_dir: Path, dataset: Path, seq_len: int, steps: int) -> list[str]:
    values = [f"run_dir={run_dir}", f"data.datasets=[{{path: '{dataset}'}}]", f"data.seq_len={seq_len}",
              f"steps={steps}", "optimizer.warmup_steps=2", "log.every=1", f"checkpoint.save_every={steps}",
              "log.tensorboard=false"]
    return [a for v in values for a in ("--set", v)]


def train_tokens_per_s(workdir: Path, dataset: Path, processes: int, seq_len: int, steps: int) -> float:
    run_dir = workdir / f"run-{processes}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "orchestration.cli", "train", CONFIG, *_sets(run_dir, dataset, seq_len, steps),
               "--processes", str(processes)]
    subprocess.run(command, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(run_dir / "metrics.jsonl") as f:
        rates = [m["tokens_per_s"] for m in map(json.loads, f) if m["step"] > 2]
    return statistics.median(rates)


def save_job(ckpt_dir: str, dataset: str, seq_len: int) -> None:
    """One process's part of the save benchmark (run under ``orchestration.launch.run_processes``)."""
    import jax

    from trainer import checkpoint, config as config_lib, distributed
    from trainer.training import optimizer
    from trainer.training.loader import Loader
    from trainer.model import init_params
    from trainer.sharding import activate, make_mesh
    from trainer.training.loop import _state_shardings

    distributed.join()
    config = config_lib.load(CONFIG, [f"data.datasets=[{{path: '{dataset}'}}]", f"data.seq_len={seq_len}"])
    mesh = make_mesh(config.mesh)
    loader = Loader(config.data, mesh)
    with activate(mesh), checkpoint.train_manager(ckpt_dir, enable_async_checkpointing=False) as mngr:
        tx = optimizer.make(config.optimizer, config.steps)
        shardings = _state_shardings(config.model, mesh, tx)
        params = init_params(config.model, jax.random.key(0), shardings.params)
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        times = []
        for step in range(1, 4):
            start = time.perf_counter()
            checkpoint.save_train_state(mngr, step, params=params, opt_state=opt_state, model_config=config.model,
                                        data_iter=loader.iterator, train_config=config.to_dict(), force=True)
            mngr.wait_until_finished()
            times.append(time.perf_counter() - start)
    loader.close()
    if jax.process_index() == 0:
        print(f"save_s {statistics.median(times):.3f}", flush=True)


def save_seconds(workdir: Path, dataset: Path, processes: int, seq_len: int) -> float:
    from orchestration.launch import run_processes

    logs = workdir / f"save-logs-{processes}"
    command = [sys.executable, __file__, "--save-job", str(workdir / f"save-{processes}"), str(dataset),
               "--seq-len", str(seq_len)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(os.devnull, "w") as quiet:
        code = run_processes(command, processes, 8 // processes, str(logs), env=env, stdout=quiet)
    if code:
        raise SystemExit(f"save benchmark failed with {code}; see {logs}")
    line = next(l for l in (logs / "process-0.log").read_text().splitlines() if l.startswith("save_s "))
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--save-job", nargs=2, metavar=("CKPT_DIR", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_job:
        save_job(*args.save_job, args.seq_len)
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        dataset = build_dataset(workdir, args.seq_len)
        for processes in (1, 2):
            rate = train_tokens_per_s(workdir, dataset, processes, args.seq_len, args.steps)
            print(f"{processes} process(es) x {8 // processes} devices: {rate:,.0f} tokens/s "
                  f"(tiny model, batch 2 x {args.seq_len}, median of steps 3-{args.steps})", flush=True)
        for processes in (1, 2):
            seconds = save_seconds(workdir, dataset, processes, args.seq_len)
            print(f"checkpoint save, {processes} process(es): {seconds:.2f} s (tiny model, params + AdamW state, "
                  "median of 3)", flush=True)


if __name__ == "__main__":
    main()
