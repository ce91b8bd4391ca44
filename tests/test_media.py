"""Image and video decoding: geometry, sampling, and a reason for every failure."""

import io
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.tokens.media import FFmpegTools, MediaError, VideoConfig, decode_image, decode_video, ffmpeg_tools


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def three_bands(width: int, height: int, colours, vertical: bool) -> Image.Image:
    """Quarter / half / quarter bands, so the centre square is exactly the middle band."""
    img = Image.new("RGB", (width, height))
    long_side = height if vertical else width
    edges = [0, long_side // 4, long_side - long_side // 4, long_side]
    for colour, start, stop in zip(colours, edges, edges[1:]):
        box = (0, start, width, stop) if vertical else (start, 0, stop, height)
        img.paste(colour, box)
    return img


# ---------------------------------------------------------------- images

# (format, mode) pairs Pillow can write.
SAVABLE = [(fmt, mode) for fmt, modes in {
    "PNG": ["RGB", "L", "RGBA", "P", "1"], "JPEG": ["RGB", "L", "CMYK"], "GIF": ["P", "L"],
    "BMP": ["RGB", "L", "P", "1"], "WEBP": ["RGB", "RGBA"], "TIFF": ["RGB", "CMYK", "RGBA", "L", "1"],
}.items() for mode in modes]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 700), height=st.integers(1, 700), fmt_mode=st.sampled_from(SAVABLE),
       seed=st.integers(0, 255))
def test_any_image_becomes_a_256_square_rgb_frame(width, height, fmt_mode, seed):
    fmt, mode = fmt_mode
    img = Image.new("RGB", (width, height), (seed, 255 - seed, seed // 2)).convert(mode)
    frame = decode_image(image_bytes(img, fmt))
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    if mode == "RGB" and fmt in ("PNG", "BMP", "TIFF"):  # lossless: the flat colour survives
        assert (frame == np.array([seed, 255 - seed, seed // 2], np.uint8)).all()


@pytest.mark.parametrize("size,vertical", [((1024, 512), False), ((300, 600), True)])
def test_image_keeps_the_centre_square_after_resizing_the_short_side(size, vertical):
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    frame = decode_image(image_bytes(three_bands(*size, (red, green, blue), vertical), "PNG"))
    interior = frame[4:-4, 4:-4].reshape(-1, 3).astype(int)
    assert np.abs(interior - np.array(green)).max() <= 2


def test_transparent_pixels_become_white():
    frame = decode_image(image_bytes(Image.new("RGBA", (300, 300), (10, 20, 30, 0)), "PNG"))
    assert (frame == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (512, 256), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 256, 256))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: white ends up on top
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    frame = decode_image(buf.getvalue()).astype(int)
    assert frame[:100].mean() > 200 and frame[-100:].mean() < 50


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"definitely not an image", "corrupt_image"),
    (image_bytes(Image.new("RGB", (300, 300), (1, 2, 3)), "PNG")[:200], "corrupt_image"),
    (image_bytes(Image.effect_noise((300, 300), 50).convert("RGB"), "JPEG")[:1500], "corrupt_image"),
])
def test_undecodable_images_raise_media_error_with_reason(data, reason):
    with pytest.raises(MediaError) as err:
        decode_image(data)
    assert err.value.reason == reason
    assert " at 0x" not in err.value.detail  # details are reproducible: no object addresses


def test_images_under_the_minimum_size_are_refused():
    data = image_bytes(Image.new("RGB", (300, 200)), "PNG")
    assert decode_image(data, min_short_side=200).shape == (256, 256, 3)
    with pytest.raises(MediaError) as err:
        decode_image(data, min_short_side=256)
    assert err.value.reason == "image_too_small"


def bands(outer, middle, dtype, channels=()) -> np.ndarray:
    """A 512×256 array: quarter / half / quarter columns, so the centre square is exactly ``middle``."""
    array = np.full((256, 512, *channels), outer, dtype)
    array[:, 128:384] = middle
    return array


def pillow_file(array: np.ndarray, fmt: str) -> bytes:
    return image_bytes(Image.fromarray(array), fmt)


def pillow_big_endian_16(array: np.ndarray, fmt: str) -> bytes:
    return image_bytes(Image.frombytes("I;16B", array.shape[::-1], array.astype(">u2").tobytes()), fmt)


def ffmpeg_rgb48(array: np.ndarray, fmt: str) -> bytes:
    """A 16-bit-per-channel RGB (or RGBA) image written by ffmpeg, which Pillow cannot write."""
    pix_fmt = "rgb48be" if array.shape[-1] == 3 else "rgba64be"
    codec = {"PNG": "png", "TIFF": "tiff"}[fmt]
    return subprocess.run(
        [ffmpeg_tools().ffmpeg, "-v", "error", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", "512x256", "-i", "pipe:",
         "-frames:v", "1", "-c:v", codec, "-pix_fmt", pix_fmt, "-f", "image2pipe", "pipe:"],
        input=array.astype(">u2").tobytes(), capture_output=True, check=True).stdout


@pytest.mark.parametrize("write,array,fmt,expected", [
    pytest.param(pillow_file, bands(65535, 0x8080, np.uint16), "PNG", 128, id="16-bit grey PNG (I;16)"),
    pytest.param(pillow_file, bands(0, 0x4040, np.uint16), "TIFF", 64, id="16-bit grey TIFF"),
    pytest.param(pillow_big_endian_16, bands(65535, 0xC0C0, np.uint16), "TIFF", 192, id="big-endian TIFF (I;16B)"),
    pytest.param(pillow_file, bands(0, 0x8080, np.uint16), "PPM", 128, id="16-bit PGM (mode I)"),
    pytest.param(pillow_file, bands(0, 0x4040, np.uint16), "JPEG2000", 64, id="16-bit JPEG 2000"),
    pytest.param(pillow_file, bands(400_000, 100_000, np.int32), "TIFF", 64, id="32-bit TIFF, own maximum"),
    pytest.param(pillow_file, bands(1.0, 0.5, np.float32), "TIFF", 128, id="float TIFF, white 1.0"),
    pytest.param(pillow_file, bands(1000.0, 250.0, np.float32), "TIFF", 64, id="HDR float TIFF, own maximum"),
    pytest.param(pillow_file, bands(np.nan, 0.25, np.float32), "TIFF", 64, id="float TIFF with NaN"),
    pytest.param(ffmpeg_rgb48, bands(0, (0x1234, 0x8000, 0xFFFF), np.uint16, (3,)), "PNG", (0x12, 0x80, 0xFF),
                 id="16-bit RGB PNG"),
    pytest.param(ffmpeg_rgb48, bands(65535, (0x1234, 0x8000, 0xFFFF), np.uint16, (3,)), "TIFF", (0x12, 0x80, 0xFF),
                 id="16-bit RGB TIFF"),
    pytest.param(ffmpeg_rgb48, bands(0, (0x4000, 0x8000, 0xC000, 0xFFFF), np.uint16, (4,)), "PNG", (0x40, 0x80, 0xC0),
                 id="16-bit RGBA PNG"),
])
def test_high_bit_depth_images_are_scaled_to_8_bits_by_their_range(write, array, fmt, expected):
    frame = decode_image(write(array, fmt))
    interior = frame[4:-4, 4:-4].reshape(-1, 3).astype(int)
    assert np.abs(interior - np.broadcast_to(expected, 3)).max() <= 1


def test_a_16_bit_gradient_keeps_its_whole_range():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    row = decode_image(pillow_file(ramp, "PNG"))[128, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and np.all(np.diff(row) >= 0)


# ---------------------------------------------------------------- videos

def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_tools().ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Small videos made from ffmpeg's test sources."""
    d = tmp_path_factory.mktemp("videos")
    paths = {name: str(d / name) for name in (
        "testsrc.mp4", "fade.mkv", "bands.mkv", "noise_faststart.mp4", "audio.m4a", "no_packets.mkv")}
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=4", "-pix_fmt", "yuv420p",
           "-c:v", "libx264", paths["testsrc.mp4"])
    # Brightness rises frame by frame: sampled frames must come back in time order.
    ffmpeg("-f", "lavfi", "-i", "color=c=white:size=64x48:rate=25:duration=4,fade=in:0:100",
           "-c:v", "ffv1", paths["fade.mkv"])
    ffmpeg("-filter_complex", "color=c=blue:s=128x256:d=1[a];color=c=lime:s=256x256:d=1[b];"
           "color=c=red:s=128x256:d=1[c];[a][b][c]hstack=inputs=3", "-c:v", "ffv1", paths["bands.mkv"])
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4,noise=alls=30:allf=t",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-movflags", "+faststart", paths["noise_faststart.mp4"])
    # 64×64 stored pixels, non-square: shown as 128×64 (SAR 2:1) and 64×128 (SAR 1:2). Quarter / half /
    # quarter bands along the long display side, so only the middle band belongs in the centre square.
    for name, stack, band, half, sar in (("sar_wide.mkv", "hstack", "16x64", "32x64", "2/1"),
                                         ("sar_tall.mp4", "vstack", "64x16", "64x32", "1/2")):
        paths[name] = str(d / name)
        ffmpeg("-filter_complex", f"color=c=blue:s={band}:d=1[a];color=c=lime:s={half}:d=1[b];"
               f"color=c=red:s={band}:d=1[c];[a][b][c]{stack}=inputs=3,setsar={sar}", "-pix_fmt", "yuv444p",
               "-c:v", "libx264", "-qp", "0", paths[name])
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", paths["audio.m4a"])
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-f", "lavfi", "-i", "testsrc=size=64x64:duration=1",
           "-map", "0", "-map", "1", "-frames:v", "0", "-c:a", "aac", "-c:v", "png", paths["no_packets.mkv"])
    return paths


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(params=["ffprobe", "ffmpeg_only"])
def tools(request):
    """Both probing paths: the system ffprobe, and parsing `ffmpeg -i` (imageio-ffmpeg has no ffprobe)."""
    found = ffmpeg_tools()
    if request.param == "ffprobe" and found.ffprobe is None:
        pytest.skip("no ffprobe on PATH")
    return found if request.param == "ffprobe" else FFmpegTools(found.ffmpeg, None)


def test_video_is_sampled_at_4_fps_into_256_square_frames(videos, tools):
    frames = decode_video(read(videos["testsrc.mp4"]), tools=tools)
    assert frames.shape == (16, 256, 256, 3) and frames.dtype == np.uint8
    assert len({f.tobytes() for f in frames}) == 16


def test_bytes_and_path_inputs_give_the_same_frames(videos):
    np.testing.assert_array_equal(decode_video(videos["testsrc.mp4"]), decode_video(read(videos["testsrc.mp4"])))


def test_sampled_frames_come_back_in_time_order(videos):
    brightness = decode_video(videos["fade.mkv"]).mean(axis=(1, 2, 3))
    assert len(brightness) == 16 and np.all(np.diff(brightness) > 0)


def test_video_keeps_the_centre_square_after_resizing_the_short_side(videos):
    frame = decode_video(videos["bands.mkv"])[0]
    interior = frame[4:-4, 4:-4].reshape(-1, 3).astype(int)
    assert np.abs(interior - np.array([0, 255, 0])).max() <= 4


@pytest.mark.parametrize("name", ["sar_wide.mkv", "sar_tall.mp4"])
def test_non_square_pixels_are_cropped_in_display_geometry(videos, tools, name):
    frame = decode_video(videos[name], tools=tools)[0]
    interior = frame[8:-8, 8:-8].reshape(-1, 3).astype(int)
    assert np.abs(interior - np.array([0, 255, 0])).max() <= 8


@pytest.mark.parametrize("config,count", [
    (VideoConfig(fps=None, max_frames=5), 5),
    (VideoConfig(fps=4.0, max_frames=6), 6),
    (VideoConfig(fps=2.0, max_frames=100), 8),
    (VideoConfig(fps=None, max_frames=1000), 100),  # never more than the video's own 25 fps × 4 s
])
def test_frame_count_follows_fps_and_max_frames(videos, tools, config, count):
    frames = decode_video(videos["fade.mkv"], config, tools=tools)
    assert len(frames) == count
    assert np.all(np.diff(frames.mean(axis=(1, 2, 3))) > 0)


def test_uniform_sampling_takes_the_centre_of_equal_segments(videos):
    # 4 s at 25 fps, brightness rising linearly over all 100 frames: 3 samples sit at 1/6, 3/6, 5/6.
    brightness = decode_video(videos["fade.mkv"], VideoConfig(fps=None, max_frames=3)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(brightness, 255 * (np.arange(3) + 0.5) / 3, atol=8)


def truncated(path: str) -> bytes:
    data = read(path)
    return data[: len(data) // 2]


@pytest.mark.parametrize("make,config,reason", [
    (lambda v: b"", VideoConfig(), "empty_file"),
    (lambda v: b"\x00\x01garbage" * 500, VideoConfig(), "corrupt_video"),
    (lambda v: truncated(v["testsrc.mp4"]), VideoConfig(), "corrupt_video"),  # index (moov) at the end: cut off
    (lambda v: truncated(v["noise_faststart.mp4"]), VideoConfig(), "truncated_video"),
    (lambda v: read(v["audio.m4a"]), VideoConfig(), "no_video_stream"),
    (lambda v: read(v["no_packets.mkv"]), VideoConfig(), "zero_frames"),
    (lambda v: read(v["testsrc.mp4"]), VideoConfig(max_duration_s=3.0), "too_long_duration"),
    (lambda v: read(v["testsrc.mp4"]), VideoConfig(timeout_s=1e-4), "ffmpeg_timeout"),
])
def test_undecodable_videos_raise_media_error_with_reason(videos, tools, make, config, reason):
    with pytest.raises(MediaError) as err:
        decode_video(make(videos), config, tools=tools)
    assert err.value.reason == reason


def damaged(data: bytes, changes: int = 100, seed: int = 0) -> bytes:
    """``changes`` random bytes overwritten after the first tenth (the container header survives)."""
    rng = np.random.default_rng(seed)
    out = np.frombuffer(data, np.uint8).copy()
    out[rng.integers(len(data) // 10, len(data), changes)] = rng.integers(0, 256, changes)
    return out.tobytes()


def outcome(data: bytes):
    try:
        return decode_video(data).tobytes()
    except MediaError as err:
        return err.reason, err.detail


def test_a_damaged_video_decodes_the_same_on_every_run(videos):
    # ffmpeg's multi-threaded decoder conceals damage differently on each run: frames and messages varied.
    data = damaged(read(videos["noise_faststart.mp4"]))
    assert len({outcome(data) for _ in range(3)}) == 1


def test_failure_details_are_the_same_on_every_run(videos, tools):
    # Dead letters must be byte-identical across reruns: no temp file names or pointer values.
    details = set()
    for _ in range(2):
        with pytest.raises(MediaError) as err:
            decode_video(truncated(videos["noise_faststart.mp4"]), tools=tools)
        details.add(err.value.detail)
    assert len(details) == 1 and " @ 0x" not in details.pop()


@pytest.mark.parametrize("name,reason", [("nope.mp4", "missing_file"), (".", "unreadable_media")])
def test_a_video_path_that_is_missing_or_unreadable_says_which(tmp_path, name, reason):
    with pytest.raises(MediaError) as err:
        decode_video(tmp_path / name)
    assert err.value.reason == reason


def test_zero_byte_video_file_is_an_empty_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError) as err:
        decode_video(tmp_path / "empty.mp4")
    assert err.value.reason == "empty_file"


@pytest.mark.parametrize("kwargs", [
    {"fps": None, "max_frames": None}, {"fps": 0.0}, {"fps": float("nan")}, {"max_frames": 0},
    {"max_duration_s": 0.0}, {"timeout_s": -1.0}, {"size": 0},
])
def test_video_config_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        VideoConfig(**kwargs)
