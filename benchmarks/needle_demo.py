"""Needle accuracy of the tiny model trained on needle exercises only: the recipe that makes it retrieve.

Builds in WORKDIR the demo's books and tokenizer, then two sets of exercises from them (haystacks with a
TRAIN_CITIES needle → `lwm data chat-qa --generator needle`: the eval's prompt and answer, loss on the
answer only, packed at L = 1024): short ones (haystacks of 40–100 tokens, ~5 per row) and long ones
(64–850 tokens). Trains configs/train_tiny.yaml (2 layers, d_model 64, text only) on one CPU device,
batch 1 × 1024: --short-steps on the short set (the copying circuit forms there, abruptly, after ~4000
steps), then --long-steps on the long set from those params (it extends to longer contexts); then runs
`lwm eval needle` (eval cities and numbers, never trained on) at --lengths, all depths.

    .venv/bin/python benchmarks/needle_demo.py [--workdir /tmp/needle_recipe] [--short-steps 5000]
        [--long-steps 800] [--lengths 256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

from orchestration import cli, demo
from orchestration.sample_retrieval import write_retrieval

PHASES = (  # name, haystack tokens, exercises, learning rate
    ("short", (40, 100), 12000, 5.0e-3),
    ("long", (64, 850), 3000, 3.0e-3),
)


def exercises(work: pathlib.Path, name: str, lengths: tuple[int, int], count: int, seed: int) -> pathlib.Path:
    data = work / "data" / f"retrieval_{name}"
    if not (data / "seq1024" / "manifest.json").exists():
        corpus = write_retrieval(work / "raw" / f"retrieval_{name}.jsonl", work / "raw" / "books.jsonl",
                                 str(work / "tokenizer.model"), count, seed=seed, min_length=lengths[0],
                                 max_length=lengths[1])
        code = cli.main(["data", "chat-qa", "--input", str(corpus), "--output", str(data), "--tokenizer",
                         str(work / "tokenizer.model"), "--seq-len", "1024", "--generator", "needle",
                         "--chunk-tokens", str(lengths[1] + 50), "--num-shards", "2", "--overwrite"])
        if code:
            raise SystemExit(f"lwm data chat-qa exited {code}")
    return data / "seq1024"


def train(run_dir: pathlib.Path, data: pathlib.Path, steps: int, learning_rate: float, init_from: str) -> None:
    argv = ["train", "configs/train_tiny.yaml", "--set", f"run_dir={run_dir}",
            "--set", f"data.datasets=[{{path: '{data}', proportion: 1.0}}]", "--set", "data.batch_size=1",
            "--set", f"steps={steps}", "--set", "mesh={dp: 1, fsdp: 1, sp: 1, tp: 1}",
            "--set", "model.max_position_embeddings=4096", "--set", "log.every=250",
            "--set", f"checkpoint.save_every={steps}", "--set", f"optimizer.learning_rate={learning_rate}",
            "--set", "optimizer.schedule=warmup_constant"]
    if init_from:
        argv += ["--set", f"checkpoint.init_from={init_from}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    start = time.time()
    print("$ lwm " + " ".join(argv), flush=True)
    if subprocess.run([sys.executable, "-m", "orchestration.cli", *argv], env=env).returncode:
        raise SystemExit("training failed")
    print(f"trained {steps} steps in {time.time() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/needle_recipe")
    parser.add_argument("--short-steps", type=int, default=5000, help="steps on the short exercises")
    parser.add_argument("--long-steps", type=int, default=800, help="steps on the long exercises, from those params")
    parser.add_argument("--lengths", default="256,512,1024,2048", help="needle prompt lengths to evaluate")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "books" / f"seq{demo.SEQ_LEN}" / "manifest.json").exists():
        demo.books(work)
    init_from = ""
    for (name, lengths, count, learning_rate), steps, seed in zip(PHASES, (args.short_steps, args.long_steps), (1, 2)):
        data = exercises(work, name, lengths, count, seed)
        train(work / "runs" / name, data, steps, learning_rate, init_from)
        init_from = str(work / "runs" / name)
    code = cli.main(["eval", "needle", "--ckpt", init_from, "--tokenizer", str(work / "tokenizer.model"),
                     "--lengths", args.lengths, "--depths", "0,0.25,0.5,0.75,1", "--rounds", "2",
                     "--out", str(work / "needle")])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
