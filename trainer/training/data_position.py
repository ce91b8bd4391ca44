"""The loader's position in a checkpoint: saved per process, restorable on another number of processes.

Every process saves its Grain iterator state as ``process_<i>-of-<n>.json`` in the
checkpoint's ``data_iter`` item (Grain's own layout). Batch ``k`` of every process is
its block of global batch ``k`` (``trainer.training.loader.HostBlocks``), so these states are
equal: the position in the data is one global quantity, ``position`` micro-batches.

Restoring, each process takes, in order:

1. its own file, when the checkpoint was saved by as many processes as now;
2. otherwise the state every saving process agreed on (refused if they differ);
3. if that state does not fit this iterator (another ``data.worker_count``: Grain
   then keeps one position per prefetch worker), the iterator is moved to the
   global ``position`` (``grain.experimental.set_next_index``); Grain can do that
   only without prefetch workers, so a change to a nonzero worker count is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

class DataPositionError(ValueError):
    """The saved data position cannot be moved to this run's processes or prefetch workers."""


_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _layout(state: Any) -> Any:
    """What must match for a saved state to fit an iterator: its keys and how many workers it lists."""
    if not isinstance(state, dict):
        return type(state).__name__
    return {k: len(v) if isinstance(v, list) else type(v).__name__ for k, v in state.items()}


def _agreed_state(directory) -> dict[str, Any]:
    """The state all saving processes wrote: ValueError when some are missing, DataPositionError when they differ."""
    files = {}
    for path in directory.iterdir():
        match = _FILE.fullmatch(path.name)
        if match:
            files[(int(match[1]), int(match[2]))] = path
    counts = {count for _, count in files}
    if len(counts) != 1:
        raise ValueError(f"{directory}: expected the data positions of one run, found files for "
                         f"{sorted(counts) or 'no'} process counts")
    (count,) = counts
    if sorted(files) != [(i, count) for i in range(count)]:
        raise ValueError(f"{directory}: data positions of processes {sorted(i for i, _ in files)} of {count}: "
                         "the checkpoint is incomplete")
    states = [json.loads(files[(i, count)].read_text()) for i in range(count)]
    if any(s != states[0] for s in states[1:]):
        raise DataPositionError(f"{directory}: the {count} saving processes stood at different data positions, so "
                         f"there is no global position to resume from on {jax.process_count()} processes")
    return states[0]


class DataPositionHandler(grain.checkpoint.CheckpointHandler):
    """Grain's per-process save; a restore that also works on another process or worker count."""

    def restore(self, directory, item=None, args=None):
        iterator, position = args.item, args.position
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        state = json.loads(own.read_text()) if own.exists() else _agreed_state(directory)
        if _layout(state) == _layout(iterator.get_state()):
            iterator.set_state(state)
        else:
            try:
                grain.experimental.set_next_index(iterator, position)
            except NotImplementedError:
                raise DataPositionError(
                    "the checkpoint's data position was saved with another data.worker_count; Grain keeps one "
                    "position per prefetch worker and cannot move a multi-worker iterator to a global position, "
                    "so resume with the saved data.worker_count or with data.worker_count=0") from None
        iterator.start_prefetch()
        return iterator


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
    item: grain.DatasetIterator


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
    """``position``: micro-batches consumed at the checkpoint's step (step × grad_accum_steps)."""

    item: grain.DatasetIterator
    position: int
