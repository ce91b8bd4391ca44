"""The Grain loader: packed shards of one stage → global ``jax.Array`` batches on the mesh.

Pipeline (every step deterministic and stateless given the seed)::

    manifests of the stage's datasets (refused if incomplete or mismatched)
      → per dataset: MapDataset over its non-empty ArrayRecord shards, in manifest order
      → shuffle (seeded, per dataset; reshuffled every epoch) → repeat forever
      → mix the datasets with their weights (``MapDataset.mix``: a fixed interleave
        in the configured proportions)
      → this host's block of every global batch (``HostBlocks``: the same records a
        single process puts in those rows, so the global batch does not depend on
        the number of processes)
      → decode (``schemas.packed.decode``; a record of another length than the
        manifest's ``seq_len`` is refused) → batch
      → ``NextTokenTargets``: targets in natural order (``trainer.ring_layout.next_token_targets``)
      → ``RingLayout``: the ring layout of the sequence axis (``trainer.ring_layout.batch_permutation``)
      → to_iter_dataset (+ ``mp_prefetch`` with ``worker_count`` processes)
    then, per step, ``jax.make_array_from_process_local_data`` on the batch sharding.

Every element is a function of its index alone, so the batches do not depend on
the worker count, and the iterator's state (``Loader.iterator``, a Grain
``DatasetIterator``) is a position that a checkpoint saves and restores exactly.
Batch ``k`` of every process is its block of global batch ``k``: the position is
the same on every process, which is what lets a run resume on another number of
processes (``trainer.training.data_position``).

Batch arrays, all ``[B, S]`` in the ring layout: ``tokens``, ``vision_mask``,
``segment_ids``, ``positions`` and the targets ``targets``, ``target_vision_mask``,
``target_weights`` (the record's loss weights, aligned with the predicting position).
"""

from __future__ import annotations

import functools
from typing import Iterator

import grain
from absl import flags
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from schemas import manifest as manifest_lib
from schemas import packed
from trainer import ring_layout as layout
from trainer.config import DataConfig
from trainer.sharding import batch_sharding


BATCH_KEYS = ("tokens", "vision_mask", "segment_ids", "positions", "targets", "target_vision_mask",
              "target_weights")


def read_manifests(config: DataConfig) -> list[manifest_lib.Manifest]:
    """The manifests of ``config.datasets``, refusing data that does not belong to this stage.

    ``ValueError`` naming what differs: a missing manifest (incomplete job), a shard
    whose size (or, with ``config.verify_hashes``, hash) differs from its manifest, a
    ``seq_len`` other than ``config.seq_len``, tokenizers that differ between datasets,
    a dataset with no records. Its cost does not grow with the data: one listing per
    dataset, no shard read (every record's CRC-32 is checked as it is decoded).
    """
    if not config.datasets:
        raise ValueError("data.datasets is empty: list the packed dataset directories of this stage")
    manifests = [manifest_lib.read(d.path, verify_hashes=config.verify_hashes) for d in config.datasets]
    first = config.datasets[0].path
    for dataset, manifest in zip(config.datasets, manifests):
        if manifest.seq_len != config.seq_len:
            raise ValueError(f"{dataset.path}: manifest seq_len is {manifest.seq_len}, but this stage's "
                             f"data.seq_len is {config.seq_len}")
        if manifest.records == 0:
            raise ValueError(f"{dataset.path}: the dataset has no records (its job packed no examples); "
                             "rerun the job with inputs that fit its buckets, or remove it from data.datasets")
        if manifest.tokenizer.get("sha256") != manifests[0].tokenizer.get("sha256"):
            raise ValueError(f"{dataset.path}: tokenizer sha256 {manifest.tokenizer.get('sha256')} differs from "
                             f"{manifests[0].tokenizer.get('sha256')} of {first}")
    return manifests


def _source(path: str, manifest: manifest_lib.Manifest) -> grain.MapDataset:
    # Empty shards are skipped: an ArrayRecord file with no records cannot be opened for reading.
    paths = [p for p, s in zip(manifest_lib.shard_paths(path, manifest), manifest.shards) if s.records]
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))


def _dataset_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class HostBlocks(grain.MapDataset):
    """Block ``block`` of ``num_blocks`` equal row blocks of every global batch, in order.

    With ``rows`` records per block, element ``i`` is record
    ``(i // rows) * rows * num_blocks + block * rows + i % rows`` of the parent:
    batching this by ``rows`` gives exactly rows ``block * rows ...`` of the batch a
    single process builds from the parent, and reads no other record.
    """

    def __init__(self, parent: grain.MapDataset, num_blocks: int, block: int, rows: int):
        super().__init__(parent)
        self.num_blocks, self.block, self.rows = num_blocks, block, rows

    def __len__(self) -> int:
        return len(self._parent) // (self.rows * self.num_blocks) * self.rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self.rows)
        return self._parent[(batch * self.num_blocks + self.block) * self.rows + row]


class NextTokenTargets(grain.transforms.Map):
    """Adds ``targets``, ``target_vision_mask`` and ``target_weights`` to a natural-order batch."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, **layout.next_token_targets(batch)}


class RingLayout(grain.transforms.Map):
    """Puts the ``BATCH_KEYS`` of a batch in the ring layout of ``num_shards`` devices.

    ``columns`` keeps only this host's part of the (permuted) sequence axis, for
    meshes whose ``sp`` axis spans hosts.
    """

    def __init__(self, num_shards: int, layout_name: str, block: int, columns: slice = slice(None)):
        self.num_shards, self.layout_name, self.block, self.columns = num_shards, layout_name, block, columns

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return layout.apply_layout(batch, BATCH_KEYS, self.num_shards, self.layout_name, self.block, self.columns)


def dataset(config: DataConfig, manifests: list[manifest_lib.Manifest], *, batch_size: int,
            num_shards: int = 1, shard_index: int = 0, sp: int = 1, block: int = layout.DEFAULT_BLOCK,
            columns: slice = slice(None)) -> grain.IterDataset:
    """The Grain pipeline of the module docstring, yielding numpy batches ``[batch_size, S]``.

    This host reads row block ``shard_index`` of ``num_shards`` blocks of
    ``batch_size`` rows of every global batch (``HostBlocks``); ``sp`` is the
    number of ring shards of the layout and ``block`` the ring kernel's tile size
    (the ``segments`` layout balances tiles).
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    sources = [
        _source(d.path, m).shuffle(seed=_dataset_seed(config.seed, i)).repeat()
        for i, (d, m) in enumerate(zip(config.datasets, manifests))
    ]
    weights = [d.proportion for d in config.datasets]
    mixed = grain.MapDataset.mix(sources, weights) if len(sources) > 1 else sources[0]
    records = HostBlocks(mixed, num_shards, shard_index, batch_size).map(
        functools.partial(packed.decode, seq_len=config.seq_len))
    batches = records.batch(batch_size, drop_remainder=True)
    layout.check_layout(config.seq_len, sp, config.layout)
    batches = batches.map(NextTokenTargets()).map(RingLayout(sp, config.layout, block, columns))
    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_threads))
    if config.worker_count:
        # Grain's workers read absl flags, which a program without absl.app never
        # parses (google/grain#1355): mark them parsed so their defaults apply.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return stream


def process_block(sharding: NamedSharding, global_shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and sequence columns of a ``[B, S]`` global array that this process's devices hold."""
    spans = []
    for axis, size in enumerate(global_shape):
        index = [i[axis] for i in sharding.addressable_devices_indices_map(global_shape).values()]
        spans.append(slice(min(s.start or 0 for s in index), max(size if s.stop is None else s.stop for s in index)))
    return spans[0], spans[1]


class Loader:
    """Global batches for one stage on ``mesh``; ``iterator`` is the checkpointable Grain state.

    ``batch_size`` global sequences per batch (default ``config.batch_size``; the
    trainer passes the micro-batch size under gradient accumulation); ``block`` the
    model's attention block size, whose tiles the ``segments`` layout balances. Use as
    an iterator; ``close()`` stops prefetch workers.
    """

    def __init__(self, config: DataConfig, mesh: Mesh, batch_size: int | None = None, *,
                 block: int = layout.DEFAULT_BLOCK):
        self.config = config
        self.manifests = read_manifests(config)
        self.global_shape = (batch_size or config.batch_size, config.seq_len)
        self.sharding = batch_sharding(mesh)
        rows, columns = process_block(self.sharding, self.global_shape)
        local_rows = rows.stop - rows.start
        if self.global_shape[0] % local_rows:
            raise ValueError(f"batch size {self.global_shape[0]} does not split into blocks of {local_rows} rows")
        self.pipeline = dataset(
            config, self.manifests, batch_size=local_rows, num_shards=self.global_shape[0] // local_rows,
            shard_index=rows.start // local_rows, sp=mesh.shape["sp"], columns=columns,
            block=block,
        )
        self.iterator = iter(self.pipeline)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self.iterator)
        return {k: jax.make_array_from_process_local_data(self.sharding, v, self.global_shape)
                for k, v in local.items()}

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
