"""Evaluation between stages and the gates that promote a stage's weights to the next one.

LWM claims 1M tokens of context, yet RULER measures its effective length under 4K:
promotion should rest on a measurement. A stage's measurements are a flat mapping
saved in ``lineage.json``:

- ``eval_loss``: the mean over ``eval.datasets`` of the held-out loss the trainer
  measures at the stage's last step (its ``eval:`` section, ``trainer.evaluation.heldout_loss``),
  with each dataset's ``eval/NAME/loss``;
- ``needle_accuracy/L``: needle-in-a-haystack accuracy at context length ``L``, over
  ``needle.depths`` × ``needle.rounds`` (the stage's ``needle:``).

An ``Evaluator`` computes them for a stage (:func:`measure`: the trainer's logged
held-out loss, and `lwm eval needle` in a child process); ``gate_failures`` compares
them with ``gate:``. The evaluator is a parameter of the runner, so the gating logic
does not depend on how the numbers are measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

import numpy as np

from orchestration.stages import status
from orchestration.stages.plan import Stage
from schemas import manifest as manifest_lib
from schemas import storage

Evaluator = Callable[[Stage], dict[str, float]]
NEEDLE_DIR = "needle"  # RUN_DIR/needle/: results.jsonl, table.txt, heatmap.png of the stage's needle test


def needle_key(length: int) -> str:
    return f"needle_accuracy/{length}"


def measure(stage: Stage) -> dict[str, float]:
    """A finished stage's measurements (module docstring)."""
    results = trainer_eval_loss(stage)
    if not stage.needle.empty:
        results.update(needle_accuracy(stage))
    return results


def needle_accuracy(stage: Stage) -> dict[str, float]:
    """`lwm eval needle` on the stage's final checkpoint, in a child process (this process never
    starts JAX); its results stay in ``RUN_DIR/needle/``. The tokenizer is the one the stage's
    data was built with (its manifests' ``tokenizer.uri``)."""
    needle = stage.needle
    out = storage.join(stage.run_dir, NEEDLE_DIR)
    tokenizer = manifest_lib.read(stage.config.data.datasets[0].path, verify_hashes=False).tokenizer["uri"]
    argv = [sys.executable, "-m", "orchestration.cli", "eval", "needle", "--ckpt", stage.run_dir,
            "--step", str(stage.config.steps), "--tokenizer", tokenizer,
            "--lengths", ",".join(map(str, needle.lengths)), "--depths", ",".join(map(str, needle.depths)),
            "--rounds", str(needle.rounds), "--out", out]
    print("$ lwm " + " ".join(argv[3:]), flush=True)
    code = subprocess.run(argv).returncode
    if code:
        raise ValueError(f"stage {stage.name}: `lwm eval needle` exited {code}; its command is printed above")
    trials = [json.loads(line) for line in storage.read_bytes(storage.join(out, "results.jsonl")).decode().splitlines()
              if line.strip()]
    return {needle_key(length): float(np.mean([t["correct"] for t in trials if t["length"] == length]))
            for length in needle.lengths}


def trainer_eval_loss(stage: Stage) -> dict[str, float]:
    """The held-out loss the trainer logged at the stage's last step, with their mean as ``eval_loss``."""
    metrics = status.eval_metrics(stage.run_dir, stage.config.steps)
    losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
    return {**losses, "eval_loss": sum(losses.values()) / len(losses)} if losses else {}


def gate_failures(stage: Stage, results: dict[str, float]) -> list[str]:
    """One message per unmet threshold of ``stage.gate`` (empty: the stage may be promoted)."""
    gate, failures = stage.gate, []
    if gate.max_eval_loss:
        loss = results.get("eval_loss")
        if loss is None or not loss <= gate.max_eval_loss:
            failures.append(f"eval loss {loss} > gate.max_eval_loss {gate.max_eval_loss}")
    if gate.min_needle_accuracy:
        length = gate.needle_length or stage.config.data.seq_len
        accuracy = results.get(needle_key(length))
        if accuracy is None or not accuracy >= gate.min_needle_accuracy:
            failures.append(f"needle accuracy at {length} tokens {accuracy} < gate.min_needle_accuracy "
                            f"{gate.min_needle_accuracy}")
    return failures
