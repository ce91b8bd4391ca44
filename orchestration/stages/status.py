"""Where each stage of a plan stands: ``lwm stages status`` and the runner's skip/resume decisions.

A stage is ``finished`` when its newest committed checkpoint is its last step (the
trainer always saves the last step); otherwise its lineage says how its last attempt
ended (``running``, ``interrupted``, ``failed``; ``interrupted`` too when it says running
but its runner on this host is gone), or it is ``pending``. Committed steps are what
orbax says they are (``trainer.checkpoint.committed_steps``): on an object store a step
folder is named before its commit marker is written, so a final save cut off is a
folder with the last step's name and no marker, which counts as interrupted (resumed
from the step before) rather than finished. No orbax manager is made: it would start
the JAX backend, and on a TPU host the stage's own training process needs the chips.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from orchestration.stages import lineage
from orchestration.stages.plan import Plan, Stage
from schemas import storage
from trainer import checkpoint

FINISHED, PENDING, INTERRUPTED = "finished", "pending", "interrupted"


def checkpoint_steps(run_dir: str) -> list[int]:
    """Committed checkpoint steps in ``RUN_DIR/checkpoints``, ascending."""
    return checkpoint.committed_steps(storage.join(run_dir, "checkpoints"))


def _metrics_lines(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def last_metrics(run_dir: str) -> dict[str, Any]:
    """The trainer's last training entry of ``metrics.jsonl`` ({} before the first log line)."""
    return next((m for m in reversed(_metrics_lines(run_dir)) if "loss" in m), {})


def eval_metrics(run_dir: str, step: int) -> dict[str, float]:
    """The held-out loss metrics (``eval/NAME/...``) the trainer logged at ``step`` ({} if none)."""
    found = [m for m in _metrics_lines(run_dir) if m.get("step") == step and any(k.startswith("eval/") for k in m)]
    return {k: v for k, v in found[-1].items() if k.startswith("eval/")} if found else {}


@dataclasses.dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str
    step: int
    steps: int
    last_loss: float | None
    tokens_seen: int
    checkpoint: str
    duration_s: float
    evaluation: dict[str, float]
    gate: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_status(stage: Stage) -> StageStatus:
    steps = checkpoint_steps(stage.run_dir)
    step = steps[-1] if steps else 0
    record = lineage.read(stage.run_dir) or {}
    if step == stage.config.steps:
        state = FINISHED
    elif lineage.runner_gone(record):
        state = INTERRUPTED
    elif record.get("state"):
        state = record["state"]
    else:
        state = INTERRUPTED if steps else PENDING
    metrics = last_metrics(stage.run_dir)
    data = stage.config.data
    return StageStatus(
        stage=stage.name, state=state, step=step, steps=stage.config.steps, last_loss=metrics.get("loss"),
        tokens_seen=step * data.batch_size * data.seq_len,
        checkpoint=f"{stage.run_dir}/checkpoints/{step}" if steps else "",
        duration_s=round(lineage.duration_s(record), 1), evaluation=record.get("evaluation") or {},
        gate=record.get("gate") or "",
    )


def plan_status(plan: Plan) -> list[StageStatus]:
    return [stage_status(stage) for stage in plan.stages]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def table(rows: list[StageStatus]) -> str:
    """A fixed-width table, one line per stage."""
    header = ("stage", "state", "step", "last loss", "tokens seen", "checkpoint", "duration", "eval / gate")
    lines = [header]
    for row in rows:
        evaluation = ", ".join(f"{k} {v:.4g}" for k, v in row.evaluation.items())
        lines.append((
            row.stage, row.state, f"{row.step}/{row.steps}",
            "-" if row.last_loss is None else f"{row.last_loss:.4f}", f"{row.tokens_seen:,}",
            row.checkpoint or "-", _duration(row.duration_s), "; ".join(x for x in (evaluation, row.gate) if x) or "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
