"""``lwm data image-text``: image-caption pairs → LWM vision-language packed datasets.

The job is :mod:`pipelines.vision.vision_text` with images as one-frame videos; this module
holds what is particular to images: decoding with Pillow (``pipelines.tokens.media``: short
side resized to 256, centre crop).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from schemas import flags
from pipelines.tokens import media
from pipelines.vision import vision_text
from pipelines.kit.job import Job


@dataclasses.dataclass(frozen=True)
class ImageMedia:
    """Image decoding options."""

    min_short_side: int = flags.field(0, flag="min-image-side")
    """Dead-letter images whose shorter side has fewer pixels."""
    name: ClassVar[str] = "image"
    takes_paths: ClassVar[bool] = False

    def decode(self, source: bytes) -> np.ndarray:
        return media.decode_image(source, min_short_side=self.min_short_side)[None]

    def config(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ImageTextConfig(vision_text.VisionConfig):
    """An image-text job's config: :class:`~pipelines.vision.vision_text.VisionConfig` with image media."""

    media: ImageMedia = ImageMedia()


JOB = Job("image-text", ImageTextConfig, vision_text.build, vision_text.check, help=(
    "image-caption pairs → VQGAN codes in LWM's layout → packed ArrayRecord shards per length bucket"),
    examples=(
        "lwm data image-text --input 'laion/*.parquet' --vqgan vqgan/ --tokenizer tokenizer.model --output out/images "
        "--seq-len 1024",
        "lwm data image-text --input 'laion/*.parquet' --vqgan vqgan/ --tokenizer tokenizer.model --output out/images "
        "--seq-len 1024 --template chat --generation-fraction 0.5",
    ))
run = JOB.run
