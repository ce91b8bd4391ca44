"""The output side every data job shares: where its datasets go and how they are packed and sharded.

Embedded in each job's config as ``output`` (its fields become the job's
``--output``, ``--buckets``/``--seq-len``, ``--name``, ``--pack-groups``,
``--shard-mb``, ``--num-shards`` and ``--overwrite`` flags, :mod:`schemas.flags`).
Pure: no Beam.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.kit import buckets as buckets_lib
from schemas import flags
from pipelines.kit.buckets import Bucket


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """One packed dataset per length bucket, each in ``OUTPUT/seq{L}/``."""

    output: str = flags.field(record=False)
    """Output directory (local or gs://); each bucket's dataset goes into OUTPUT/seq{L}/."""
    buckets: tuple[Bucket, ...] = flags.field(parse=buckets_lib.parse, metavar="SPEC", aliases=("--seq-len",))
    """Length buckets: SEQ_LEN:MIN-MAX,... (document-length range per sequence length, one dataset each),
    a bare SEQ_LEN for one bucket of any document length (--seq-len 1024 is --buckets 1024), or a preset
    (lwm-text: the paper's five text stages)."""
    name: str = ""
    """Shard name prefix (empty: the job's name, e.g. books, image_text)."""
    pack_groups: int = 16
    """Hash groups per bucket, each packed on its own (parallelism of the packing step), once the bucket
    holds 16 sequences' worth of tokens per group; a smaller bucket is packed as one group. Each group's least
    full sequence is repacked with the others', so groups cost no utilization."""
    shard_mb: int = 256
    """Target shard size in MiB (estimated at 2 bytes per token); each group packed on its own writes its own
    shards, and the leftovers theirs, so a large bucket has at least --pack-groups + 1 shards."""
    num_shards: int | None = None
    """Fixed number of shards per bucket (overrides --shard-mb), shared out by tokens; at most
    --num-shards - 1 pack groups then (each writes its own shards, and the leftovers one at least)."""
    overwrite: bool = flags.field(False, record=False)
    """Replace existing datasets; the new ones are built beside them and swapped in only once complete."""

    def __post_init__(self):
        if not self.output:
            raise ValueError("output must name a directory")
        if not self.buckets:
            raise ValueError("no buckets given")
        if self.pack_groups < 1 or self.shard_mb < 1 or (self.num_shards is not None and self.num_shards < 1):
            raise ValueError(f"pack_groups, shard_mb and num_shards must be >= 1, got {self.pack_groups}, "
                             f"{self.shard_mb}, {self.num_shards}")

    @property
    def shard_bytes(self) -> int:
        return self.shard_mb << 20

    def shard_name(self, job: str) -> str:
        """The shard name prefix: ``name``, or the job's name with ``_`` for ``-``."""
        return self.name or job.replace("-", "_")


def recorded(config: Any) -> Any:
    """A job config as JSON-ready data for its manifests: buckets as their specs, tuples as lists, and
    fields marked ``record=False`` (where the output lives, how work was batched) left out."""
    if isinstance(config, Bucket):
        return config.spec()
    if dataclasses.is_dataclass(config):
        return {f.name: recorded(getattr(config, f.name)) for f in dataclasses.fields(config)
                if f.metadata.get("record", True)}
    if isinstance(config, (tuple, list)):
        return [recorded(v) for v in config]
    return config
