"""`lwm eval TASK`: any registered evaluation task (``trainer.evaluation.TASKS``) on a checkpoint.

Each task's flags come from its config dataclass; the checkpoint arguments, ``--out``
and ``--json`` are the same for every task. With ``--json`` the measurements are one
JSON document on stdout and everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile

from orchestration.commands import add_checkpoint_arguments, add_examples, add_json_flag
from schemas import flags
from trainer import evaluation


def run_task(task: evaluation.Task, args, extra) -> int:
    config = flags.from_args(task.config, args)
    target = evaluation.Target(args.ckpt, args.step, getattr(args, "tokenizer", None))
    if not args.json:
        print(task.run(config, target, args.out))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, task.name)  # the measurements are read back from the output
        with contextlib.redirect_stdout(sys.stderr):
            print(task.run(config, target, out))
        document = {"task": task.name, "ckpt": args.ckpt, "step": args.step, "out": args.out,
                    "metrics": task.metrics(config, out)}
    print(json.dumps(document, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: " + ", ".join(evaluation.TASKS),
        description="Evaluation tasks, one sub-command each (trainer.evaluation.TASKS); a stage plan's evals: "
        "section runs the same tasks after a stage and its gate: can require any of their measurements.")
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    for name in evaluation.TASKS:
        task = evaluation.task(name)
        sub = commands.add_parser(name, help=task.help, description=task.description)
        add_checkpoint_arguments(sub, tokenizer=task.needs_tokenizer)
        flags.add_flags(sub, task.config)
        sub.add_argument("--out", required=task.out_required,
                         help="where the results go" + ("" if task.out_required else " (optional)"))
        add_json_flag(sub, "task, ckpt, step, out, metrics (the measurements a stage's gate: can require)")
        add_examples(sub, *task.examples)
        sub.set_defaults(func=functools.partial(run_task, task))
