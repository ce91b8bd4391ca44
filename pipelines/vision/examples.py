"""Vision-language training examples: which direction each example takes, and its loss weights.

An example (caption + the VQGAN codes of its frames) is laid out by
:mod:`pipelines.tokens.vision_layout` as generation (caption → vision) or
understanding (vision → caption), chosen per example id by a stable hash so every
run makes the same choice. Each example is split into conditioning parts (the
caption in generation, the vision span in understanding, the chat prompt) and
target parts (the rest, EOS included). Loss weights: ``vision_weight`` on vision
ids, ``text_weight`` on text ids, 0 on the conditioning parts if ``condition_loss``
is off, and 0 on the first token (it has no context). The released loss (mean
vision loss and mean text loss averaged) is the trainer's business: it has
``vision_mask`` to split them.

Pure (numpy in, :class:`~pipelines.kit.packing.Segment` out); the text tokenizer
comes in as an ``encode`` function, so Beam, tests and notebooks share it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np

from pipelines.kit.naming import stable_hash
from pipelines.kit.packing import Segment
from pipelines.tokens.vision_layout import GENERATION, TEMPLATES, UNDERSTANDING, VISION, Markers, Part, lay_out, template_parts
from schemas import flags


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How examples are laid out; recorded in every manifest.

    ``generation_fraction`` of the examples (by a stable hash of ``salt`` and the id)
    are generation, the rest understanding. ``condition_loss=False`` puts no loss on the
    conditioning side (e.g. only the caption is learnt in understanding examples).
    """

    generation_fraction: float = 0.5
    """Share of examples laid out caption → vision (generation); the rest vision → caption, chosen by id."""
    text_weight: float = 1.0
    """Loss weight of text tokens baked into the records."""
    vision_weight: float = 1.0
    """Loss weight of vision tokens baked into the records."""
    condition_loss: bool = True
    """Loss on the conditioning side too (the caption in generation, the vision in understanding)."""
    template: Literal["plain", "chat"] = "plain"
    """plain: caption and <vision>…</vision> only; chat: LWM's USER/ASSISTANT format."""
    salt: str = flags.field("", flag="layout-salt")
    """Changes which examples get which direction."""

    def __post_init__(self):
        if not 0.0 <= self.generation_fraction <= 1.0:
            raise ValueError(f"generation_fraction must be in [0, 1], got {self.generation_fraction}")
        if self.text_weight < 0 or self.vision_weight < 0:
            raise ValueError(f"loss weights must be non-negative, got text {self.text_weight}, vision {self.vision_weight}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")


def direction(example_id: str, config: LayoutConfig) -> str:
    """GENERATION or UNDERSTANDING for this example: the same in every run and worker."""
    draw = stable_hash(f"{config.salt}\0{example_id}") / 2.0**64
    return GENERATION if draw < config.generation_fraction else UNDERSTANDING


def example_parts(example_id: str, caption: str, modality: str, config: LayoutConfig,
                  encode: Callable[[str], np.ndarray]) -> list[Part]:
    """The example's parts in its direction, text tokenized with ``encode`` (no BOS/EOS)."""
    kind = direction(example_id, config)
    return [
        (VISION if text is VISION else np.asarray(encode(text), np.int32), target)
        for text, target in template_parts(kind, caption, modality, config.template)
    ]


def assemble(key: tuple[str, int], parts: Sequence[Part], codes_Fx16x16: np.ndarray, markers: Markers,
             config: LayoutConfig) -> Segment:
    """The segment of one example: ``parts`` (see :func:`template_parts`, text tokenized) around its frames."""
    tokens, vision_mask, target = lay_out(parts, codes_Fx16x16, markers)
    learnt = target | config.condition_loss
    weights = np.where(vision_mask, config.vision_weight, config.text_weight).astype(np.float32) * learnt
    weights[:1] = 0.0
    return Segment(key, tokens, vision_mask, weights.astype(np.float32))
