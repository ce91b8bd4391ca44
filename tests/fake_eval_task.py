"""A registered-at-test-time evaluation task: proves a task is one module plus one registry line."""

import dataclasses
import json
import os

from trainer.evaluation import Task


@dataclasses.dataclass(frozen=True)
class CoinConfig:
    """Scores a checkpoint directory by the length of its name (no weights needed)."""

    scale: float = 1.0
    """Multiplies the score."""


def run(config: CoinConfig, target, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    score = config.scale * len(os.path.basename(target.ckpt))
    with open(os.path.join(out, "score.json"), "w") as f:
        json.dump({"score": score}, f)
    return f"score {score}"


def metrics(config: CoinConfig, out: str) -> dict[str, float]:
    with open(os.path.join(out, "score.json")) as f:
        return {"coin_score": json.load(f)["score"]}


TASK = Task("coin", CoinConfig, run, metrics, lambda config: ("coin_score",), help="a test task",
            description="A test task.", needs_tokenizer=False)
