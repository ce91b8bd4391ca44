"""``variable-tracking``: RULER's multi-hop tracing: which variables hold a value after a chain of assignments.

A chain "VAR ABCDE = 12345." then "VAR FGHIJ = ABCDE." … starts at the requested
depth; ``needles - 1`` more chains are distractors; the answer must name every
variable of the first chain (:mod:`trainer.evaluation.haystack`).
"""

import dataclasses

from schemas import flags
from trainer.evaluation.haystack import NeedleConfig, sweep_task


@dataclasses.dataclass(frozen=True)
class VariableTrackingConfig(NeedleConfig):
    """A sweep of assignment chains instead of needles."""

    task: str = flags.field("variable-tracking", hidden=True)
    """Always variable tracking."""
    ask: int = flags.field(1, hidden=True)
    """One chain is asked about."""


TASK = sweep_task(
    "variable-tracking", VariableTrackingConfig,
    help="RULER variable tracking: name every variable a value reaches through --hops assignments",
    description="Insert a chain of --hops + 1 assignments starting at each depth (and --needles - 1 distractor "
    "chains), ask which variables hold the chain's value and score the greedy answer (correct iff every name "
    "appears). Writes OUT/results.jsonl, OUT/table.txt and OUT/heatmap.png. Deterministic for a --seed.",
    examples=("lwm eval variable-tracking --ckpt runs/tiny --tokenizer tok.model --lengths 1024 --hops 2 "
              "--out vt/",))
