"""Weighted next-token cross-entropy with per-modality normalisation.

The targets contract (why targets are precomputed)
---------------------------------------------------
A packed record's ``loss_weights[t]`` is the weight of predicting ``tokens[t]`` from
the tokens before it in its segment (``schemas.packed``). The model, however, sees
the sequence in the ring layout (a permutation of the sequence axis, e.g. zigzag),
where the token before ``t`` is not at index ``t - 1``. So targets are computed in
NATURAL order, before the layout is applied:

1. the loader calls ``trainer.ring_layout.next_token_targets(batch)`` on the natural-order batch,
   which adds, for every position ``t``: ``targets[t]`` (the token that follows ``t``
   in its segment), ``target_vision_mask[t]`` (its vocabulary) and
   ``target_weights[t]`` (its loss weight; 0 where ``t`` is the last token of its
   segment, on padding, and where the record says 0);
2. the loader then permutes every ``[B, S]`` array of the batch with the same
   layout permutation;
3. the model produces the hidden state at each position, and ``loss_and_metrics``
   scores position ``t`` against ``targets[t]``, whatever the token order.

A position whose target is a vision token (``target_vision_mask``) is scored by the
vision head over the vision vocabulary, any other by the text head. A model without
a vision vocabulary scores no vision targets (their weight counts in no mean).

Normalisation (``LossConfig.normalization``):
- ``"modality_mean"`` (default): ``sum_m a_m * mean_m / sum_m a_m`` over the
  modalities m present in the batch (weight sum > 0), where ``mean_m`` is the
  weighted mean loss of modality m and ``a_m`` its share (``text_share``,
  ``vision_share``). With the default shares ``(0.5, 0.5)`` and both modalities
  present this is the paper's ``0.5 * (mean text loss + mean vision loss)``; an
  absent modality contributes nothing, so a text-only batch has exactly its mean
  text loss;
- ``"token_mean"``: the weighted mean over all scored tokens.

Three settings weigh the loss; each has its own name and owner:

| setting | where | what it scales |
|---|---|---|
| record loss weights | data jobs (``--text-weight``, ``--vision-weight``), baked into ``loss_weights`` | each token inside its modality's weighted mean |
| modality shares | ``loss.text_share``, ``loss.vision_share`` | each modality's mean in the batch loss |
| mixture proportions | ``data.datasets[].proportion`` | how often each dataset's records are drawn |

They combine as: proportions choose which records fill a batch; within a batch,
each modality's loss is the mean of its tokens' losses weighted by the records'
loss weights; the shares then weigh those means. Under ``modality_mean`` a
per-token weight that is the same for every token of a modality cancels (it scales
numerator and denominator of that modality's mean alike), so ``--text-weight 2``
on every dataset changes nothing; it matters only where it differs between
datasets or examples mixed into one batch (or under ``token_mean``).

Shape legend: B batch, S sequence, C chunk, D d_model, V text vocab, W vision vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer.model import LWM, sequence_chunked_map

NORMALIZATIONS = ("modality_mean", "token_mean")
TARGET_KEYS = ("targets", "target_vision_mask", "target_weights")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How token losses become the scalar loss; ``chunk_size`` tokens per logits block."""

    RENAMED = {"text_weight": "text_share", "vision_weight": "vision_share"}

    normalization: str = "modality_mean"
    text_share: float = 0.5
    vision_share: float = 0.5
    chunk_size: int = 2048

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"loss.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.text_share < 0 or self.vision_share < 0 or self.text_share + self.vision_share <= 0:
            raise ValueError("loss.text_share and loss.vision_share must be >= 0 and not both 0")
        if self.chunk_size <= 0:
            raise ValueError(f"loss.chunk_size must be positive, got {self.chunk_size}")


def _head_scores(hidden_BxCxD, head_DxV, targets_BxC):
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, head_DxV, preferred_element_type=jnp.float32)
    logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ("batch", "length", "act_vocab"))
    ids = jnp.clip(targets_BxC, 0, head_DxV.shape[1] - 1)
    target_logit = jnp.take_along_axis(logits_BxCxV, ids[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_logit
    return ce, jnp.argmax(logits_BxCxV, axis=-1) == ids


def token_losses(hidden_BxSxD, text_head_DxV, vision_head_DxW, targets_BxS, target_vision_mask_BxS,
                 chunk_size: int, target_weights_BxS=None):
    """Per-position cross-entropy ``[B, S]`` (float32) and correctness ``[B, S]`` (bool).

    Logits are made ``chunk_size`` tokens at a time and rematerialised in the
    backward pass, so memory stays linear in S. ``vision_head_DxW`` may be None.
    A chunk with no vision target skips the vision head (``lax.cond``): in text
    batches of a model with a vision head, that head's logits (8448 wide, beside
    a 32K text head; 16x the text head's in the tiny preset) would be wasted work.
    Given ``target_weights_BxS``, vision targets of weight 0 do not count (their
    values are then the text head's, and weigh nothing): a video question with loss
    on its answer only never computes the vision head.
    """
    if target_weights_BxS is None:
        target_weights_BxS = jnp.ones(targets_BxS.shape, jnp.float32)

    def chunk(h_BxCxD, targets_BxC, vision_BxC, weights_BxC):
        ce, correct = _head_scores(h_BxCxD, text_head_DxV, targets_BxC)
        if vision_head_DxW is None:
            return ce, correct

        def with_vision():
            vce, vcorrect = _head_scores(h_BxCxD, vision_head_DxW, targets_BxC)
            return jnp.where(vision_BxC, vce, ce), jnp.where(vision_BxC, vcorrect, correct)

        return jax.lax.cond(jnp.any(vision_BxC & (weights_BxC > 0)), with_vision, lambda: (ce, correct))

    return sequence_chunked_map(chunk, (hidden_BxSxD, targets_BxS, target_vision_mask_BxS, target_weights_BxS),
                                chunk_size)


def _safe_div(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def reduce_losses(ce_BxS, correct_BxS, target_vision_mask_BxS, target_weights_BxS, config: LossConfig,
                  has_vision: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar loss and metrics (per modality: loss, accuracy, weight sum, token count)."""
    weights = target_weights_BxS.astype(jnp.float32)
    masks = {"text": ~target_vision_mask_BxS}
    if has_vision:
        masks["vision"] = target_vision_mask_BxS
    alphas = {"text": config.text_share, "vision": config.vision_share}
    metrics, num, den = {}, 0.0, 0.0
    for name, mask in masks.items():
        w = jnp.where(mask, weights, 0.0)
        total = jnp.sum(w)
        mean = _safe_div(jnp.sum(w * ce_BxS), total)
        metrics[f"{name}_loss"] = mean
        metrics[f"{name}_accuracy"] = _safe_div(jnp.sum(w * correct_BxS), total)
        metrics[f"{name}_weight"] = total
        metrics[f"{name}_tokens"] = jnp.sum(w > 0)
        present = (total > 0).astype(jnp.float32)
        num = num + alphas[name] * present * mean
        den = den + alphas[name] * present
    if config.normalization == "modality_mean":
        loss = _safe_div(num, den)
    else:
        w = sum(jnp.where(mask, weights, 0.0) for mask in masks.values())
        loss = _safe_div(jnp.sum(w * ce_BxS), jnp.sum(w))
    metrics["loss"] = loss
    return loss, metrics


def loss_and_metrics(model: LWM, params: Any, batch: Mapping[str, jax.Array],
                     config: LossConfig = LossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of ``model`` on a batch carrying the targets (``TARGET_KEYS``).

    ``batch`` holds ``tokens``, ``vision_mask``, ``segment_ids``, ``positions`` and the
    outputs of ``trainer.ring_layout.next_token_targets``, all ``[B, S]`` in the same (any) token order.
    """

    def forward(module: LWM):
        hidden = module(batch["tokens"], batch["vision_mask"], batch["segment_ids"], batch["positions"])
        return hidden, module.head_kernels()

    hidden_BxSxD, (text_head, vision_head) = model.apply({"params": params}, method=forward)
    ce, correct = token_losses(hidden_BxSxD, text_head, vision_head, batch["targets"],
                               batch["target_vision_mask"], config.chunk_size, batch["target_weights"])
    return reduce_losses(ce, correct, batch["target_vision_mask"], batch["target_weights"], config,
                         has_vision=vision_head is not None)
