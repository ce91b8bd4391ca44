"""Reruns over corrupt media write the same dead letters, byte for byte (and the same shards and manifest).

ffmpeg's multi-threaded decoder used to report a damaged video's errors, and conceal
its damage, differently from run to run; these jobs run twice over media broken in
every way ``pipelines.tokens.media`` names, and compare everything they write.
"""

import json
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from orchestration import cli
from pipelines.tokens.media import ffmpeg_tools
from tests.test_media import damaged, image_bytes


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_tools().ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", *args],
                   check=True, timeout=60)


def _write_examples(root: pathlib.Path, files: dict[str, bytes], extra: list[dict]) -> None:
    (root / "media").mkdir(parents=True)
    (root / "media" / "a_directory").mkdir()
    for name, data in files.items():
        (root / "media" / name).write_bytes(data)
    names = [*files, "a_directory", "nowhere.bin"]
    examples = [{"id": name, "caption": f"the file {name}", "path": f"media/{name}"} for name in names] + extra
    (root / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))


@pytest.fixture(scope="module")
def corrupt_videos(tmp_path_factory):
    """Damaged and truncated H.264 (threaded decoding), garbage, audio only, empty, missing and a directory."""
    work = tmp_path_factory.mktemp("sources")
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4,noise=alls=30:allf=t", "-pix_fmt", "yuv420p",
            "-c:v", "libx264", "-movflags", "+faststart", str(work / "noise.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=2", "-c:v", "libx264",
            str(work / "index_last.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(work / "audio.m4a"))
    noise, index_last = (work / "noise.mp4").read_bytes(), (work / "index_last.mp4").read_bytes()
    root = tmp_path_factory.mktemp("corrupt_videos")
    _write_examples(root, {
        "damaged.mp4": damaged(noise), "damaged_more.mp4": damaged(noise, 400, seed=1),
        "truncated.mp4": noise[: len(noise) // 2], "no_index.mp4": index_last[: len(index_last) // 2],
        "garbage.mp4": bytes(range(256)) * 8, "audio.m4a": (work / "audio.m4a").read_bytes(), "empty.mp4": b"",
    }, [])
    return root


@pytest.fixture(scope="module")
def corrupt_images(tmp_path_factory):
    """Truncated PNG and JPEG, garbage, a 16-bit PNG, bad base64, empty, missing and a directory."""
    noise = Image.effect_noise((300, 300), 50).convert("RGB")
    png, jpeg = image_bytes(noise, "PNG"), image_bytes(noise, "JPEG")
    grey16 = image_bytes(Image.fromarray(np.linspace(0, 65535, 300 * 300).astype(np.uint16).reshape(300, 300)), "PNG")
    root = tmp_path_factory.mktemp("corrupt_images")
    _write_examples(root, {
        "truncated.png": png[: len(png) // 2], "truncated.jpg": jpeg[: len(jpeg) // 3], "grey16.png": grey16,
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "empty.jpg": b"",
    }, [{"id": "bad-base64", "caption": "oops", "image": "not base64!"}])
    return root


def _run_twice(kind: str, corpus, tokenizer, vqgan, tmp_path, *options: str) -> list[pathlib.Path]:
    outputs = []
    for run in ("first", "second"):
        output = tmp_path / run
        argv = ["data", kind, "--input", str(corpus / "examples.jsonl"), "--output", str(output), "--tokenizer",
                tokenizer, "--vqgan", str(vqgan), "--seq-len", "1024", "--num-shards", "1", *options]
        assert cli.main(argv) == 0
        outputs.append(output / "seq1024")
    return outputs


def _written(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file a job wrote, the manifest without its timestamp."""
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created_at")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


def _reasons(directory: pathlib.Path) -> dict[str, str]:
    letters = (directory / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: json.loads(line)["reason"] for line in letters}


def test_video_reruns_write_identical_dead_letters_and_shards(corrupt_videos, tokenizer_path, vqgan_dir, tmp_path):
    first, second = _run_twice("video-text", corrupt_videos, tokenizer_path, vqgan_dir, tmp_path, "--max-frames", "2")
    letters = "dead_letter/dead_letter.jsonl"
    assert (first / letters).read_bytes() == (second / letters).read_bytes()
    assert _written(first) == _written(second)
    assert _reasons(first) == {
        "truncated.mp4": "truncated_video", "no_index.mp4": "corrupt_video", "garbage.mp4": "corrupt_video",
        "audio.m4a": "no_video_stream", "empty.mp4": "empty_file", "nowhere.bin": "missing_file",
        "a_directory": "unreadable_media",
    }


@pytest.mark.slow  # Pillow decodes on one thread; the video case above is the fast representative
def test_image_reruns_write_identical_dead_letters_and_shards(corrupt_images, tokenizer_path, vqgan_dir, tmp_path):
    first, second = _run_twice("image-text", corrupt_images, tokenizer_path, vqgan_dir, tmp_path)
    letters = "dead_letter/dead_letter.jsonl"
    assert (first / letters).read_bytes() == (second / letters).read_bytes()
    assert _written(first) == _written(second)
    assert _reasons(first) == {
        "truncated.png": "corrupt_image", "truncated.jpg": "corrupt_image", "garbage.png": "corrupt_image",
        "empty.jpg": "empty_file", "nowhere.bin": "missing_file", "a_directory": "unreadable_media",
        "bad-base64": "invalid_media",
    }
