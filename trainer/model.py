"""The LWM model: Llama-2 plus LWM's vision vocabulary, in Flax linen.

Architecture (docs/LWM.md, "Training recipe", "Vision tokens"): a text embedding and a
separate vision embedding chosen per position by ``vision_mask``; a stack of
pre-norm decoder layers (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP);
a final RMSNorm; separate text and vision output heads.

Long-context choices:
- layers run under ``nn.scan`` (one compiled layer, parameters stacked on a leading
  ``layers`` axis) with ``nn.remat`` and a configurable checkpoint policy;
- the MLP runs blockwise over sequence chunks, so the ``[B, S, mlp_dim]``
  intermediate never exists at once;
- attention is a callable given to the model (``AttentionFn``): ring attention
  under ``shard_map`` when sharded (``trainer.sharding.attention_fn``), dense
  attention on one device. Masks use ``positions`` and ``segment_ids`` only, so
  the model works on sequences in any token order (the loader's ring layout);
- the model returns final hidden states; logits are made chunk by chunk by the
  loss (``trainer.loss``) so no ``[S, vocab]`` tensor is materialised.

The math never names devices: activations and parameters carry logical axis
names, which ``trainer.sharding`` maps onto the mesh.

Shape legend: B batch, S sequence, D d_model, H query heads, K key/value heads,
E head dim, F mlp dim, V text vocab, W vision vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from schemas import vocab
from schemas.typed_config import from_mapping
from trainer.ring_attention import dense_attention


AttentionFn = Callable[..., jax.Array]
"""``fn(q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxS, positions_BxS) -> out_BxSxHxE``
(with a key/value cache: ``fn(..., cache) -> (out_BxSxHxE, cache)``, see ``LWM.__call__``)."""

_DTYPES = ("float32", "bfloat16", "float16")

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: everything saved for the backward pass
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one model; defaults are Llama-2 7B with LWM's vision vocabulary.

    ``vision_vocab_size = 0`` makes a text-only model (no vision embedding or head).
    ``max_position_embeddings`` is metadata written to exported HF configs; RoPE
    itself works at any position.
    """

    vocab_size: int = vocab.TEXT_VOCAB_SIZE
    vision_vocab_size: int = vocab.VISION_VOCAB_SIZE
    d_model: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "nothing_saveable"
    mlp_chunk_size: int = 2048
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "max_position_embeddings", "mlp_chunk_size", "attention_block_q", "attention_block_kv")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.vision_vocab_size < 0:
            raise ValueError(f"ModelConfig.vision_vocab_size must be >= 0, got {self.vision_vocab_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError("head dim d_model / num_heads must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, rms_norm_eps and init_std must be positive")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> "ModelConfig":
        """Builds a config from a mapping (``preset`` plus fields, or every field); typos and wrong types fail."""
        return from_mapping(cls, data, where)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """The registered preset ``name`` (``llama2-7b``, ``lwm-7b``, ``tiny``)."""
        return get_preset(name)

    def num_params(self) -> int:
        """Parameter count (embeddings and heads included)."""
        d, e = self.d_model, self.head_dim
        attn = d * e * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * self.mlp_dim + 2 * d
        rows = self.vocab_size + self.vision_vocab_size
        return self.num_layers * layer + d + 2 * rows * d


PRESETS: dict[str, ModelConfig] = {
    # Llama-2 7B (Touvron et al. 2023, Table 1; HF meta-llama/Llama-2-7b-hf config.json),
    # the base model of LWM's text stages (docs/LWM.md, "Training recipe").
    "llama2-7b": ModelConfig(vision_vocab_size=0),
    # LWM-7B: Llama-2 7B plus the 8448-entry vision embedding and head; RoPE theta of
    # the paper's vision-language stages (5e7). Stage plans override rope_theta per stage.
    "lwm-7b": ModelConfig(vision_vocab_size=vocab.VISION_VOCAB_SIZE, rope_theta=5e7),
    # Tiny model for CPU tests and `lwm demo`: small demo tokenizer, full vision vocabulary
    # so real VQGAN ids fit.
    "tiny": ModelConfig(vocab_size=512, vision_vocab_size=vocab.VISION_VOCAB_SIZE, d_model=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, mlp_dim=128, max_position_embeddings=2048,
                        mlp_chunk_size=256, attention_block_q=128, attention_block_kv=128),
}


def get_preset(name: str) -> ModelConfig:
    """The registered preset ``name`` (``llama2-7b``, ``lwm-7b``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def sequence_chunked_map(fn: Callable[..., Any], arrays: tuple[jax.Array, ...], chunk_size: int) -> Any:
    """Applies ``fn`` to sequence chunks of ``arrays`` (each ``[B, S, ...]``), rematerialised.

    Returns ``fn``'s outputs (a pytree of ``[B, chunk, ...]`` per chunk) reassembled as
    ``[B, S, ...]``. Only one chunk's intermediates are alive at a time, in the
    forward and (by ``jax.checkpoint``) the backward pass. ``fn`` must treat tokens
    independently. Chunks are strided (token ``i * n + j`` goes to chunk ``j``), so
    a sequence axis sharded in contiguous blocks stays sharded inside every chunk.
    """
    batch, seq = arrays[0].shape[:2]
    if chunk_size >= seq:
        return fn(*arrays)
    if seq % chunk_size:
        raise ValueError(f"sequence length {seq} is not a multiple of chunk size {chunk_size}")
    n = seq // chunk_size

    def split(a):
        return jnp.moveaxis(a.reshape(batch, chunk_size, n, *a.shape[2:]), 2, 0)

    def merge(a):
        return jnp.moveaxis(a, 0, 2).reshape(batch, seq, *a.shape[3:])

    outs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(a) for a in arrays))
    return jax.tree.map(merge, outs)


def self_attention(q, k, v, segment_ids, positions):
    """Dense attention on one device: the ``AttentionFn`` used when no mesh is given."""
    return dense_attention(q, k, v, segment_ids, segment_ids, positions, positions, causal=True)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _normal(config: ModelConfig):
    return nn.initializers.normal(config.init_std)


def rope(x_BxSxNxE: jax.Array, positions_BxS: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split convention (HF Llama's ``rotate_half``)."""
    half = x_BxSxNxE.shape[-1] // 2
    inv_freq = jnp.asarray(1.0 / theta ** (np.arange(half, dtype=np.float64) / half), jnp.float32)
    angles_BxSxE2 = positions_BxS.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BxSxE2)[:, :, None, :]
    sin = jnp.sin(angles_BxSxE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxSxNxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxSxNxE.dtype)


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", (x_BxSxD.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x_BxSxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        dtype = jnp.dtype(self.config.dtype)
        return normed.astype(dtype) * scale_D.astype(dtype)


class Attention(nn.Module):
    config: ModelConfig
    attention_fn: AttentionFn

    @nn.compact
    def __call__(self, x_BxSxD, segment_ids_BxS, positions_BxS, cache=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        init = _normal(c)
        wq = _param(self, "q", (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), init)
        wk = _param(self, "k", (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), init)
        wv = _param(self, "v", (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), init)
        wo = _param(self, "o", (c.num_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), init)
        q_BxSxHxE = jnp.einsum("bsd,dhe->bshe", x_BxSxD, wq.astype(dtype))
        k_BxSxKxE = jnp.einsum("bsd,dke->bske", x_BxSxD, wk.astype(dtype))
        v_BxSxKxE = jnp.einsum("bsd,dke->bske", x_BxSxD, wv.astype(dtype))
        q_BxSxHxE = nn.with_logical_constraint(q_BxSxHxE, ("batch", "length", "act_heads", "head_dim"))
        k_BxSxKxE = nn.with_logical_constraint(k_BxSxKxE, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BxSxKxE = nn.with_logical_constraint(v_BxSxKxE, ("batch", "length", "act_kv_heads", "head_dim"))
        q_BxSxHxE = rope(q_BxSxHxE, positions_BxS, c.rope_theta)
        k_BxSxKxE = rope(k_BxSxKxE, positions_BxS, c.rope_theta)
        args = (q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxS, positions_BxS)
        if cache is None:
            out_BxSxHxE = self.attention_fn(*args)
        else:
            out_BxSxHxE, cache = self.attention_fn(*args, cache)
        out_BxSxD = jnp.einsum("bshe,hed->bsd", out_BxSxHxE, wo.astype(dtype))
        return nn.with_logical_constraint(out_BxSxD, ("batch", "length", "act_embed")), cache


class MLP(nn.Module):
    """SwiGLU feed-forward, computed blockwise over sequence chunks."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        init = _normal(c)
        gate_DxF = _param(self, "gate", (c.d_model, c.mlp_dim), ("embed", "mlp"), init).astype(dtype)
        up_DxF = _param(self, "up", (c.d_model, c.mlp_dim), ("embed", "mlp"), init).astype(dtype)
        down_FxD = _param(self, "down", (c.mlp_dim, c.d_model), ("mlp", "embed"), init).astype(dtype)

        def block(x_BxCxD):
            h_BxCxF = nn.silu(x_BxCxD @ gate_DxF) * (x_BxCxD @ up_DxF)
            h_BxCxF = nn.with_logical_constraint(h_BxCxF, ("batch", "length", "act_mlp"))
            return nn.with_logical_constraint(h_BxCxF @ down_FxD, ("batch", "length", "act_embed"))

        return sequence_chunked_map(block, (x_BxSxD,), c.mlp_chunk_size)


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention_fn: AttentionFn

    @nn.compact
    def __call__(self, x_BxSxD, segment_ids_BxS, positions_BxS, cache=None):
        # segment_ids and positions are loop-invariant in the layer scan; the ring kernel
        # itself keeps its masks from being hoisted out of the scan (``_tie`` in
        # trainer/ring_attention.py; BENCHMARKS.md, Model).
        h = RMSNorm(self.config, name="attn_norm")(x_BxSxD)
        attn_BxSxD, cache = Attention(self.config, self.attention_fn, name="attn")(
            h, segment_ids_BxS, positions_BxS, cache)
        x_BxSxD = x_BxSxD + attn_BxSxD
        h = RMSNorm(self.config, name="mlp_norm")(x_BxSxD)
        x_BxSxD = x_BxSxD + MLP(self.config, name="mlp")(h)
        return nn.with_logical_constraint(x_BxSxD, ("batch", "length", "act_embed")), cache


class LWM(nn.Module):
    """The LWM transformer. ``__call__`` returns final-normed hidden states ``[B, S, D]``.

    Inputs are the packed example's fields (``schemas.packed``): token ids (text ids
    where ``vision_mask`` is false, vision ids where true), ``segment_ids`` (0 =
    padding, attends to nothing) and per-segment ``positions`` (RoPE and causal mask).
    """

    config: ModelConfig
    attention_fn: AttentionFn = self_attention

    def setup(self):
        c = self.config
        init = _normal(c)
        self.text_embed = _param(self, "text_embed", (c.vocab_size, c.d_model), ("vocab", "embed"), init)
        self.text_head = _param(self, "text_head", (c.d_model, c.vocab_size), ("embed", "vocab"), init)
        if c.vision_vocab_size:
            shape = (c.vision_vocab_size, c.d_model)
            self.vision_embed = _param(self, "vision_embed", shape, ("vision_vocab", "embed"), init)
            self.vision_head = _param(self, "vision_head", shape[::-1], ("embed", "vision_vocab"), init)
        layer = DecoderLayer
        if c.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.attention_fn)
        self.final_norm = RMSNorm(c)

    def embed(self, tokens_BxS: jax.Array, vision_mask_BxS: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)

        def lookup(table_NxD, ids_BxS, vocab_axis):
            # Gather from a table split over the vocabulary only (not over embed).
            table_NxD = nn.with_logical_constraint(table_NxD, (vocab_axis, "act_embed"))
            return jnp.take(table_NxD, ids_BxS, axis=0, mode="clip").astype(dtype)

        x_BxSxD = lookup(self.text_embed, jnp.where(vision_mask_BxS, 0, tokens_BxS), "vocab")
        if self.config.vision_vocab_size:
            v_BxSxD = lookup(self.vision_embed, jnp.where(vision_mask_BxS, tokens_BxS, 0), "vision_vocab")
            x_BxSxD = jnp.where(vision_mask_BxS[..., None], v_BxSxD, x_BxSxD)
        return nn.with_logical_constraint(x_BxSxD, ("batch", "length", "act_embed"))

    def __call__(self, tokens, vision_mask, segment_ids, positions, cache=None):
        """Hidden states ``[B, S, D]``; with ``cache``, ``(hidden, new cache)``.

        ``cache`` (inference, ``trainer.inference.sampler``) is a pytree whose leaves have a
        leading ``layers`` axis; each layer hands its slice to the attention function,
        called as ``attention_fn(q, k, v, segment_ids, positions, cache) -> (out,
        cache)``. The model never looks inside it.
        """
        x_BxSxD = self.embed(tokens, vision_mask)
        x_BxSxD, cache = self.layers(x_BxSxD, segment_ids, positions, cache)
        hidden_BxSxD = self.final_norm(x_BxSxD)
        return hidden_BxSxD if cache is None else (hidden_BxSxD, cache)

    def head_kernels(self) -> tuple[jax.Array, jax.Array | None]:
        """``(text_head [D, V], vision_head [D, W] or None)`` in the compute dtype."""
        dtype = jnp.dtype(self.config.dtype)
        vision = self.vision_head.astype(dtype) if self.config.vision_vocab_size else None
        return self.text_head.astype(dtype), vision

    def text_logits(self, tokens, vision_mask, segment_ids, positions) -> jax.Array:
        """Full text-head logits ``[B, S, V]`` in float32 (inference on short inputs)."""
        hidden_BxSxD = self(tokens, vision_mask, segment_ids, positions)
        text_head, _ = self.head_kernels()
        return jnp.einsum("bsd,dv->bsv", hidden_BxSxD, text_head, preferred_element_type=jnp.float32)


def _dummy_inputs() -> tuple[jax.Array, ...]:
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.zeros((1, 1), bool), ids + 1, ids


def abstract_params(config: ModelConfig) -> Any:
    """Parameter shapes and dtypes, boxed with their logical axis names (no allocation)."""
    model = LWM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs()))["params"]


def param_shapes(config: ModelConfig) -> Any:
    """Parameter shapes and dtypes as plain ``jax.ShapeDtypeStruct`` leaves."""
    model = LWM(config)
    return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *_dummy_inputs())["params"]))


def init_params(config: ModelConfig, rng: jax.Array, shardings: Any = None) -> Any:
    """Fresh parameters (unboxed), placed by ``shardings`` (a matching pytree) if given.

    With ``shardings`` from ``trainer.sharding.param_shardings`` each device only
    ever allocates its own shard.
    """
    model = LWM(config)

    def init(key):
        return nn.meta.unbox(model.init(key, *_dummy_inputs())["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


def example_batch(config: ModelConfig, batch_size: int, seq_len: int, seed: int = 0,
                  max_segments: int = 4, vision_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """A natural-order batch in the packed-example format with random tokens.

    Each row holds up to ``max_segments`` packed segments (positions restart at 0,
    loss weight 0 on each segment's first token), some trailing padding, and vision
    tokens on about ``vision_fraction`` of positions when the model has a vision
    vocabulary. For tests, benchmarks and compile-time checks.
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    cuts = np.sort(rng.integers(1, seq_len, (batch_size, max_segments - 1)), axis=1)
    segment_ids = 1 + np.sum(np.arange(seq_len)[None, :, None] >= cuts[:, None, :], axis=-1)
    segment_ids[:, seq_len - seq_len // 8:] = 0  # trailing padding
    starts = np.concatenate([np.ones((batch_size, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    index = np.broadcast_to(np.arange(seq_len), shape)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    vision_mask = (rng.random(shape) < vision_fraction) & (config.vision_vocab_size > 0) & (segment_ids > 0)
    tokens = np.where(vision_mask, rng.integers(0, max(config.vision_vocab_size, 1), shape),
                      rng.integers(0, config.vocab_size, shape))
    return {
        "tokens": tokens.astype(np.int32),
        "vision_mask": vision_mask,
        "segment_ids": segment_ids.astype(np.int32),
        "positions": np.where(segment_ids > 0, positions, 0).astype(np.int32),
        "loss_weights": ((segment_ids > 0) & ~starts).astype(np.float32),
    }
