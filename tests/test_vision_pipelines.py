"""`lwm data image-text` / `lwm data video-text` end to end on generated media, broken files included."""

import base64
import collections
import dataclasses
import json
import subprocess

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration import cli
from trainer.evaluation import synthetic_videos as sample_media
from pipelines.kit import inspection
from pipelines.tokens import media, vision_layout
from pipelines.vision import vision_text
from pipelines.kit.buckets import Bucket
from pipelines.tokens.media import ffmpeg_tools
from pipelines.kit.output import OutputConfig
from pipelines.vision.video_text import VideoMedia, VideoTextConfig
from schemas import manifest, raw_vision, vocab


def _records(directory):
    return inspection.records(str(directory))


def _segments(directory):
    """Every packed segment of a dataset as a dict of its arrays."""
    for record in _records(directory):
        for segment in range(1, int(record["segment_ids"].max()) + 1):
            where = record["segment_ids"] == segment
            yield {k: v[where] for k, v in record.items()}


def _dead_letters(directory):
    return [json.loads(line) for line in (directory / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()]


def _ffmpeg(*args):
    subprocess.run([ffmpeg_tools().ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    """8 good images (2 inline), 2 more inline in Parquet, and a file of broken examples of every kind."""
    root = tmp_path_factory.mktemp("images")
    good = sample_media.write_image_text(root, 8)
    png = next((root / "images").glob("*.png")).read_bytes()
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "empty.jpg").write_bytes(b"")
    first = json.loads(good.read_text().splitlines()[0])
    broken = [
        {"id": "corrupt", "caption": "noise", "path": "images/corrupt.png"},
        {"id": "truncated", "caption": "half a picture", "path": "images/truncated.png"},
        {"id": "zero-bytes", "caption": "nothing", "path": "images/empty.jpg"},
        {"id": "missing-file", "caption": "gone", "path": "images/nowhere.png"},
        {"id": "bad-base64", "caption": "oops", "image": "not base64!"},
        {"id": "no-media", "caption": "a caption alone"},
        {"id": "no-caption", "path": "images/corrupt.png"},
        {**first, "caption": "the same id again"},
    ]
    (root / "broken.jsonl").write_text("\n".join(json.dumps(b) for b in broken) + "\n{not json\n")
    pq.write_table(
        pa.table({"id": ["pq-0", "pq-1"], "caption": ["a small picture", "another picture"], "image": [png, png]},
                 schema=pa.schema([raw_vision.IMAGE_TEXT_SCHEMA.field(n) for n in ("id", "caption", "image")])),
        root / "more.parquet",
    )
    return root


IMAGE_DEAD = {"corrupt_image": 2, "empty_file": 1, "missing_file": 1, "invalid_media": 1, "missing_media": 1,
              "missing_caption": 1, "duplicate_id": 1, "invalid_json": 1}


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory):
    """4 short clips (3 frames at 4 fps), a long one (8 frames), an inline test pattern, and broken files."""
    root = tmp_path_factory.mktemp("videos")
    sample_media.write_video_text(root, 4, frames=6, fps=8)
    sample_media.write_video_text(root / "long", 1, seed=1, frames=16, fps=8)
    _ffmpeg("-f", "lavfi", "-i", "testsrc=duration=0.75:size=320x240:rate=8", "-c:v", "mpeg4", str(root / "pattern.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(root / "videos" / "audio.mp4"))
    clip = (root / "videos" / "video-0-0000.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(clip[: len(clip) // 3])
    (root / "videos" / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)
    (root / "videos" / "empty.mp4").write_bytes(b"")
    extra = [
        {"id": "pattern", "caption": "a test pattern", "video": base64.b64encode((root / "pattern.mp4").read_bytes()).decode()},
        {"id": "audio-only", "caption": "a tone", "path": "videos/audio.mp4"},
        {"id": "truncated", "caption": "a cut clip", "path": "videos/truncated.mp4"},
        {"id": "corrupt", "caption": "noise", "path": "videos/corrupt.mp4"},
        {"id": "zero-bytes", "caption": "nothing", "url": str(root / "videos" / "empty.mp4")},
    ]
    (root / "extra.jsonl").write_text("".join(json.dumps(e) + "\n" for e in extra))
    return root


VIDEO_DEAD = {"no_video_stream": 1, "corrupt_video": 2, "empty_file": 1}


def _image_job(corpus, output, tokenizer, vqgan, *extra):
    return cli.main(["data", "image-text", "--input", f"{corpus}/*.jsonl", f"{corpus}/*.parquet", "--output", str(output),
                     "--tokenizer", tokenizer, "--vqgan", str(vqgan), "--seq-len", "1024", "--num-shards", "2",
                     "--encode-batch", "8", *extra])


@pytest.fixture(scope="module")
def image_job(image_corpus, tokenizer_path, vqgan_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("image_out")
    assert _image_job(image_corpus, output, tokenizer_path, vqgan_dir) == 0
    return output


@pytest.fixture(scope="module")
def video_job(video_corpus, tokenizer_path, vqgan_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("video_out")
    argv = ["data", "video-text", "--input", f"{video_corpus}/*.jsonl", f"{video_corpus}/long/*.jsonl",
            "--output", str(output), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir), "--buckets", "1024,4096",
            "--num-shards", "2", "--encode-batch", "8", "--vision-weight", "0.5", "--no-condition-loss"]
    assert cli.main(argv) == 0
    return output


def _is_understanding(segment):
    """Vision first (understanding) or caption first (generation): which side of the span holds more text."""
    vision = np.flatnonzero(segment["vision_mask"])
    return vision[0] < len(segment["tokens"]) - 1 - vision[-1]


def _check_vision_segment(segment):
    vision = np.flatnonzero(segment["vision_mask"])
    assert len(vision) % 257 == 0 and np.array_equal(vision, np.arange(vision[0], vision[0] + len(vision)))
    span = segment["tokens"][vision]
    closers = np.flatnonzero(span >= vocab.VISION_CODEBOOK_SIZE)
    assert np.array_equal(closers, np.arange(256, len(span), 257)), "eof/eov after every 256 codes"
    assert span[-1] == vocab.EOV_ID and np.all(span[closers[:-1]] == vocab.EOF_ID)
    return len(vision) // 257


def test_images_become_one_frame_segments_in_both_directions(image_job, tokenizer_path):
    result = manifest.read(str(image_job / "seq1024"))
    assert result.job == "image-text" and result.records == result.counts["packed_examples"] > 0
    assert result.config["media"]["kind"] == "image" and len(result.config["vqgan_sha256"]) == 64
    segments = list(_segments(image_job / "seq1024"))
    assert len(segments) == result.counts["documents"] == 8 + 2  # of a duplicated id only one is kept
    assert {_check_vision_segment(s) for s in segments} == {1}
    assert {_is_understanding(s) for s in segments} == {True, False}, "both directions occur"


def test_image_dead_letters_name_their_reasons(image_job):
    letters = _dead_letters(image_job / "seq1024")
    assert collections.Counter(d["reason"] for d in letters) == IMAGE_DEAD
    assert {d["id"] for d in letters if d["reason"] == "corrupt_image"} == {"corrupt", "truncated"}
    assert all(d["source"] for d in letters)


def test_counts_reconcile_in_every_bucket(image_job, video_job):
    for directory in (image_job / "seq1024", video_job / "seq1024", video_job / "seq4096"):
        counts = manifest.read(str(directory)).counts
        accounted = counts["documents"] + counts["too_short"] + counts["too_long"] + sum(counts["dead_letter"].values())
        assert accounted == counts["input_examples"], directory
    assert manifest.read(str(image_job / "seq1024")).counts["input_examples"] == 8 + 2 + 9


def test_videos_keep_their_frames_or_are_too_long_for_a_bucket(video_job):
    small, large = video_job / "seq1024", video_job / "seq4096"
    assert collections.Counter(d["reason"] for d in _dead_letters(large)) == VIDEO_DEAD
    too_long = [d for d in _dead_letters(small) if d["reason"] == "too_long"]
    assert [d["id"] for d in too_long] == ["video-1-0000"]
    assert sorted(_check_vision_segment(s) for s in _segments(small)) == [3] * 5
    assert sorted(_check_vision_segment(s) for s in _segments(large)) == [3] * 5 + [8]
    by_id = {d["id"]: d["reason"] for d in _dead_letters(large)}
    assert by_id["audio-only"] == "no_video_stream" and by_id["zero-bytes"] == "empty_file"


def test_video_loss_weights_follow_the_options(video_job):
    for segment in _segments(video_job / "seq4096"):
        weights, vision = segment["loss_weights"], segment["vision_mask"]
        understanding = _is_understanding(segment)
        assert np.all(weights[vision] == (0.0 if understanding else 0.5))  # --no-condition-loss, --vision-weight 0.5
        assert weights[0] == 0.0 and weights[-1] == 1.0  # nothing to learn at BOS; EOS always learnt
        assert np.all(np.isin(weights[~vision], [0.0, 1.0]))


def test_rerun_in_worker_processes_is_byte_identical(image_job, image_corpus, tokenizer_path, vqgan_dir, tmp_path):
    # Other batch sizes and worker processes: codes must not depend on how frames were batched.
    assert _image_job(image_corpus, tmp_path, tokenizer_path, vqgan_dir, "--encode-batch", "4",
                      "--direct_running_mode=multi_processing", "--direct_num_workers=2") == 0
    ours, theirs = image_job / "seq1024", tmp_path / "seq1024"
    for shard in manifest.read(str(ours)).shards:
        assert (ours / shard.path).read_bytes() == (theirs / shard.path).read_bytes()
    strip = lambda d: {k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "created_at"}
    assert strip(ours) == strip(theirs)
    assert (ours / "dead_letter" / "dead_letter.jsonl").read_bytes() == (theirs / "dead_letter" / "dead_letter.jsonl").read_bytes()


def test_missing_vqgan_is_a_clear_error(image_corpus, tokenizer_path, tmp_path, capsys):
    assert _image_job(image_corpus, tmp_path, tokenizer_path, tmp_path / "no_vqgan") == 2
    assert "not VQGAN weights" in capsys.readouterr().err


def _assign(frames, buckets, resample, text=20):
    markers = vision_layout.Markers(1, 2, (5, 6), (7, 8))
    parts = [(np.full(text, 9, np.int32), False), (vision_layout.VISION, True)]
    config = VideoTextConfig(inputs=(), tokenizer="", vqgan="", output=OutputConfig("unused", buckets),
                             resample_to_fit=resample)
    codes = np.arange(frames * 256, dtype=np.int32).reshape(frames, 16, 16) % 8192
    outputs = list(vision_text.assign_buckets("v", "in.jsonl:1", parts, codes, markers, config))
    segments = {o[0]: o[1] for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)}
    tagged = [(o.tag, o.value) for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    return codes, segments, tagged


def test_a_video_too_long_for_a_bucket_is_resampled_or_dead_lettered():
    buckets = (Bucket(1024), Bucket(4096), Bucket(8192, 0, 2000))
    codes, segments, tagged = _assign(10, buckets, resample=True)  # 10 frames = 2570 + 26 tokens
    assert sorted(segments) == [1024, 4096]
    kept = segments[1024].tokens[segments[1024].vision_mask].reshape(-1, 257)[:, :256]
    assert np.array_equal(kept, codes[media.sample_frame_indices(10, 3)].reshape(3, 256))  # 3 × 257 + 26 ≤ 1024
    assert len(segments[4096]) == 26 + 10 * 257
    assert ("counts", ((8192, "too_long"), 1)) in tagged  # outside the bucket's length range: a count, as for books
    _, segments, tagged = _assign(10, buckets, resample=False)
    assert sorted(segments) == [4096]
    letters = [value for tag, value in tagged if tag == "dead_letters"]
    assert [(key, d.reason, d.id) for key, d in letters] == [(1024, "too_long", "v")]


def test_an_image_with_too_long_a_caption_is_dead_lettered_even_with_resampling():
    _, segments, tagged = _assign(1, (Bucket(512),), resample=True, text=300)
    assert not segments and [v[1].reason for t, v in tagged if t == "dead_letters"] == ["too_long"]


def test_records_become_examples_or_dead_letters():
    parse = lambda fields, path="gs://b/set/part.jsonl": raw_vision.from_fields(fields, "video", path, 3)
    inline = parse({"id": 7, "caption": "c", "video": base64.b64encode(b"abc").decode(), "path": "ignored.mp4"})
    assert (inline.id, inline.media, inline.location, inline.source) == ("7", b"abc", None, "gs://b/set/part.jsonl:3")
    assert parse({"id": "a", "caption": "c", "path": "clips/a.mp4"}).location == "gs://b/set/clips/a.mp4"
    assert parse({"id": "a", "caption": "c", "url": "gs://other/a.mp4"}).location == "gs://other/a.mp4"
    assert parse({"id": "a", "caption": "c", "path": "/abs/a.mp4"}, "/data/x.jsonl").location == "/abs/a.mp4"
    reasons = [parse(f).reason for f in ({"id": "a", "caption": "  ", "path": "x"}, {"id": "", "caption": "c"},
                                        {"id": "a", "caption": "c", "image": "aGk="}, {"id": "a", "caption": "c", "path": 5},
                                        ["not", "an", "object"])]
    assert reasons == ["empty_caption", "missing_id", "missing_media", "invalid_media", "not_an_object"]


def test_remote_media_are_fetched_as_bytes_and_local_videos_by_path(video_corpus, tmp_path, monkeypatch):
    from tests.fake_remote_fs import FakeRemoteFileSystem

    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(tmp_path))
    clip = video_corpus / "videos" / "video-0-0000.mp4"
    (tmp_path / "clip.mp4").write_bytes(clip.read_bytes())
    remote = raw_vision.VisionExample("r", "c", "fakegcs://set.jsonl", 1, location="fakegcs://clip.mp4")
    local = raw_vision.VisionExample("l", "c", str(video_corpus / "x.jsonl"), 1, location=str(clip))
    assert vision_text.fetch(remote, local_paths=True) == clip.read_bytes()
    assert vision_text.fetch(local, local_paths=True) == str(clip)
    assert vision_text.fetch(local, local_paths=False) == clip.read_bytes()
    decode = vision_text.DecodeMedia(VideoMedia())
    decode.setup()
    (example, frames), = decode.process(remote)
    assert example.id == "r" and frames.shape == (3, 256, 256, 3)
    missing = dataclasses.replace(remote, location="fakegcs://gone.mp4")
    (letter,) = decode.process(missing)
    assert letter.tag == "dead_letters" and letter.value.reason == "missing_file"
