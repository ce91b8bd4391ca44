"""diffusers ``VQModel`` checkpoints (aMUSEd's ``vqvae/``) → ``pipelines.tokens.vqgan`` weights.

A diffusers checkpoint directory holds ``config.json`` and
``diffusion_pytorch_model[.fp16].safetensors``. Conversion checks that the config is
the architecture ``pipelines.tokens.vqgan`` implements (DownEncoderBlock2D/UpDecoderBlock2D
blocks, SiLU, group norm, no mid-block attention), renames every tensor
(``encoder.down_blocks.0.resnets.1.conv1.weight`` → ``encoder/down_blocks_0/resnets_1/conv1/kernel``),
transposes conv kernels OIHW → HWIO, and fails on any missing, extra or misshapen tensor.
Reads safetensors with numpy only (no torch), writes safetensors + JSON (never pickle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from pipelines.tokens.vqgan import VQGAN, VQGANConfig, param_shapes

# diffusers config values this implementation reproduces exactly; anything else is refused.
_REQUIRED = {
    "act_fn": "silu",
    "norm_type": "group",
    "mid_block_add_attention": False,
}
# Our leaf names → diffusers' (conv/norm weights, biases, the quantizer's nn.Embedding).
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "embedding.weight"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def config_from_diffusers(cfg: Mapping) -> VQGANConfig:
    """Our ``VQGANConfig`` from a diffusers ``VQModel`` config dict; ValueError if unsupported."""
    if cfg.get("_class_name", "VQModel") != "VQModel":
        raise ValueError(f"expected a VQModel config, got _class_name={cfg.get('_class_name')!r}")
    for key, want in _REQUIRED.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"unsupported VQModel config: {key}={cfg.get(key)!r} (supported: {want!r})")
    channels = tuple(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key, []))
        if types != [block] * len(channels):
            raise ValueError(f"unsupported VQModel config: {key}={types} (supported: {len(channels)} x {block})")
    latent = int(cfg["latent_channels"])
    return VQGANConfig(
        block_out_channels=channels,
        layers_per_block=int(cfg["layers_per_block"]),
        latent_channels=latent,
        num_vq_embeddings=int(cfg["num_vq_embeddings"]),
        vq_embed_dim=int(cfg.get("vq_embed_dim") or latent),
        norm_num_groups=int(cfg["norm_num_groups"]),
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
    )


def diffusers_key(name: str) -> str:
    """Our flat param name → the diffusers state-dict key it comes from."""
    *path, leaf = name.split("/")
    torch_path = ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)
    return f"{torch_path}.{_LEAF[leaf]}"


def params_from_diffusers(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Nested Flax params from a diffusers ``VQModel`` state dict (numpy arrays)."""
    shapes = param_shapes(config)
    by_key = {diffusers_key(name): name for name in shapes}
    missing = sorted(set(by_key) - set(state))
    unexpected = sorted(set(state) - set(by_key))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    flat = {}
    for key, name in by_key.items():
        value = np.asarray(state[key], dtype=np.float32)
        if name.endswith("/kernel"):
            value = value.transpose(2, 3, 1, 0)  # OIHW → HWIO
        if value.shape != shapes[name]:
            raise ValueError(f"{key}: shape {value.shape} after conversion, expected {shapes[name]}")
        flat[name] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat, sep="/")


def load_diffusers_dir(diffusers_dir: str) -> tuple[VQGANConfig, dict]:
    """Config and params from a diffusers ``VQModel`` directory (or a pipeline root with ``vqvae/``)."""
    from safetensors.numpy import load_file

    if not os.path.exists(os.path.join(diffusers_dir, "config.json")) and os.path.isdir(
            os.path.join(diffusers_dir, "vqvae")):
        diffusers_dir = os.path.join(diffusers_dir, "vqvae")
    with open(os.path.join(diffusers_dir, "config.json")) as f:
        config = config_from_diffusers(json.load(f))
    for name in _WEIGHT_FILES:
        path = os.path.join(diffusers_dir, name)
        if os.path.exists(path):
            return config, params_from_diffusers(load_file(path), config)
    raise ValueError(f"{diffusers_dir}: none of {_WEIGHT_FILES} found (only safetensors checkpoints are read)")


def convert_diffusers_dir(diffusers_dir: str, out: str, input_range=(0.0, 1.0)) -> VQGAN:
    """Convert a diffusers VQModel checkpoint and save it to ``out``; returns the loaded model.

    ``input_range`` is recorded with the weights: (0, 1) for aMUSEd/diffusers weights.
    """
    config, params = load_diffusers_dir(diffusers_dir)
    vq = VQGAN(config, params, input_range)
    vq.save(out)
    return vq
