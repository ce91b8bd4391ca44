"""``lwm data video-text``: video-caption pairs → LWM vision-language packed datasets.

The job is :mod:`pipelines.vision.vision_text`; this module holds what is particular to
videos: decoding with ffmpeg (``pipelines.tokens.media``: frames sampled at a rate or a
maximum count, scaled and cropped to 256×256 in the filter graph, with a duration cap
and timeouts). A video too long for a bucket can be resampled to fewer frames there
(``VisionConfig.resample_to_fit``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from pipelines.tokens import media
from pipelines.vision import vision_text
from pipelines.kit.job import Job


@dataclasses.dataclass(frozen=True)
class VideoMedia:
    """Video decoding options (``pipelines.tokens.media.VideoConfig``: fps, max_frames, max_duration_s, timeout_s)."""

    video: media.VideoConfig = media.VideoConfig()
    name: ClassVar[str] = "video"
    takes_paths: ClassVar[bool] = True

    def decode(self, source: bytes | str) -> np.ndarray:
        return media.decode_video(source, self.video)

    def config(self) -> dict:
        return dataclasses.asdict(self.video)


@dataclasses.dataclass(frozen=True)
class VideoTextConfig(vision_text.VisionConfig):
    """A video-text job's config: :class:`~pipelines.vision.vision_text.VisionConfig` with video media."""

    media: VideoMedia = VideoMedia()


# VideoConfig (pipelines.tokens.media) is the decoder's own config: its flags keep the job's established names,
# and the frame size stays the VQGAN's; native-rate counting is the vision chat's (the job samples at --fps).
# Every job with VideoMedia names its flags so.
VIDEO_RENAMES = {"media.video.max_duration_s": "max-duration", "media.video.timeout_s": "ffmpeg-timeout",
                 "media.video.size": None, "media.video.native": None}
JOB = Job("video-text", VideoTextConfig, vision_text.build, vision_text.check, help=(
    "video-caption pairs → VQGAN codes in LWM's layout → packed ArrayRecord shards per length bucket"),
    renames=VIDEO_RENAMES,
    examples=(
        "lwm data video-text --input 'webvid/*.jsonl' --vqgan vqgan/ --tokenizer tokenizer.model --output out/videos "
        "--seq-len 8192 --fps 4 --resample-to-fit",
        "lwm data video-text --input 'webvid/*.jsonl' --vqgan vqgan/ --tokenizer tokenizer.model --output out/videos "
        "--seq-len 8192 --fps none --max-frames 16   # frames spread over each whole video",
    ))
run = JOB.run
