"""Text-head logits from a checkpoint: the entry point of evaluation and generation.

``logits(ckpt_dir, tokens)`` loads any checkpoint written by ``lwm convert hf-import``
or by training (``trainer.checkpoint``) and runs the model on one device with dense
attention, one segment per row, positions 0..S-1. Loaded models are cached per
checkpoint directory and step, and the forward pass is compiled once per shape.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainer import checkpoint
from trainer.model import LWM, ModelConfig


class Predictor:
    """A loaded checkpoint whose ``logits`` method runs the text head."""

    def __init__(self, ckpt_dir: str | os.PathLike, step: int | None = None):
        self.params, self.config = checkpoint.restore_params(ckpt_dir, step)
        model = LWM(self.config)

        def forward(params: Any, tokens, vision_mask):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            segment_ids = jnp.ones_like(tokens)
            return model.apply({"params": params}, tokens, vision_mask, segment_ids, positions,
                               method=LWM.text_logits)

        self._forward = jax.jit(forward)

    def logits(self, tokens: np.ndarray, vision_mask: np.ndarray | None = None) -> np.ndarray:
        """Float32 text-head logits ``[B, S, vocab_size]`` for int tokens ``[B, S]``."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a non-empty integer array [B, S], got {tokens.dtype} {tokens.shape}")
        vision_mask = np.zeros(tokens.shape, bool) if vision_mask is None else np.asarray(vision_mask, bool)
        if vision_mask.shape != tokens.shape:
            raise ValueError(f"vision_mask shape {vision_mask.shape} differs from tokens {tokens.shape}")
        _check_ids(tokens, vision_mask, self.config)
        out = self._forward(self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(vision_mask))
        return np.asarray(out, np.float32)


def _check_ids(tokens: np.ndarray, vision_mask: np.ndarray, config: ModelConfig) -> None:
    text, vision = tokens[~vision_mask], tokens[vision_mask]
    if text.size and (text.min() < 0 or text.max() >= config.vocab_size):
        raise ValueError(f"text token ids must lie in [0, {config.vocab_size})")
    if vision.size and (vision.min() < 0 or vision.max() >= config.vision_vocab_size):
        raise ValueError(f"vision token ids must lie in [0, {config.vision_vocab_size}) "
                         f"(this model's vision vocabulary)")


@functools.lru_cache(maxsize=2)
def _predictor(ckpt_dir: str, step: int) -> Predictor:
    return Predictor(ckpt_dir, step)


def logits(ckpt_dir: str | os.PathLike, tokens: np.ndarray, vision_mask: np.ndarray | None = None) -> np.ndarray:
    """Text-head logits ``[B, S, vocab_size]`` (float32) of the latest step in ``ckpt_dir``.

    ``tokens`` int ``[B, S]``: text ids, or vision ids where ``vision_mask`` is true.
    Each row is one sequence with positions 0..S-1.
    """
    path = os.path.abspath(os.fspath(ckpt_dir))
    return _predictor(path, checkpoint.latest_step(path)).logits(tokens, vision_mask)
