"""`lwm train CONFIG.yaml [--set key=value ...]`: one training stage (``trainer.train``)."""

from __future__ import annotations

import sys

from orchestration.launch import launch
from trainer import config as config_lib
from trainer.train import NonFiniteLossError, train

PREEMPTED_EXIT = 128 + 15  # the shell's code for "terminated by SIGTERM": the stage is not finished


def run(args, extra) -> int:
    if args.processes != 1:
        return launch(args.config, args.set, args.processes)
    try:
        result = train(config_lib.load(args.config, args.set))
    except NonFiniteLossError as error:
        print(f"lwm train: {error}", file=sys.stderr)
        return 1
    return PREEMPTED_EXIT if result.preempted else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage from a YAML config (resumes from its newest checkpoint)",
        description="Train one stage. The YAML holds the sections of trainer.config.TrainConfig; "
        "the resolved config is written to RUN_DIR/config.yaml. Exit status 143 after a SIGTERM "
        "(checkpoint saved, stage unfinished).",
    )
    parser.add_argument("config", help="YAML config (e.g. configs/train_tiny.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run the job as N local processes joined by jax.distributed (hosts simulated on CPU, "
                        "each with 1/N of the mesh's devices); logs in RUN_DIR/logs/process-{i}.log (default: 1)")
    parser.set_defaults(func=run)
