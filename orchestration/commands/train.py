"""`lwm train CONFIG.yaml [key=value ...] [--set key=value ...]`: one training stage (``trainer.training.loop``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

from orchestration.commands import add_examples, progress_on_stdout
from trainer import config as config_lib
from trainer.model import PRESETS

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(config: config_lib.TrainConfig, env: dict = os.environ) -> int | None:
    """Asks XLA for as many host (CPU) devices as ``config.mesh`` names, unless XLA_FLAGS already says.

    Must run before JAX starts its backends. Only the CPU platform reads the flag, so
    a run on GPUs or TPUs is unaffected. Returns the count set, or None.
    """
    flags = env.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return None
    count = math.prod(s for s in config.mesh.as_tuple() if s != -1)
    if count <= 1:
        return None
    env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return count


def overrides(args) -> list[str]:
    """``key=value`` words after CONFIG, then ``--set`` ones (later ones win)."""
    for word in args.overrides:
        if "=" not in word:
            raise ValueError(f"{word!r} after the config is not KEY=VALUE (e.g. steps=50); "
                             "give one config file, then overrides")
    return [*args.overrides, *args.set]


def run(args, extra) -> int:
    sets = overrides(args)
    config = config_lib.load(args.config, sets)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.processes != 1:
        from orchestration.launch import launch

        return launch(args.config, sets, args.processes)
    simulate_cpu_devices(config)
    from orchestration.stages import local
    from trainer.training.loop import NonFiniteLossError, train  # JAX starts here, after the device count is set

    try:
        with progress_on_stdout(args):
            result = train(config)
    except NonFiniteLossError as error:
        print(f"lwm train: {error}", file=sys.stderr)
        return local.NON_FINITE
    return 128 + result.signum if result.preempted else 0  # as the shell reports a signal: 143 SIGTERM, 130 SIGINT


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Train one stage. The YAML holds the sections of trainer.config.TrainConfig (the keys
            below); the resolved config is written to RUN_DIR/config.yaml. Running again on the
            same run_dir resumes; a changed model shape or data order is refused there (use a new
            run_dir, with checkpoint.init_from to start from the old weights). On CPU the simulated
            device count is set from the mesh unless XLA_FLAGS sets it.

            Exit status: 0 finished (or nothing to do), 2 bad input or config, 4 non-finite
            training, 130 after Ctrl-C and 143 after SIGTERM (checkpoint saved: run again to resume)."""),
        epilog="config keys and their defaults (the paper's 32K text stage); model.preset\n"
        f"({', '.join(sorted(PRESETS))}) starts the model section from a registered preset:\n  "
        + "\n  ".join(config_lib.help_text().splitlines()),
    )
    parser.add_argument("config", help="YAML config, a local path or any filesystem's (gs://...), e.g. "
                        "configs/train_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config values, as MaxText takes them: steps=50 optimizer.learning_rate=1e-4")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.learning_rate=1e-4 (repeatable; "
                        "applied after the KEY=VALUE words)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, every key) and exit without training")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run the job as N local processes joined by jax.distributed (hosts simulated on CPU, "
                        "each with 1/N of the mesh's devices); logs in RUN_DIR/logs/process-{i}.log (default: 1)")
    parser.set_defaults(func=run)
    add_examples(parser,
                 "lwm train configs/train_tiny.yaml                       # tiny model, CPU, sp=4 ring attention",
                 "lwm train configs/train_tiny.yaml steps=50 optimizer.learning_rate=1e-3",
                 "lwm train configs/train_text_32k.yaml --set data.datasets.0.path=/data/books/seq32768",
                 "lwm train configs/train_tiny.yaml steps=50 --print-config   # the resolved config, then exit",
                 "lwm train gs://my-bucket/configs/text_32k.yaml run_dir=gs://my-bucket/runs/text-32k",
                 "lwm train configs/train_tiny.yaml --processes 2         # 2 local processes joined by jax.distributed",
                 "lwm train configs/train_tiny.yaml -q                    # no progress lines")
