"""Evaluation between stages and the gates that promote a stage's weights to the next one.

LWM claims 1M tokens of context, yet RULER measures its effective length under 4K:
promotion should rest on a measurement. A stage's measurements are a flat mapping
saved in ``lineage.json``:

- ``eval_loss``: the mean over ``eval.datasets`` of the held-out loss the trainer
  measures at the stage's last step (its ``eval:`` section, ``trainer.evaluate``),
  with each dataset's ``eval/NAME/loss``;
- ``needle_accuracy/L``: needle-in-a-haystack accuracy at context length ``L``, over
  ``needle.depths`` × ``needle.rounds`` (the stage's ``needle:``).

An ``Evaluator`` computes them for a stage; ``gate_failures`` compares them with
``gate:``. The evaluator is a parameter of the runner, so the gating logic does not
depend on how the numbers are measured.
"""

from __future__ import annotations

from typing import Callable, Iterable

from orchestration.stages import status
from orchestration.stages.plan import Stage

Evaluator = Callable[[Stage], dict[str, float]]


def needle_key(length: int) -> str:
    return f"needle_accuracy/{length}"


def evaluator_for(stages: Iterable[Stage]) -> Evaluator:
    """The evaluator of ``stages``; ValueError, before anything runs, if it cannot measure what they ask.

    The held-out loss comes from the trainer's own ``eval:`` metrics; the runner does not
    run `lwm eval needle` yet, so a plan with ``needle:`` is refused.
    """
    needing = [s.name for s in stages if not s.needle.empty]
    if needing:
        raise ValueError(f"stages {needing} have a needle: section, but the stage runner does not run "
                         "`lwm eval needle` yet; run it on the stage's run directory by hand")
    return trainer_eval_loss


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
