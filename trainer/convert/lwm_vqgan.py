"""LWM's VQGAN weights (a pickle of Flax parameters) ↔ ``pipelines.tokens.vqgan``.

LWM's VQGAN (``lwm/vqgan.py``) is the same computation as ours (aMUSEd's VQ model:
res blocks of group norm 32 / SiLU / conv, pad-then-stride-2 downsampling, nearest
upsampling, no attention, L2-nearest codebook), with Flax's automatic module names
and frames in [-1, 1]. The mapping is a rename, component by component:

| ours | LWM |
|---|---|
| ``conv_in`` / ``conv_out`` / ``conv_norm_out`` (encoder, decoder) | ``Conv_0`` / ``Conv_1`` / ``GroupNorm_0`` |
| ``down_blocks_i`` / ``up_blocks_i`` / ``mid_block`` | ``DownsamplingBlock_i`` / ``UpsamplingBlock_i`` / ``MidBlock_0`` |
| ``resnets_j`` (``norm1``, ``conv1``, ``norm2``, ``conv2``, ``conv_shortcut``) | ``ResnetBlock_j`` (``GroupNorm_0``, ``Conv_0``, ``GroupNorm_1``, ``Conv_1``, ``Conv_2``) |
| ``downsamplers_0/conv`` / ``upsamplers_0/conv`` | ``Downsample_0/Conv_0`` / ``Upsample_0/Conv_0`` |
| ``quantize/embedding`` | ``quantize/embeddings`` |

(LWM's decoder creates its upsampling blocks deepest first, so ``UpsamplingBlock_0``
is the widest, as our ``up_blocks_0``.) Channel widths, blocks per level, latent and
codebook sizes are read from the weights' shapes; group norm has Flax's default 32
groups. The pickle is read with :mod:`trainer.convert.restricted_pickle`, never ``pickle.load``.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
from flax import traverse_util

from pipelines.tokens.vqgan import VQGAN, VQGANConfig, param_shapes
from schemas import storage
from trainer.convert import restricted_pickle

INPUT_RANGE = (-1.0, 1.0)  # LWM feeds frames scaled to [-1, 1] and clips decoded frames to it
GROUPS = 32  # flax.linen.GroupNorm's default, which LWM's modules use
_RENAME = {"conv_in": "Conv_0", "conv_out": "Conv_1", "conv_norm_out": "GroupNorm_0", "mid_block": "MidBlock_0",
           "norm1": "GroupNorm_0", "conv1": "Conv_0", "norm2": "GroupNorm_1", "conv2": "Conv_1",
           "conv_shortcut": "Conv_2", "downsamplers_0": "Downsample_0", "upsamplers_0": "Upsample_0",
           "conv": "Conv_0", "embedding": "embeddings"}
_INDEXED = {"down_blocks": "DownsamplingBlock", "up_blocks": "UpsamplingBlock", "resnets": "ResnetBlock"}


def lwm_name(name: str) -> str:
    """Our flat parameter name → LWM's (``encoder/down_blocks_0/resnets_1/conv1/kernel`` →
    ``encoder/DownsamplingBlock_0/ResnetBlock_1/Conv_0/kernel``)."""
    parts = []
    for part in name.split("/"):
        indexed = re.fullmatch(r"(down_blocks|up_blocks|resnets)_(\d+)", part)
        parts.append(f"{_INDEXED[indexed.group(1)]}_{indexed.group(2)}" if indexed else _RENAME.get(part, part))
    return "/".join(parts)


def _shape(flat: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in flat:
        raise ValueError(f"{where}: missing key {key!r}")
    return tuple(np.shape(flat[key]))


def config_from_weights(flat: dict[str, np.ndarray], where: str = "vqgan") -> VQGANConfig:
    """The architecture of LWM VQGAN weights (flat LWM names), from their shapes."""
    levels = sorted({int(m.group(1)) for k in flat if (m := re.match(r"encoder/DownsamplingBlock_(\d+)/", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{where}: expected encoder/DownsamplingBlock_0.. in the weights, found levels {levels}")
    blocks = {int(m.group(1)) for k in flat if (m := re.match(r"encoder/DownsamplingBlock_0/ResnetBlock_(\d+)/", k))}
    chans = tuple(_shape(flat, f"encoder/DownsamplingBlock_{i}/ResnetBlock_0/Conv_0/kernel", where)[-1] for i in levels)
    books = _shape(flat, "quantize/embeddings", where)
    try:
        return VQGANConfig(block_out_channels=chans, layers_per_block=len(blocks),
                           latent_channels=_shape(flat, "encoder/Conv_1/kernel", where)[-1],
                           num_vq_embeddings=books[0], vq_embed_dim=books[-1], norm_num_groups=GROUPS,
                           in_channels=_shape(flat, "encoder/Conv_0/kernel", where)[2],
                           out_channels=_shape(flat, "decoder/Conv_1/kernel", where)[-1])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def params_from_lwm(tree, where: str = "vqgan") -> tuple[VQGANConfig, dict]:
    """Our config and nested params from LWM's parameter tree (``{"params": ...}`` accepted)."""
    if not isinstance(tree, dict):
        raise ValueError(f"{where}: expected a dict of parameters, got {type(tree).__name__}")
    tree = tree.get("params", tree)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    bad = sorted(k for k, v in flat.items() if not isinstance(v, np.ndarray))
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is a {type(flat[bad[0]]).__name__}, not an array")
    config = config_from_weights(flat, where)
    by_lwm = {lwm_name(name): (name, shape) for name, shape in param_shapes(config).items()}
    missing, unexpected = sorted(set(by_lwm) - set(flat)), sorted(set(flat) - set(by_lwm))
    if missing or unexpected:
        problem = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{where}: {problem} ({len(missing)} missing, {len(unexpected)} unexpected)")
    ours = {}
    for key, (name, shape) in by_lwm.items():
        if flat[key].shape != shape:
            raise ValueError(f"{where}: {key!r} has shape {flat[key].shape}, expected {shape}")
        ours[name] = np.asarray(flat[key], np.float32)
    return config, traverse_util.unflatten_dict(ours, sep="/")


def load_lwm_vqgan(path: str, **kwargs) -> VQGAN:
    """Our VQGAN (frames in [-1, 1], as LWM's) from LWM's pickled weights, read without running code."""
    config, params = params_from_lwm(restricted_pickle.load(path), path)
    return VQGAN(config, params, INPUT_RANGE, **kwargs)


def save_lwm_vqgan(vq: VQGAN, path: str) -> None:
    """Writes ``vq``'s weights as LWM's pickle (nested dicts of numpy arrays, LWM's names)."""
    flat = traverse_util.flatten_dict(vq.params, sep="/")
    tree = traverse_util.unflatten_dict({lwm_name(k): np.asarray(v, np.float32) for k, v in flat.items()}, sep="/")
    storage.write_atomically(path, pickle.dumps(tree, protocol=4))
