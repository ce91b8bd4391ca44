"""Media decoding for the vision pipelines: bytes in, uint8 RGB frames [N, S, S, 3] out.

Images are decoded with Pillow, videos with ffmpeg (argument lists built with
ffmpeg-python, run as a subprocess with a timeout). Both give LWM's frame geometry:
short side resized to S (256), centre crop S×S, in display geometry (EXIF orientation,
a video's sample aspect ratio) and 8 bits per channel. Anything that cannot be decoded raises
``MediaError(reason, detail)``; pipelines turn it into a dead letter, so one bad file
never crashes or stalls a job. Reasons:

    empty_file          zero bytes
    missing_file        a media path or URL that does not exist
    unreadable_media    it cannot be read: permission denied, a directory, I/O errors, a URL
                        scheme no filesystem serves
    corrupt_image       not an image Pillow can read, or truncated image data
    image_too_large     over Pillow's decompression-bomb limit
    image_too_small     short side under ``min_short_side``
    corrupt_video       ffmpeg cannot open or decode it
    truncated_video     ffmpeg reported errors and stopped well short of the expected frames
    no_video_stream     audio-only (cover art does not count as video)
    too_long_duration   longer than ``VideoConfig.max_duration_s``
    zero_frames         opened fine but produced no frames
    ffmpeg_timeout      ffmpeg/ffprobe ran longer than ``VideoConfig.timeout_s``

Two ways of choosing frames: a sampling rate (``VideoConfig.fps``, the data jobs' 4 fps),
or LWM's own count (``VideoConfig.native``, what its vision chat and data loader do):
n = the frames the video holds at its own rate, all of them if n <= max_frames, else
those at :func:`sample_frame_indices`. Both cap at ``max_frames`` with that same rule.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings

import ffmpeg
import numpy as np
from PIL import Image, ImageOps

FRAME_SIZE = 256


class MediaError(Exception):
    """A media item that cannot be turned into frames; ``reason`` is a short stable label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _square_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


# Pillow's high-bit-depth greyscale modes and the value each one's white has. 16-bit
# samples (PNG, TIFF, PGM, JPEG 2000) arrive as I;16* or, from some readers, as I; F is
# float data, white 1.0 by convention. 16-bit RGB(A) needs nothing: Pillow keeps the
# high byte of each sample, which is the same scaling.
_HIGH_DEPTH_FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                          "I": 65535.0, "F": 1.0}


def _eight_bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image → mode L, scaled by its real range (``convert`` would clip at 255).

    The range is 0 to the mode's full scale, widened to the image's own minimum and
    maximum where its values go beyond (32-bit samples, HDR floats); NaN is black.
    """
    values = np.array(img, dtype=np.float32)  # a writable copy: scaled in place
    finite = np.isfinite(values)
    low = min(0.0, float(values.min(where=finite, initial=0.0)))
    high = max(_HIGH_DEPTH_FULL_SCALE[img.mode], float(values.max(where=finite, initial=0.0)))
    np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
    values -= low
    values *= 255.0 / (high - low)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8))


def decode_image(data: bytes, size: int = FRAME_SIZE, min_short_side: int = 0) -> np.ndarray:
    """Any Pillow-readable image → uint8 RGB [size, size, 3].

    EXIF orientation is applied; high-bit-depth greyscale (16-bit, 32-bit, float) is
    scaled to 8 bits by its real range; transparency is composited onto white;
    multi-frame images give their first frame. The short side is resized to ``size``
    (bicubic) and the centre square kept, in one resampling step.
    """
    if not data:
        raise MediaError("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # JPEG: let libjpeg decode at the smallest power-of-two scale still >= size.
            img.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(img)
            img.load()
    except Image.DecompressionBombError as e:
        raise MediaError("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:  # its message names the stream object's address: not reproducible
        raise MediaError("corrupt_image", "not a format Pillow recognises") from None
    except Exception as e:  # Pillow's format plugins raise many types on malformed input
        raise MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(img.size) < max(1, min_short_side):
        raise MediaError("image_too_small", f"{img.size[0]}x{img.size[1]} (short side < {min_short_side})")
    if img.mode in _HIGH_DEPTH_FULL_SCALE:
        img = _eight_bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return _square(img, size)


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Short side resized to ``size`` (bicubic) and the centre square kept, in one resampling step."""
    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=_square_box(*img.size))
    return np.asarray(rgb, dtype=np.uint8)


def square_frames(frames_NxHxWx3: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 RGB frames of any size (already decoded, e.g. in a notebook) given the jobs' geometry:
    [N, size, size, 3], each frame's short side resized to ``size`` and its centre square kept."""
    frames = np.asarray(frames_NxHxWx3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise MediaError("zero_frames" if frames.ndim == 4 and not len(frames) else "corrupt_image",
                         f"expected uint8 RGB frames [N >= 1, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([_square(Image.fromarray(frame), size) for frame in frames])


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """How a video becomes frames.

    fps: sampling rate (LWM: 4 fps at the 8K stage); None samples ``max_frames``
      frames uniformly over the whole video instead. Either way the video is cut into
      equal segments of 1/rate seconds and each gives the frame at its centre (ffmpeg's
      ``fps`` filter); a rate above the video's own repeats frames at a constant step.
    max_frames: cap on frames per video; a video whose ``fps`` sampling would exceed it
      is sampled uniformly at ``max_frames`` instead (so long clips keep their span).
    max_duration_s: longer videos are refused (``too_long_duration``); also bounds
      decoding when a container does not state its duration.
    timeout_s: wall-clock limit for each ffmpeg/ffprobe call.
    size: output frame side (short side resize, centre crop).
    native: count frames at the video's own rate, as LWM does (``fps`` is not used):
      all n of them, or ``max_frames`` at :func:`sample_frame_indices`; only those are
      decoded (ffmpeg's ``select``), so an hour of video costs the frames kept.
    """

    fps: float | None = 4.0
    max_frames: int | None = None
    max_duration_s: float = 600.0
    timeout_s: float = 120.0
    size: int = FRAME_SIZE
    native: bool = False

    def __post_init__(self):
        if self.fps is None and self.max_frames is None and not self.native:
            raise ValueError("VideoConfig needs fps, max_frames, or both")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        for name in ("max_duration_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@dataclasses.dataclass(frozen=True)
class FFmpegTools:
    """Executables: ffmpeg always; ffprobe when available (else probing parses ``ffmpeg -i``)."""

    ffmpeg: str
    ffprobe: str | None


@functools.cache
def ffmpeg_tools() -> FFmpegTools:
    """The system ffmpeg/ffprobe on PATH, else the binary bundled with imageio-ffmpeg (no ffprobe)."""
    system = shutil.which("ffmpeg")
    if system:
        return FFmpegTools(system, shutil.which("ffprobe"))
    try:
        import imageio_ffmpeg

        return FFmpegTools(imageio_ffmpeg.get_ffmpeg_exe(), None)
    except (ImportError, RuntimeError) as e:
        raise RuntimeError("no ffmpeg: install the system package (make venv) or imageio-ffmpeg") from e


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What probing found; None where the container does not say."""

    duration_s: float | None
    frame_rate: float | None
    has_video: bool


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise MediaError("ffmpeg_timeout", f"{os.path.basename(args[0])} ran over {timeout_s}s") from None


_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")


def _tail(stderr: bytes, path: str, chars: int = 300) -> str:
    """The end of ffmpeg's messages, made stable across runs (no temp paths or pointer values)."""
    text = _ADDRESS.sub("", stderr.decode("utf-8", "replace").replace(path, "<input>"))
    return text.strip()[-chars:]


def _rate(text) -> float | None:
    """"30000/1001" or "25" → frames per second; None for "0/0" and the like."""
    num, _, den = str(text).partition("/")
    value = _float_or_none(num)
    if den:
        d = _float_or_none(den)
        value = value / d if value is not None and d else None
    return value or None


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out >= 0 else None


def _probe_ffprobe(path: str, tools: FFmpegTools, timeout_s: float) -> VideoInfo:
    proc = _run([tools.ffprobe, "-v", "error", "-show_entries",
                 "format=duration:stream=codec_type,duration,avg_frame_rate:stream_disposition=attached_pic",
                 "-of", "json", path], timeout_s)
    info = json.loads(proc.stdout or b"{}") if proc.returncode == 0 else {}
    streams, fmt = info.get("streams", []), info.get("format", {})
    if proc.returncode != 0 or not (streams or fmt):
        raise MediaError("corrupt_video", _tail(proc.stderr, path) or "ffprobe found no streams")
    video = [s for s in streams
             if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    durations = [_float_or_none(fmt.get("duration"))] + [_float_or_none(s.get("duration")) for s in video]
    known = [d for d in durations if d is not None]
    return VideoInfo(duration_s=known[0] if known else None,
                     frame_rate=_rate(video[0].get("avg_frame_rate")) if video else None, has_video=bool(video))


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: Video:(?!.*\(attached pic\))(?:.*?, ([\d.]+) fps)?",
                           re.MULTILINE)


def _probe_ffmpeg(path: str, tools: FFmpegTools, timeout_s: float) -> VideoInfo:
    # Without ffprobe: `ffmpeg -i FILE` prints the input description, then fails for want of an output.
    stderr = _run([tools.ffmpeg, "-nostdin", "-hide_banner", "-i", path], timeout_s).stderr
    text = stderr.decode("utf-8", "replace")
    if "Input #0" not in text:
        raise MediaError("corrupt_video", _tail(stderr, path) or "ffmpeg could not open the input")
    m = _DURATION.search(text)
    duration = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None
    video = _VIDEO_STREAM.search(text)
    return VideoInfo(duration_s=duration, frame_rate=_rate(video[1]) if video else None, has_video=bool(video))


def probe_video(path: str, timeout_s: float = 30.0, tools: FFmpegTools | None = None) -> VideoInfo:
    """Duration (None if the container does not say) and whether there is a real video stream."""
    tools = tools or ffmpeg_tools()
    probe = _probe_ffprobe if tools.ffprobe else _probe_ffmpeg
    return probe(path, tools, timeout_s)


def _sample_rate(info: VideoInfo, config: VideoConfig) -> float:
    """Frames per second to ask ffmpeg for: ``fps``, or max_frames spread over the duration
    (never above the video's own rate, so uniform sampling does not repeat frames)."""
    span = info.duration_s if info.duration_s else config.max_duration_s
    uniform = config.max_frames / span if config.max_frames is not None else math.inf
    uniform = min(uniform, info.frame_rate or math.inf)
    return min(config.fps, uniform) if config.fps is not None else uniform


def sample_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """Which of ``num_frames`` frames to keep, LWM's rule (its chat and its data loader alike): all of them
    when ``max_frames`` is at most 0 or not fewer, else ``numpy.linspace(0, num_frames - 1, max_frames)``
    truncated to integers."""
    if num_frames < 0:
        raise ValueError(f"need num_frames >= 0, got {num_frames}")
    if max_frames <= 0 or num_frames <= max_frames:
        return np.arange(num_frames, dtype=np.int64)
    return np.linspace(0, num_frames - 1, max_frames).astype(np.int64)


def _uniform_subsample(frames: np.ndarray, count: int | None) -> np.ndarray:
    if count is None or len(frames) <= count:
        return frames
    return frames[sample_frame_indices(len(frames), count)]


def _count_packets(path: str, tools: FFmpegTools, timeout_s: float) -> int | None:
    """Frames of the first video stream as its container indexes them (ffprobe reads packets, decodes nothing)."""
    if not tools.ffprobe:
        return None
    proc = _run([tools.ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets",
                 "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", path], timeout_s)
    text = proc.stdout.decode(errors="replace").strip().split(",")[0] if proc.returncode == 0 else ""
    return int(text) if text.isdigit() else None


def count_frames(source: str | os.PathLike, config: VideoConfig = VideoConfig(native=True),
                 tools: FFmpegTools | None = None) -> int:
    """n: the frames a video file holds at its own rate (LWM's count), without decoding any; the
    same ``MediaError`` as :func:`decode_video` for files that are missing, empty, not video or too long.
    Without ffprobe, or for a container that does not say, duration × frame rate."""
    tools = tools or ffmpeg_tools()
    path = os.fspath(source)
    info = _checked_info(path, config, tools)
    return _native_count(path, info, config, tools)


def _native_count(path: str, info: "VideoInfo", config: VideoConfig, tools: FFmpegTools) -> int:
    counted = _count_packets(path, tools, config.timeout_s)
    if counted is None and info.duration_s and info.frame_rate:
        counted = int(round(info.duration_s * info.frame_rate))
    if not counted:
        raise MediaError("zero_frames", f"duration {info.duration_s}s, no frames counted")
    return counted


# ffmpeg's words for a video stream that holds no packets (not damage).
_NO_FRAMES = re.compile(r"does not contain any stream|Cannot determine format of input stream")


def _checked_info(path: str, config: VideoConfig, tools: FFmpegTools) -> VideoInfo:
    """Probe a local file, refusing what cannot be a video (reasons in the module docstring)."""
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except FileNotFoundError:
        raise MediaError("missing_file", path) from None
    except OSError as e:  # without this, ffprobe's failure would call the file corrupt
        raise MediaError("unreadable_media", f"{path}: {e.strerror or type(e).__name__}") from None
    if empty:
        raise MediaError("empty_file", "0 bytes")
    info = probe_video(path, config.timeout_s, tools)
    if not info.has_video:
        raise MediaError("no_video_stream", f"duration {info.duration_s}s, no video stream")
    if info.duration_s is not None and info.duration_s > config.max_duration_s:
        raise MediaError("too_long_duration", f"{info.duration_s:.1f}s > {config.max_duration_s}s")
    return info


def _decode_file(path: str, config: VideoConfig, tools: FFmpegTools) -> np.ndarray:
    info = _checked_info(path, config, tools)
    s = config.size
    if config.native:
        total = _native_count(path, info, config, tools)
        keep = sample_frame_indices(total, config.max_frames or total)
        rate = info.frame_rate or 0.0
    else:
        rate = _sample_rate(info, config)

    def sampled(stream):
        if not config.native:  # eof_action=pass: clips shorter than one sampling step still give their frame.
            return stream.filter("fps", fps=f"{rate:.9g}", eof_action="pass")
        if len(keep) == total:
            return stream
        return stream.filter("select", "+".join(f"eq(n,{i})" for i in keep))

    def decode(threads: int) -> subprocess.CompletedProcess:
        output = {"fps_mode": "passthrough"} if config.native else {}
        args = (sampled(ffmpeg.input(path, t=config.max_duration_s, threads=threads))
                # Short side to s in display geometry (dar = width × SAR / height), as players show
                # non-square pixels; rounded as force_original_aspect_ratio rounds for square ones.
                .filter("scale", f"max({s},round({s}*dar))", f"max({s},round({s}/dar))")
                .filter("crop", s, s)
                .output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None, dn=None, **output)
                .global_args("-nostdin", "-hide_banner", "-v", "error")
                .compile(cmd=tools.ffmpeg))
        return _run(args, config.timeout_s)

    proc = decode(threads=0)
    if proc.stderr:
        # Damage: decode again on one thread, whose messages and concealed frames are the same on
        # every run (the multi-threaded decoder interleaves them differently each time).
        proc = decode(threads=1)
    n = len(proc.stdout) // (s * s * 3)
    frames = np.frombuffer(proc.stdout, np.uint8, count=n * s * s * 3).reshape(n, s, s, 3)
    errors = _tail(proc.stderr, path)
    if n == 0 and (not errors or _NO_FRAMES.search(errors)):
        raise MediaError("zero_frames", f"duration {info.duration_s}s, sampled at {rate:.4g} fps; {errors}".strip())
    if proc.returncode != 0 or n == 0:
        raise MediaError("corrupt_video", errors or f"ffmpeg exit status {proc.returncode}")
    expected = len(keep) if config.native else info.duration_s * rate if info.duration_s else 0.0
    if errors and len(frames) < 0.9 * expected:
        raise MediaError("truncated_video", f"{len(frames)} of ~{expected:.0f} frames; ffmpeg: {errors}")
    return _uniform_subsample(frames, config.max_frames)


def decode_video(source: bytes | str | os.PathLike, config: VideoConfig = VideoConfig(),
                 tools: FFmpegTools | None = None) -> np.ndarray:
    """A video (bytes, or a local file path) → uint8 RGB frames [N, size, size, 3], in time order.

    Frames are sampled in ffmpeg's filter graph (``fps``, scale short side, centre crop;
    non-square pixels are first stretched to the display aspect ratio, as players show
    them) and streamed back as raw RGB over a pipe. A video ffmpeg reports damage in is
    decoded again on one thread, so that its frames and messages are the same on every
    run. Bytes are written to one temporary file first, because common containers (MP4
    without faststart) need a seekable input.
    """
    tools = tools or ffmpeg_tools()
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(os.fspath(source), config, tools)
    if not source:
        raise MediaError("empty_file", "0 bytes")
    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(source)
        f.flush()
        return _decode_file(f.name, config, tools)
