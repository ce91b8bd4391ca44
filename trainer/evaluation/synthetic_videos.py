"""Generated image-text and video-text samples: the demo's media, the video needle's haystack (no downloads).

Each example is a coloured shape on a plain background, captioned with what it shows:
"a red circle on a white background"; in videos the shape moves and the caption says
which way ("a blue square moving to the right on a black background"). Images are
drawn with Pillow (PNG and JPEG, not square, so the resize and centre crop matter);
videos are Pillow frames piped to ffmpeg (MPEG-4 part 2 in MP4, a codec every ffmpeg
build has). The same seed gives the same files.

Needles (:func:`needle_picture`) are of another kind: a star, cross, diamond or ring
(never a haystack shape) filling a striped frame, so one stands out among moving shapes.
"""

from __future__ import annotations

import base64
import json
import pathlib
import random
import subprocess

import ffmpeg
import numpy as np
from PIL import Image, ImageDraw

from pipelines.tokens.media import ffmpeg_tools

SHAPES = ("circle", "square", "triangle")
NEEDLE_SHAPES = ("star", "cross", "diamond", "ring")  # the video needle's: never in a haystack
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
MOTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}
IMAGE_SIZES = ((320, 256), (256, 320), (288, 288))
VIDEO_SIZE = (320, 240)


def draw(size: tuple[int, int], shape: str, colour: str, background: str, centre: tuple[float, float],
         radius: float) -> Image.Image:
    """One RGB picture: ``shape`` of ``colour`` centred at ``centre`` on ``background``."""
    image = Image.new("RGB", size, BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    elif shape == "triangle":
        pen.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLOURS[colour])
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2, 0.4 * radius, radius)
        pen.polygon([(x + r * np.cos(a), y - r * np.sin(a)) for a, r in zip(angles, radii)], fill=COLOURS[colour])
    elif shape == "cross":
        arm = radius / 3
        pen.rectangle((x - radius, y - arm, x + radius, y + arm), fill=COLOURS[colour])
        pen.rectangle((x - arm, y - radius, x + arm, y + radius), fill=COLOURS[colour])
    elif shape == "diamond":
        pen.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=COLOURS[colour])
    elif shape == "ring":
        pen.ellipse(box, outline=COLOURS[colour], width=max(2, int(radius / 3)))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NEEDLE_SHAPES}")
    return image


def needle_picture(shape: str, colour: str, size: int = 256) -> np.ndarray:
    """A video needle: a large ``shape`` (one of :data:`NEEDLE_SHAPES`) of ``colour`` on grey and white
    stripes, uint8 RGB ``[size, size, 3]``."""
    if shape not in NEEDLE_SHAPES:
        raise ValueError(f"a needle is one of {NEEDLE_SHAPES}, got {shape!r}")
    picture = draw((size, size), shape, colour, "white", (size / 2, size / 2), 0.4 * size)
    pixels = np.asarray(picture).copy()
    stripes = (np.arange(size) // 16) % 2 == 1
    background = (pixels == BACKGROUNDS["white"]).all(axis=-1)
    pixels[background & stripes[:, None]] = BACKGROUNDS["grey"]
    return pixels


def needle_name(shape: str, colour: str) -> str:
    """How an option names a needle: "a red star"."""
    return f"{_with_article(colour)} {shape}"


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _scene(rng: random.Random) -> tuple[str, str, str]:
    background = rng.choice(sorted(BACKGROUNDS))
    colour = rng.choice(sorted(COLOURS))
    return rng.choice(SHAPES), colour, background


def write_image_text(directory: pathlib.Path, count: int, *, seed: int = 0, inline_every: int = 4) -> pathlib.Path:
    """``count`` captioned images: files under ``directory/images/`` named by relative ``path``,
    every ``inline_every``-th inlined as base64 ``image`` bytes instead. Returns the JSON-lines file."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / "image_text.jsonl"
    with path.open("w") as out:
        for index in range(count):
            shape, colour, background = _scene(rng)
            size = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            side = min(size)  # the centre square the crop keeps
            radius = rng.uniform(0.15, 0.3) * side
            left, top = (size[0] - side) / 2, (size[1] - side) / 2
            centre = (left + rng.uniform(radius, side - radius), top + rng.uniform(radius, side - radius))
            picture = draw(size, shape, colour, background, centre, radius)
            example_id = f"image-{seed}-{index:04d}"
            record = {"id": example_id, "caption": f"{_with_article(colour)} {shape} on a {background} background"}
            name = f"{example_id}.{'png' if index % 2 else 'jpg'}"
            picture.save(directory / "images" / name, quality=90)
            if inline_every and index % inline_every == 0:
                record["image"] = base64.b64encode((directory / "images" / name).read_bytes()).decode()
                (directory / "images" / name).unlink()
            else:
                record["path"] = f"images/{name}"
            out.write(json.dumps(record) + "\n")
    return path


def encode_video(path: pathlib.Path, frames: np.ndarray, fps: int, timeout_s: float = 60.0) -> pathlib.Path:
    """Write uint8 RGB frames [F, H, W, 3] as an MP4 (MPEG-4 part 2), piping raw frames to ffmpeg."""
    _, height, width, _ = frames.shape
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        .output(str(path), vcodec="mpeg4", pix_fmt="yuv420p", fflags="+bitexact", **{"q:v": 4, "flags:v": "+bitexact"})
        .global_args("-hide_banner", "-loglevel", "error", "-threads", "1")
        .overwrite_output()
        .compile(cmd=ffmpeg_tools().ffmpeg)
    )
    done = subprocess.run(args, input=np.ascontiguousarray(frames, np.uint8).tobytes(), capture_output=True,
                          timeout=timeout_s, check=False)
    if done.returncode:
        raise RuntimeError(f"ffmpeg could not write {path}: {done.stderr.decode(errors='replace')[-300:]}")
    return path


def write_video_text(directory: pathlib.Path, count: int, *, seed: int = 0, frames: int | tuple[int, int] = 8,
                     fps: int = 8) -> pathlib.Path:
    """``count`` captioned videos of ``frames`` frames (or, for a ``(low, high)`` pair, a random
    count in that closed range per video) at ``fps`` under ``directory/videos/``, named by
    relative ``path``. Returns the JSON-lines file."""
    rng = random.Random(seed)
    low, high = (frames, frames) if isinstance(frames, int) else frames
    (directory / "videos").mkdir(parents=True, exist_ok=True)
    path = directory / "video_text.jsonl"
    width, height = VIDEO_SIZE
    with path.open("w") as out:
        for index in range(count):
            frames = rng.randint(low, high) if low < high else low
            shape, colour, background = _scene(rng)
            motion = rng.choice(sorted(MOTIONS))
            dx, dy = MOTIONS[motion]
            radius = rng.uniform(0.12, 0.2) * height
            margin = (width - height) / 2 + radius  # keep the shape inside the centre square the crop keeps
            span_x, span_y = width - 2 * margin, height - 2 * radius
            start = (margin + (span_x if dx < 0 else 0 if dx else rng.uniform(0, span_x)),
                     radius + (span_y if dy < 0 else 0 if dy else rng.uniform(0, span_y)))
            clip = np.stack([
                np.asarray(draw((width, height), shape, colour, background,
                                (start[0] + dx * span_x * t / max(frames - 1, 1), start[1] + dy * span_y * t / max(frames - 1, 1)),
                                radius))
                for t in range(frames)
            ])
            example_id = f"video-{seed}-{index:04d}"
            encode_video(directory / "videos" / f"{example_id}.mp4", clip, fps)
            caption = f"{_with_article(colour)} {shape} moving {motion} on a {background} background"
            out.write(json.dumps({"id": example_id, "caption": caption, "path": f"videos/{example_id}.mp4"}) + "\n")
    return path
