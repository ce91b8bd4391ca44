"""The optimizer: AdamW with global-norm clipping, the paper's LR schedules, optional accumulation.

docs/LWM.md, "Training recipe": AdamW (b1 0.9, b2 0.95), grad clip 1.0, weight decay
0.1; constant LR for the text and chat stages (after a short warmup), warmup-cosine
(6e-4 to 6e-5) for the 1K and 8K vision-language stages.

Mixed precision: parameters and optimizer moments stay float32 (``mu_dtype``), the
model computes in ``ModelConfig.dtype`` (bf16) and gradients arrive in the
parameters' dtype. Weight decay applies to matrices only (rank >= 2), not to norm
scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from trainer.config import OptimizerConfig


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update for a run of ``total_steps`` updates."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant" or (config.schedule == "warmup_constant" and warmup == 0):
        return optax.constant_schedule(lr)
    if config.schedule == "warmup_constant":
        return optax.warmup_constant_schedule(0.0, lr, warmup)
    if total_steps <= warmup:
        raise ValueError(f"warmup_cosine needs more steps ({total_steps}) than warmup_steps ({warmup})")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, config.end_learning_rate)


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip, AdamW, and (``grad_accum_steps > 1``) ``optax.MultiSteps`` accumulation.

    With accumulation, each ``update`` call takes one micro-batch's gradients and
    the parameters change every ``grad_accum_steps`` calls; the schedule counts
    applied updates.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    mu_dtype=jnp.float32, weight_decay=config.weight_decay, mask=_decay_mask),
    )
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
    return tx
