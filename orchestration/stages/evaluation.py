"""Evaluation between stages and the gates that promote a stage's weights to the next one.

LWM claims 1M tokens of context, yet RULER measures its effective length under 4K:
promotion should rest on a measurement. A stage's ``eval:`` (held-out loss) and
``needle:`` run after it finishes; their results are a flat mapping saved in
``lineage.json``:

- ``eval_loss``: mean held-out loss over ``eval.datasets`` (and ``eval_loss/PATH`` each);
- ``needle_accuracy/L``: needle-in-a-haystack accuracy at context length ``L``, over
  ``needle.depths`` × ``needle.rounds``.

An ``Evaluator`` computes them for a stage; ``gate_failures`` compares them with
``gate:``. The evaluator is a parameter of the runner, so the gating logic does not
depend on how the numbers are measured.
"""

from __future__ import annotations

from typing import Callable, Iterable

from orchestration.stages.plan import Stage

Evaluator = Callable[[Stage], dict[str, float]]


def needle_key(length: int) -> str:
    return f"needle_accuracy/{length}"


def evaluator_for(stages: Iterable[Stage]) -> Evaluator:
    """The evaluator that runs ``stages``' eval sections; ValueError, before anything runs, if it cannot.

    This build has no ``lwm eval loss|needle`` yet, so a plan with ``eval:`` or ``needle:`` is refused.
    """
    needing = [s.name for s in stages if s.evaluates]
    if needing:
        raise ValueError(f"stages {needing} ask for evaluation, but this build has no `lwm eval loss|needle` "
                         "to run it; remove eval:/needle:/gate: from the plan or install a build with evaluation")
    return _no_evaluation


def _no_evaluation(stage: Stage) -> dict[str, float]:
    raise AssertionError(f"stage {stage.name}: evaluation requested of a plan checked to have none")


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
