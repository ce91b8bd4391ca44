"""Needle accuracy of the tiny demo model trained on the demo books plus the synthetic retrieval set.

Builds the demo's data in WORKDIR (200 synthetic books → tokenizer → packed books; haystacks with a
TRAIN_CITIES needle → `lwm data chat-qa --generator needle`: the eval's prompt and answer, loss on the
answer only), trains configs/train_tiny.yaml on the mixture for --steps CPU steps (one device, dense
attention: the same math as the demo's ring over sp=4, faster on two cores), then runs `lwm eval needle` at 512–2048 tokens, all depths, and prints
the table (and where the heatmap is).

    .venv/bin/python benchmarks/needle_demo.py [--workdir /tmp/needle_demo] [--steps 800]
        [--retrieval-weight 0.7] [--examples 3000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

from orchestration import cli, demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/needle_demo")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--retrieval-weight", type=float, default=0.7)
    parser.add_argument("--examples", type=int, default=demo.RETRIEVAL_EXAMPLES)
    parser.add_argument("--lengths", default=demo.NEEDLE_LENGTHS)
    args = parser.parse_args()
    work = pathlib.Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "books" / f"seq{demo.SEQ_LEN}" / "manifest.json").exists():
        demo.books(work)
    if not (work / "data" / "retrieval" / f"seq{demo.SEQ_LEN}" / "manifest.json").exists():
        demo.RETRIEVAL_EXAMPLES = args.examples
        demo.retrieval_data(work)
    run_dir = work / "runs" / "tiny"
    mixture = ", ".join(f"{{path: '{work / 'data' / name / f'seq{demo.SEQ_LEN}'}', proportion: {weight}}}"
                        for name, weight in (("books", 1 - args.retrieval_weight), ("retrieval", args.retrieval_weight)))
    argv = ["train", "configs/train_tiny.yaml", "--set", f"run_dir={run_dir}", "--set", f"data.datasets=[{mixture}]",
            "--set", f"steps={args.steps}", "--set", "mesh={dp: 1, fsdp: 1, sp: 1, tp: 1}",
            "--set", "model.max_position_embeddings=4096", "--set", "log.every=25",
            "--set", f"checkpoint.save_every={args.steps}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    start = time.time()
    print("$ lwm " + " ".join(argv), flush=True)
    if subprocess.run([sys.executable, "-m", "orchestration.cli", *argv], env=env).returncode:
        raise SystemExit("training failed")
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s", flush=True)
    code = cli.main(["eval", "needle", "--ckpt", str(run_dir), "--tokenizer", str(work / "tokenizer.model"),
                     "--lengths", args.lengths, "--depths", "0,0.25,0.5,0.75,1", "--rounds", "4",
                     "--out", str(work / "needle")])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
