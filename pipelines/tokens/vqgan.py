"""The aMUSEd VQ model (LWM's vision tokenizer) in Flax: 256×256 RGB frames ↔ 16×16 codes.

LWM turns each frame into 256 codes from an 8192-entry codebook with the VQ model that
aMUSEd released (diffusers ``VQModel``: conv encoder/decoder, channels 128·(1,2,2,4,6),
2 res blocks per level, no attention, latent 64, group norm 32, SiLU). This module is a
parity-tested re-implementation of exactly that computation:

    encode: frames → encoder → quant_conv → nearest codebook entry (L2)  → codes
    decode: codes  → codebook lookup → post_quant_conv → decoder         → frames

Parameter names mirror the diffusers state dict (``down_blocks.0.resnets.1.conv1`` is
``down_blocks_0/resnets_1/conv1`` here), so conversion (``trainer.convert.vqgan_diffusers``)
is a key rename plus a kernel transpose.

Input range: aMUSEd/diffusers weights take RGB in [0, 1] (their pipelines use
``do_normalize=False``); the LWM release feeds [-1, 1]. The range is recorded with the
weights (``config.json`` beside ``params.safetensors``) and ``VQGAN.preprocess`` maps
uint8 pixels onto it, so callers never guess.

Shape legend: N frames, H×W pixels, h×w = H/16 × W/16 latent grid, C channels,
D codebook dimension, K codebook size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from schemas import storage, vocab

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_NAME = "lwm-vqgan"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Architecture of the VQ model. Defaults are aMUSEd's ``vqvae/config.json``
    (amused/amused-256; diffusers ``VQModel`` with ``DownEncoderBlock2D``/
    ``UpDecoderBlock2D`` blocks, ``mid_block_add_attention=False``,
    ``norm_type="group"``, ``lookup_from_codebook=True``)."""

    block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
    layers_per_block: int = 2
    latent_channels: int = 64
    num_vq_embeddings: int = vocab.VISION_CODEBOOK_SIZE
    vq_embed_dim: int = 64
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for field in ("layers_per_block", "latent_channels", "num_vq_embeddings", "vq_embed_dim",
                      "norm_num_groups", "in_channels", "out_channels"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for five levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "block_out_channels": list(self.block_out_channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields: {sorted(unknown)}")
        return cls(**d)


# aMUSEd's VQ model (what LWM uses).
AMUSED = VQGANConfig()
# aMUSEd's structure (levels, blocks per level, codebook size, so codes fit the vision
# vocabulary) with narrow channels, ~1/40 of the compute: tests and the CPU demo.
SMALL = VQGANConfig(block_out_channels=(16, 32, 32, 64, 64), layers_per_block=2,
                    latent_channels=16, vq_embed_dim=16, norm_num_groups=8)
PRESETS = {"amused": AMUSED, "small": SMALL}

# Matmul/conv precision names accepted by VQGAN (GPUs/TPUs default to reduced precision
# for float32; "highest" keeps codes equal to the float32 reference).
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def _conv(features: int, kernel: int, precision, name: str, stride: int = 1) -> nn.Conv:
    """Conv2d as PyTorch's ``padding=kernel // 2`` (stride 1); strided convs pad explicitly."""
    pad = kernel // 2 if stride == 1 else 0
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), precision=precision, name=name)


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch.nn.GroupNorm computes it; eps as diffusers' VAE blocks.
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: norm-SiLU-conv twice plus a skip."""

    out_channels: int
    groups: int
    precision: Any = None

    @nn.compact
    def __call__(self, x_NxHxWxC):
        h = nn.silu(_group_norm(self.groups, "norm1")(x_NxHxWxC))
        h = _conv(self.out_channels, 3, self.precision, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, "norm2")(h))
        h = _conv(self.out_channels, 3, self.precision, "conv2")(h)
        skip = x_NxHxWxC
        if skip.shape[-1] != self.out_channels:
            skip = _conv(self.out_channels, 1, self.precision, "conv_shortcut")(skip)
        return skip + h


class Downsample(nn.Module):
    """diffusers ``Downsample2D(padding=0)``: pad one row/column at the bottom/right, 3×3 stride-2 conv."""

    channels: int
    precision: Any = None

    @nn.compact
    def __call__(self, x_NxHxWxC):
        x = jnp.pad(x_NxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.precision, "conv", stride=2)(x)


class Upsample(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest-neighbour ×2, then a 3×3 conv."""

    channels: int
    precision: Any = None

    @nn.compact
    def __call__(self, x_NxHxWxC):
        x = jnp.repeat(jnp.repeat(x_NxHxWxC, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.precision, "conv")(x)


class EncoderBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: res blocks, then a downsample unless last."""

    out_channels: int
    num_layers: int
    groups: int
    downsample: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.precision, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample(self.out_channels, self.precision, name="downsamplers_0")(x)
        return x


class DecoderBlock(nn.Module):
    """diffusers ``UpDecoderBlock2D``: res blocks, then an upsample unless last."""

    out_channels: int
    num_layers: int
    groups: int
    upsample: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.precision, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample(self.out_channels, self.precision, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D(add_attention=False)``: two res blocks."""

    channels: int
    groups: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(2):
            x = ResnetBlock(self.channels, self.groups, self.precision, name=f"resnets_{j}")(x)
        return x


class Encoder(nn.Module):
    config: VQGANConfig
    precision: Any = None

    @nn.compact
    def __call__(self, x_NxHxWx3):
        cfg, p = self.config, self.precision
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, p, "conv_in")(x_NxHxWx3)
        for i, ch in enumerate(chans):
            x = EncoderBlock(ch, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1, p,
                             name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, p, name="mid_block")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
        return _conv(cfg.latent_channels, 3, p, "conv_out")(x)


class Decoder(nn.Module):
    config: VQGANConfig
    precision: Any = None

    @nn.compact
    def __call__(self, z_Nxhxwxc):
        cfg, p = self.config, self.precision
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, p, "conv_in")(z_Nxhxwxc)
        x = MidBlock(chans[0], cfg.norm_num_groups, p, name="mid_block")(x)
        for i, ch in enumerate(chans):
            # diffusers' decoder blocks hold one more res block than the encoder's.
            x = DecoderBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(chans) - 1, p,
                             name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, p, "conv_out")(x)


class Codebook(nn.Module):
    """The quantizer's ``embedding`` table [K, D]."""

    num: int
    dim: int

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(1.0), (self.num, self.dim))

    def nearest(self, z_MxD):
        """Index of the L2-nearest entry; |z|² is the same for every entry so it is dropped."""
        e_KxD = self.embedding
        dots_MxK = jnp.matmul(z_MxD, e_KxD.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.argmin(jnp.sum(e_KxD * e_KxD, axis=-1) - 2.0 * dots_MxK, axis=-1).astype(jnp.int32)

    def lookup(self, codes):
        return jnp.take(self.embedding, codes, axis=0)


class VQModel(nn.Module):
    """Encoder, quantizer and decoder with diffusers' parameter names."""

    config: VQGANConfig
    precision: Any = None

    def setup(self):
        cfg, p = self.config, self.precision
        self.encoder = Encoder(cfg, p)
        self.quant_conv = _conv(cfg.vq_embed_dim, 1, p, "quant_conv")
        self.quantize = Codebook(cfg.num_vq_embeddings, cfg.vq_embed_dim)
        self.post_quant_conv = _conv(cfg.latent_channels, 1, p, "post_quant_conv")
        self.decoder = Decoder(cfg, p)

    def encode(self, x_NxHxWx3):
        z_Nxhxwxd = self.quant_conv(self.encoder(x_NxHxWx3))
        n, h, w, d = z_Nxhxwxd.shape
        return self.quantize.nearest(z_Nxhxwxd.reshape(n * h * w, d)).reshape(n, h, w)

    def decode(self, codes_Nxhxw):
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes_Nxhxw)))

    def __call__(self, x_NxHxWx3):
        return self.decode(self.encode(x_NxHxWx3))


def _check_range(input_range) -> tuple[float, float]:
    low, high = (float(v) for v in input_range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"input_range must be finite (low, high) with low < high, got {input_range}")
    return low, high


class VQGAN:
    """The vision tokenizer: jitted, batched encode/decode on the default JAX device.

    Args:
      config: architecture.
      params: Flax params of ``VQModel`` (``{"params": ...}`` is accepted too).
      input_range: (low, high) float pixel range the weights expect.
      batch_size: frames per device call; a smaller remainder is padded to the next power
        of two (at most batch_size), so at most log2(batch_size)+2 programs are compiled.
      precision: "highest" (float32 convs everywhere; codes match the reference) or
        "default" (the backend's fast float32 mode, e.g. TF32 on GPUs).

    ``model`` is the Flax ``VQModel`` and ``params`` its weights, for callers that jit
    their own functions around it (e.g. on device-resident frames).
    """

    def __init__(self, config: VQGANConfig, params, input_range=(0.0, 1.0), batch_size: int = 8,
                 precision: str = "highest"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.config = config
        self.input_range = _check_range(input_range)
        self.batch_size = batch_size
        self.precision = precision
        params = params.get("params", params)
        self.params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
        self.model = model = VQModel(config, _PRECISIONS[precision])
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQModel.encode))
        self._decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQModel.decode))

    @classmethod
    def init_random(cls, config: VQGANConfig, seed: int, input_range=(0.0, 1.0), **kwargs) -> VQGAN:
        """Random weights (tests, the demo): codes are meaningless but deterministic per seed.

        Drawn with numpy (fast, no compilation): LeCun-normal kernels, zero biases, unit
        norm scales, and a unit-normal codebook so random frames spread over many codes.
        """
        rng = np.random.default_rng(seed)
        flat = {}
        for name, shape in sorted(param_shapes(config).items()):
            leaf = name.rsplit("/", 1)[-1]
            if leaf == "kernel":
                flat[name] = rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(np.prod(shape[:-1])))
            elif leaf == "embedding":
                flat[name] = rng.standard_normal(shape, np.float32)
            else:
                flat[name] = (np.ones if leaf == "scale" else np.zeros)(shape, np.float32)
        return cls(config, traverse_util.unflatten_dict(flat, sep="/"), input_range, **kwargs)

    @classmethod
    def load(cls, path: str, **kwargs) -> VQGAN:
        """Load a directory written by ``save`` (local, ``gs://`` or any ``schemas.storage`` path)."""
        from safetensors.numpy import load as load_safetensors

        path = os.fspath(path)
        meta = json.loads(storage.read_bytes(storage.join(path, CONFIG_FILE)))
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} directory (format={meta.get('format')!r}, "
                             f"version={meta.get('version')!r})")
        config = VQGANConfig.from_dict(meta["config"])
        flat = load_safetensors(storage.read_bytes(storage.join(path, PARAMS_FILE)))
        params = traverse_util.unflatten_dict(flat, sep="/")
        check_params(config, params)
        return cls(config, params, meta["input_range"], **kwargs)

    def save(self, path: str) -> None:
        """Write ``params.safetensors`` and then ``config.json`` (architecture, input range) to a directory.

        ``path`` may be local, ``gs://`` or any ``schemas.storage`` path; each file is
        written whole, ``config.json`` last.
        """
        from safetensors.numpy import save as save_safetensors

        path = os.fspath(path)
        flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
        storage.write_atomically(storage.join(path, PARAMS_FILE), save_safetensors(
            {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict(),
                "input_range": list(self.input_range)}
        storage.write_atomically(storage.join(path, CONFIG_FILE),
                                 json.dumps(meta, indent=2, sort_keys=True).encode())

    def preprocess(self, frames_NxHxWx3) -> np.ndarray:
        """uint8 RGB frames → float32 in ``input_range`` (0 ↦ low, 255 ↦ high)."""
        frames = np.asarray(frames_NxHxWx3)
        if frames.dtype != np.uint8:
            raise ValueError(f"preprocess expects uint8 frames, got {frames.dtype}")
        low, high = self.input_range
        return (frames.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low)).astype(np.float32)

    def encode(self, x_NxHxWx3) -> np.ndarray:
        """Float32 NHWC frames in ``input_range`` → int32 codes [N, H/16, W/16] (16×16 for 256×256)."""
        x = np.asarray(x_NxHxWx3)
        f = self.config.downsample_factor
        if (x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f
                or x.shape[1] == 0 or x.shape[2] == 0):
            raise ValueError(f"encode expects [N, H, W, {self.config.in_channels}] frames with H, W positive "
                             f"multiples of {f}, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"encode expects float frames scaled to {self.input_range} (see preprocess), got {x.dtype}")
        return self._batched(self._encode, x.astype(np.float32), np.int32)

    def decode(self, codes_Nxhxw, clip: bool = True) -> np.ndarray:
        """int32 codes [N, h, w] → float32 NHWC frames [N, 16h, 16w, 3], clipped to ``input_range``
        unless ``clip=False`` (the raw decoder output)."""
        codes = np.asarray(codes_Nxhxw)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"decode expects integer codes [N, h, w], got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.num_vq_embeddings):
            raise ValueError(f"codes must be in [0, {self.config.num_vq_embeddings}), "
                             f"got range [{codes.min()}, {codes.max()}]")
        frames = self._batched(self._decode, codes.astype(np.int32), np.float32)
        return np.clip(frames, *self.input_range) if clip else frames

    def _batched(self, fn, x, out_dtype):
        # Dispatch every batch before reading any back, so host work overlaps device work.
        outs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            padded = min(1 << (len(chunk) - 1).bit_length(), self.batch_size)
            if padded > len(chunk):
                chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outs.append((fn(self.params, chunk), len(x[start:start + self.batch_size])))
        if not outs:
            one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
            return np.zeros((0, *jax.eval_shape(fn, self.params, one).shape[1:]), out_dtype)
        return np.concatenate([np.asarray(o)[:n] for o, n in outs]).astype(out_dtype)


def param_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``{"encoder/conv_in/kernel": shape}`` of every parameter, without allocating them."""
    size = config.downsample_factor
    dummy = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(VQModel(config).init, jax.random.key(0), dummy)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def check_params(config: VQGANConfig, params) -> None:
    """Raise ValueError unless ``params`` has exactly the names and shapes ``config`` needs."""
    want = param_shapes(config)
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(f"params do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape {[(k, got[k], want[k]) for k in wrong[:5]]}")
