"""Evaluation between stages and the gates that promote a stage's weights to the next one.

LWM claims 1M tokens of context, yet RULER measures its effective length under 4K:
promotion should rest on a measurement. A stage's measurements are a flat mapping
saved in ``lineage.json``:

- ``eval_loss``: the mean over ``eval.datasets`` of the held-out loss the trainer
  measures at the stage's last step (its ``eval:`` section), with each dataset's
  ``eval/NAME/loss``;
- each task of the stage's ``evals:`` (any task registered in :mod:`trainer.evaluation`):
  ``lwm eval NAME`` on the stage's final checkpoint in a child process (this process
  never starts JAX), its output in ``RUN_DIR/NAME/``, its measurements as the task
  defines them (``needle_accuracy/1024``, ...).

:func:`measure` computes them for a stage and :func:`gate_failures` compares them with
the stage's ``gate:``. The evaluator is a parameter of the runner, so the gating
logic does not depend on how the numbers are measured.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Callable

from orchestration.stages import status
from orchestration.stages.plan import Stage
from schemas import flags
from schemas import manifest as manifest_lib
from schemas import storage
from trainer import evaluation

Evaluator = Callable[[Stage], dict[str, float]]


def measure(stage: Stage) -> dict[str, float]:
    """A finished stage's measurements (module docstring)."""
    results = trainer_eval_loss(stage)
    for name, config in stage.evals.items():
        results.update(run_task(stage, name, config))
    return results


def task_argv(stage: Stage, name: str, config: Any) -> list[str]:
    """``lwm eval NAME`` on the stage's final checkpoint, output in ``RUN_DIR/NAME``. The tokenizer is the
    one the stage's data was built with (its first manifest's ``tokenizer.uri``)."""
    task = evaluation.task(name)
    argv = ["eval", name, "--ckpt", stage.run_dir, "--step", str(stage.config.steps)]
    if task.needs_tokenizer:
        manifest = manifest_lib.read(stage.config.data.datasets[0].path, verify_hashes=False)
        argv += ["--tokenizer", manifest.tokenizer["uri"]]
    return argv + flags.to_argv(config) + ["--out", storage.join(stage.run_dir, name)]


def run_task(stage: Stage, name: str, config: Any) -> dict[str, float]:
    """The task's measurements after running it in a child process."""
    argv = task_argv(stage, name, config)
    print("$ lwm " + " ".join(argv), flush=True)
    code = subprocess.run([sys.executable, "-m", "orchestration.cli", *argv]).returncode
    if code:
        raise ValueError(f"stage {stage.name}: `lwm eval {name}` exited {code}; its command is printed above")
    return evaluation.task(name).metrics(config, storage.join(stage.run_dir, name))


def trainer_eval_loss(stage: Stage) -> dict[str, float]:
    """The held-out loss the trainer logged at the stage's last step, with their mean as ``eval_loss``."""
    metrics = status.eval_metrics(stage.run_dir, stage.config.steps)
    losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
    return {**losses, "eval_loss": sum(losses.values()) / len(losses)} if losses else {}


def gate_failures(stage: Stage, results: dict[str, float]) -> list[str]:
    """One message per unmet threshold of ``stage.gate`` (empty: the stage may be promoted)."""
    failures = (t.failure(results) for t in stage.gate.thresholds(stage.config.data.seq_len))
    return [f for f in failures if f]
