"""``lwm data image-text``: image-caption pairs → LWM vision-language packed datasets.

The job is :mod:`pipelines.vision_text` with images as one-frame videos; this module
holds what is particular to images: decoding with Pillow (``pipelines.media``: short
side resized to 256, centre crop).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import media, vision_text


@dataclasses.dataclass(frozen=True)
class ImageMedia:
    """Image decoding options; images with a short side under ``min_short_side`` are dead-lettered."""

    min_short_side: int = 0
    name: ClassVar[str] = "image"
    takes_paths: ClassVar[bool] = False

    def decode(self, source: bytes) -> np.ndarray:
        return media.decode_image(source, min_short_side=self.min_short_side)[None]

    def config(self) -> dict:
        return dataclasses.asdict(self)


def run(config: vision_text.VisionConfig, options: PipelineOptions):
    """Run an image-text job (``config.media`` an :class:`ImageMedia`)."""
    if not isinstance(config.media, ImageMedia):
        raise ValueError(f"an image-text job needs ImageMedia, got {type(config.media).__name__}")
    return vision_text.run(config, options)
