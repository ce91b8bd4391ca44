"""Device mesh and sharding rules: the one place where logical axes meet devices.

Mesh axes (as in the paper's tables, docs/LWM.md, "Training recipe"):
- ``dp``: data parallel, parameters replicated;
- ``fsdp``: data parallel with parameters, gradients and optimizer state sharded;
- ``sp``: sequence parallel (ring attention): the sequence axis is split, and
  parameters are sharded over it too, since its devices also hold different data;
- ``tp``: tensor parallel: heads, MLP hidden units and vocabularies split.

The model names logical axes only (``trainer.model``); ``LOGICAL_RULES`` maps them
to mesh axes. Activations: batch over (dp, fsdp), length over sp, heads/mlp/vocab
over tp. Parameters: the ``embed`` axis over (fsdp, sp), heads/mlp/vocab over tp.

Over several hosts (or TPU slices) each axis has an inner part, within a host's
fast interconnect (ICI), and an outer part across the data-center network
(``MeshConfig.dcn``, as MaxText's ``dcn_*_parallelism``). By default ``dp`` then
``fsdp`` take the hosts, so that the ring (``sp``) and ``tp`` stay inside one host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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
class DcnConfig:
    """How many ways each mesh axis is split across hosts (slices on TPU), out of its total size.

    All 1 (the default) leaves the split to ``dcn_shape``: ``dp``, then ``fsdp``.
    """

    dp: int = 1
    fsdp: int = 1
    sp: int = 1
    tp: int = 1

    def __post_init__(self):
        if any(s < 1 for s in self.as_tuple()):
            raise ValueError(f"mesh.dcn sizes must be positive, got {dict(zip(MESH_AXES, self.as_tuple()))}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.dp, self.fsdp, self.sp, self.tp)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1, meaning "all remaining devices" (paper's tables).

    ``dcn``: the part of each axis that spans hosts (see ``DcnConfig``).
    """

    dp: int = 1
    fsdp: int = -1
    sp: int = 1
    tp: int = 1
    dcn: DcnConfig = DcnConfig()

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


def dcn_shape(config: MeshConfig, shape: Sequence[int], granules: int) -> tuple[int, ...]:
    """The cross-host part of each axis of a mesh of ``shape`` over ``granules`` hosts (or slices).

    ``config.dcn`` when given, else the hosts go to ``dp`` and then ``fsdp``;
    ValueError naming the axis or product that does not divide.
    """
    named = lambda sizes: dict(zip(MESH_AXES, sizes))  # noqa: E731
    dcn = config.dcn.as_tuple()
    if dcn == (1,) * len(MESH_AXES) and granules > 1:
        dp = math.gcd(shape[0], granules)
        fsdp = math.gcd(shape[1], granules // dp)
        dcn = (dp, fsdp, 1, 1)
        if dp * fsdp != granules:
            raise ValueError(f"dp * fsdp = {shape[0] * shape[1]} of mesh {named(shape)} cannot be split over "
                             f"{granules} hosts; set mesh.dcn to place the hosts on other axes")
    for axis, total, outer in zip(MESH_AXES, shape, dcn):
        if total % outer:
            raise ValueError(f"mesh.dcn.{axis} = {outer} does not divide mesh axis {axis} = {total}")
    if math.prod(dcn) != granules:
        raise ValueError(f"mesh.dcn {named(dcn)} spans {math.prod(dcn)} hosts, but the job has {granules}")
    return dcn


def device_grid(config: MeshConfig, devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged in the mesh's shape: each host's devices form the inner (ICI) block.

    Hosts are TPU slices where devices have a ``slice_index``, else processes.
    """
    shape = config.resolve(len(devices))
    by_slice = getattr(devices[0], "slice_index", None) is not None
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    dcn = dcn_shape(config, shape, granules)
    ici = tuple(total // outer for total, outer in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``MESH_AXES`` over ``devices`` (default: all), tp innermost, hosts outermost."""
    devices = list(jax.devices() if devices is None else devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len({d.process_index for d in devices}) == 1 and config.dcn == DcnConfig():
        return jax.make_mesh(config.resolve(len(devices)), MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(device_grid(config, devices), MESH_AXES, axis_types=auto)


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
