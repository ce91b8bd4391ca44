"""Inference: the sampler that generation, chat, serving and evaluation share, and dense text-head logits."""
