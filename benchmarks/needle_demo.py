"""When the tiny model starts to retrieve: the demo's needle recipe on its own, for any seed.

The two retrieval stages of `configs/stages/demo.yaml`, run standalone on one CPU device (batch 1 x 1024,
text-only `configs/train_tiny.yaml`): a copying warm-up on short exercises (a needle and a few words of book,
numbers of 1-7 digits; the copying circuit forms there, abruptly) and then longer haystacks (64-900 tokens,
7 digits). Exercises come from `orchestration.demo.sample_retrieval` through `lwm data chat-qa --generator needle`
(the eval's prompt and answer, loss on the answer only), their data seed is --seed. Prints the step at which
each phase's answer accuracy (``text_accuracy``, logged every 50 steps) first reaches 0.95, then runs
`lwm eval needle` (eval cities and numbers, never trained on) at --lengths, all depths.

    .venv/bin/python benchmarks/needle_demo.py [--workdir /tmp/needle_recipe] [--seed 2]
        [--warmup-steps N] [--long-steps N] [--lengths 512,1024,1536,2048]

Steps and learning rates default to the demo plan's (copy-1024: 1800 at 5e-3, retrieval-1024: 400 at 3e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from orchestration import cli
from orchestration.demo import workflow as demo
from orchestration.stages import plan as plan_lib

PHASES = (  # name, the demo's stage (its steps and learning rate), the demo's exercise set
    ("warmup", "copy-1024", "retrieval_warmup"),
    ("long", "retrieval-1024", "retrieval"),
)


def exercises(work: pathlib.Path, exercise_set: str, seed: int) -> pathlib.Path:
    data = work / "data" / f"{exercise_set}_{seed}" / "seq1024"
    return data if (data / "manifest.json").exists() else demo.write_exercises(work, exercise_set, seed)


def train(run_dir: pathlib.Path, data: pathlib.Path, steps: int, learning_rate: float, init_from: str) -> None:
    argv = ["train", "configs/train_tiny.yaml", "--set", f"run_dir={run_dir}",
            "--set", f"data.datasets=[{{path: '{data}', proportion: 1.0}}]", "--set", "data.batch_size=1",
            "--set", f"steps={steps}", "--set", "mesh={dp: 1, fsdp: 1, sp: 1, tp: 1}",
            "--set", "model.max_position_embeddings=4096", "--set", "log.every=50",
            "--set", f"checkpoint.save_every={steps}", "--set", f"optimizer.learning_rate={learning_rate}",
            "--set", "optimizer.schedule=warmup_constant"]
    if init_from:
        argv += ["--set", f"checkpoint.init_from={init_from}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    start = time.time()
    print("$ lwm " + " ".join(argv), flush=True)
    if subprocess.run([sys.executable, "-m", "orchestration.cli", *argv], env=env).returncode:
        raise SystemExit("training failed")
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    reached = next((r["step"] for r in rows if r.get("text_accuracy", 0) >= 0.95), None)
    print(json.dumps({"phase": run_dir.name, "steps": steps, "seconds": round(time.time() - start),
                      "answer_accuracy_0.95_at_step": reached, "final_answer_loss": rows[-1]["text_loss"]}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/needle_recipe")
    parser.add_argument("--seed", type=int, default=2, help="the exercises' data seed (the demo's warm-up uses 2)")
    parser.add_argument("--warmup-steps", type=int, help="default: the demo's copy-1024 steps")
    parser.add_argument("--long-steps", type=int, help="default: the demo's retrieval-1024 steps")
    parser.add_argument("--lengths", default="512,1024,1536,2048", help="needle prompt lengths to evaluate")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "books" / "seq1024" / "manifest.json").exists():
        demo.books(work)
    stages = {stage.name: stage.config for stage in plan_lib.load(str(demo.PLAN)).stages}
    init_from = ""
    for (name, stage, exercise_set), steps in zip(PHASES, (args.warmup_steps, args.long_steps)):
        data = exercises(work, exercise_set, args.seed)
        run_dir = work / "runs" / f"{name}_{args.seed}"
        train(run_dir, data, steps or stages[stage].steps, stages[stage].optimizer.learning_rate, init_from)
        init_from = str(run_dir)
    code = cli.main(["eval", "needle", "--ckpt", init_from, "--tokenizer", str(work / "tokenizer.model"),
                     "--lengths", args.lengths, "--depths", "0,0.25,0.5,0.75,1", "--rounds", "2",
                     "--out", str(work / f"needle_{args.seed}")])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
