"""``lwm data video-text``: video-caption pairs → LWM vision-language packed datasets.

The job is :mod:`pipelines.vision_text`; this module holds what is particular to
videos: decoding with ffmpeg (``pipelines.media``: frames sampled at a rate or a
maximum count, scaled and cropped to 256×256 in the filter graph, with a duration cap
and timeouts). A video too long for a bucket can be resampled to fewer frames there
(``VisionConfig.resample_to_fit``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import media, vision_text


@dataclasses.dataclass(frozen=True)
class VideoMedia:
    """Video decoding options (``pipelines.media.VideoConfig``: fps, max_frames, max_duration_s, timeout_s)."""

    video: media.VideoConfig = media.VideoConfig()
    name: ClassVar[str] = "video"
    takes_paths: ClassVar[bool] = True

    def decode(self, source: bytes | str) -> np.ndarray:
        return media.decode_video(source, self.video)

    def config(self) -> dict:
        return dataclasses.asdict(self.video)


def run(config: vision_text.VisionConfig, options: PipelineOptions):
    """Run a video-text job (``config.media`` a :class:`VideoMedia`)."""
    if not isinstance(config.media, VideoMedia):
        raise ValueError(f"a video-text job needs VideoMedia, got {type(config.media).__name__}")
    return vision_text.run(config, options)
