"""Evaluation tasks by name: the one registry that ``lwm eval TASK`` and a stage's gates read.

A task is one module here plus one line in :data:`TASKS`. The module defines
``TASK = Task(...)``:

- ``config``: a frozen dataclass of the task's settings. Its fields are the flags of
  ``lwm eval NAME`` (:mod:`schemas.flags`) and the keys of a stage's
  ``evals: {NAME: {...}}`` section (:mod:`schemas.typed_config`), so the command and
  the plan cannot disagree;
- ``run(config, target, out) -> str``: evaluates the checkpoint ``target``
  (:class:`Target`), writes its results under the directory ``out`` and returns the
  summary to print;
- ``metrics(config, out) -> dict[str, float]``: the measurements in ``out`` that
  gates compare (``needle_accuracy/1024``, ``eval/books/loss``, ...);
- ``metric_names(config)``: the names ``metrics`` gives, so a plan's ``gate:`` is
  checked when the plan loads;
- ``examples``: runnable ``lwm eval NAME ...`` lines for its ``--help``.

Stage plans run every task in a stage's ``evals:`` after the stage (``lwm eval
NAME`` in a child process, ``RUN_DIR/NAME/`` as ``out``) and gate on any of their
measurements; nothing outside this package names a task. The registry holds
module names as strings, as :data:`pipelines.JOBS` does, and imports only the task
asked for.

Besides the tasks: ``haystack`` (the prompt sweep the retrieval tasks share),
``synthetic_books`` (filler text: the default haystack and the demo's books) and
``synthetic_videos`` (moving shapes: the video needle's default haystack and the
demo's image-text and video-text samples).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

TASKS = {
    "loss": "trainer.evaluation.heldout_loss",
    "needle": "trainer.evaluation.needle",
    "multi-needle": "trainer.evaluation.multi_needle",
    "variable-tracking": "trainer.evaluation.variable_tracking",
    "video-needle": "trainer.evaluation.video_needle",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What a task evaluates: a checkpoint (or run) directory, its step (None: the newest) and the
    tokenizer it was trained with (None for tasks that read no text)."""

    ckpt: str
    step: int | None = None
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation task (the module docstring says what each part does)."""

    name: str
    config: type
    run: Callable[[Any, Target, str | None], str]
    metrics: Callable[[Any, str], dict[str, float]]
    metric_names: Callable[[Any], tuple[str, ...]]
    help: str
    description: str
    examples: tuple[str, ...] = ()
    needs_tokenizer: bool = True
    out_required: bool = True  # False: ``out`` is optional (the task prints all it measures)


def task(name: str) -> Task:
    """The registered task ``name``; ValueError naming the registered ones."""
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; registered tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK
