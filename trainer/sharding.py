"""Device mesh and sharding rules: the one place where logical axes meet devices.

Mesh axes (as in the paper's tables, LWM_FACTS "Training recipe"):
- ``dp``: data parallel, parameters replicated;
- ``fsdp``: data parallel with parameters, gradients and optimizer state sharded;
- ``sp``: sequence parallel (ring attention): the sequence axis is split, and
  parameters are sharded over it too, since its devices also hold different data;
- ``tp``: tensor parallel: heads, MLP hidden units and vocabularies split.

The model names logical axes only (``trainer.model``); ``LOGICAL_RULES`` maps them
to mesh axes. Activations: batch over (dp, fsdp), length over sp, heads/mlp/vocab
over tp. Parameters: the ``embed`` axis over (fsdp, sp), heads/mlp/vocab over tp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.model import AttentionFn, ModelConfig
from trainer.ring_attention import ring_attention

MESH_AXES = ("dp", "fsdp", "sp", "tp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("dp", "fsdp")),
    ("length", "sp"),
    ("act_embed", None),
    ("act_heads", "tp"),
    ("act_kv_heads", "tp"),
    ("act_mlp", "tp"),
    ("act_vocab", "tp"),
    # parameters
    ("embed", ("fsdp", "sp")),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("mlp", "tp"),
    ("vocab", "tp"),
    ("vision_vocab", "tp"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1, meaning "all remaining devices" (paper's tables)."""

    dp: int = 1
    fsdp: int = -1
    sp: int = 1
    tp: int = 1

    def __post_init__(self):
        sizes = self.as_tuple()
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        if sizes.count(-1) > 1:
            raise ValueError("at most one mesh axis may be -1")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.dp, self.fsdp, self.sp, self.tp)

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        """Concrete axis sizes for ``num_devices`` devices."""
        sizes = self.as_tuple()
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(f"{num_devices} devices do not divide into fixed mesh axes of size {fixed}")
            sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
        return sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``MESH_AXES`` over ``devices`` (default: all), tp innermost."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The mesh ``PartitionSpec`` for a tuple of logical axis names."""
    return nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES)


def named_sharding(mesh: Mesh, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names))


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Makes ``mesh`` and ``LOGICAL_RULES`` current: the model's logical constraints apply.

    Trace (``jit``) sharded steps inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def param_shardings(mesh: Mesh, boxed_params: Any) -> Any:
    """``NamedSharding`` per parameter, from the logical names in ``boxed_params``.

    ``boxed_params`` is ``trainer.model.abstract_params(config)``.
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[B, S]`` batch arrays: batch over (dp, fsdp), sequence over sp."""
    return named_sharding(mesh, ("batch", "length"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places host ``[B, S]`` arrays (already in ring layout) on the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def validate(config: ModelConfig, mesh: Mesh, batch_size: int, seq_len: int) -> None:
    """Raises ValueError when the model or batch shape cannot be split over ``mesh``."""
    sizes = dict(mesh.shape)
    data = sizes["dp"] * sizes["fsdp"]
    if batch_size % data:
        raise ValueError(f"batch size {batch_size} is not divisible by dp*fsdp = {data}")
    if seq_len % sizes["sp"]:
        raise ValueError(f"sequence length {seq_len} is not divisible by sp = {sizes['sp']}")
    tp = sizes["tp"]
    for name in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{name} = {getattr(config, name)} is not divisible by tp = {tp}")
    if config.vision_vocab_size % tp:
        raise ValueError(f"vision_vocab_size = {config.vision_vocab_size} is not divisible by tp = {tp}")
    if config.d_model % (sizes["fsdp"] * sizes["sp"]):
        raise ValueError(f"d_model {config.d_model} is not divisible by fsdp*sp = {sizes['fsdp'] * sizes['sp']}")


def attention_fn(mesh: Mesh, config: ModelConfig) -> AttentionFn:
    """Ring attention over ``sp``, per shard under ``jax.shard_map``, as the model's ``AttentionFn``.

    Inputs are global arrays whose sequence axis is already in the ring layout;
    ``positions`` serve as the causal-mask positions: tokens only attend within their
    own segment, where per-segment positions order tokens exactly as global ones do.
    """
    heads = logical_to_spec(("batch", "length", "act_heads", "head_dim"))
    kv_heads = logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"))
    tokens = logical_to_spec(("batch", "length"))

    def per_shard(q, k, v, segment_ids, positions):
        return ring_attention(
            q, k, v,
            q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
            q_positions=positions, kv_positions=positions,
            axis_name="sp", causal=True,
            block_q=config.attention_block_q, block_kv=config.attention_block_kv,
        )

    return jax.shard_map(
        per_shard, mesh=mesh,
        in_specs=(heads, kv_heads, kv_heads, tokens, tokens),
        out_specs=heads,
    )
