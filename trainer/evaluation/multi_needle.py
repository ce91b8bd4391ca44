"""``multi-needle``: several needles in one haystack, some of them asked for (LWM: insert 4, ask for 2).

The first needle goes at the requested depth, the others at seeded depths; the
answer must contain every asked needle's number (:mod:`trainer.evaluation.haystack`).
"""

import dataclasses

from schemas import flags
from trainer.evaluation.haystack import NeedleConfig, sweep_task


@dataclasses.dataclass(frozen=True)
class MultiNeedleConfig(NeedleConfig):
    """A needle sweep with several needles inserted and some asked for."""

    needles: int = 4
    """Needles inserted, each with its own city."""
    ask: int = 2
    """Needles asked for (all must be in the answer)."""
    task: str = flags.field("needle", hidden=True)
    """Always needles."""
    hops: int = flags.field(4, hidden=True)
    """Unused: variable tracking only."""


TASK = sweep_task(
    "multi-needle", MultiNeedleConfig,
    help="multi-needle retrieval: --needles inserted, --ask of them asked for, over lengths × depths",
    description="Insert --needles needle sentences (the first at each depth, the others at seeded depths), ask "
    "for the first --ask of them and score the greedy answer (correct iff every asked number appears). Writes "
    "OUT/results.jsonl, OUT/table.txt and OUT/heatmap.png. Deterministic for a --seed.",
    examples=("lwm eval multi-needle --ckpt runs/tiny --tokenizer tok.model --lengths 1024,2048 --out multi/  "
              "# 4 inserted, 2 asked",
              "lwm eval multi-needle --ckpt runs/tiny --tokenizer tok.model --needles 8 --ask 4 --out multi/"))
