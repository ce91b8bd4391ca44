"""A data-only job for tests: the loader of one process of a (possibly) multi-process job.

    python tests/multihost_loader_job.py OUT.npz BATCHES [--restore CKPT] [--save CKPT] [--set KEY=VALUE ...]

Joins the job from the ``LWM_*`` variables (``trainer.distributed``), builds the
``trainer.training.loader.Loader`` of ``configs/train_tiny.yaml`` with the overrides, optionally
moves it to the data position saved in ``CKPT`` (an orbax manager whose one step is the
position in batches), gathers
``BATCHES`` global batches onto every process, and process 0 writes them to OUT.npz.
``--save`` then stores the loader's position in ``CKPT``, every process taking part.
"""

import argparse
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from trainer import config as config_lib
from trainer import distributed
from trainer.training.loader import BATCH_KEYS, Loader
from trainer.training.data_position import DataPositionRestore, DataPositionSave
from trainer.sharding import make_mesh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("batches", type=int)
    parser.add_argument("--restore")
    parser.add_argument("--save")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    distributed.join()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load(os.path.join(root, "configs", "train_tiny.yaml"), args.set)
    loader = Loader(config.data, make_mesh(config.mesh))
    position = 0
    if args.restore:
        with ocp.CheckpointManager(args.restore, item_names=("data_iter",)) as mngr:
            (position,) = mngr.all_steps()
            mngr.restore(position, args=ocp.args.Composite(data_iter=DataPositionRestore(loader.iterator, position)))
    gathered = {k: [] for k in BATCH_KEYS}
    for _ in range(args.batches):
        batch = next(loader)
        for key in BATCH_KEYS:
            gathered[key].append(np.asarray(multihost_utils.process_allgather(batch[key], tiled=True)))
    if args.save:
        with ocp.CheckpointManager(args.save, item_names=("data_iter",),
                                   options=ocp.CheckpointManagerOptions(create=True)) as mngr:
            mngr.save(position + args.batches, args=ocp.args.Composite(data_iter=DataPositionSave(loader.iterator)))
            mngr.wait_until_finished()
    if jax.process_index() == 0:
        np.savez(args.out, **{k: np.stack(v) for k, v in gathered.items()})
    loader.close()


if __name__ == "__main__":
    main()
