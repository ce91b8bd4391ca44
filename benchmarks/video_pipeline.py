"""Video-text pipeline figures: frames/s per core end to end, and where the time goes.

End to end = ``lwm data video-text`` on the local runner over generated clips (read,
ffmpeg decode at 4 fps, VQGAN encode with random weights, layout, pack, write), wall
time including the VQGAN load and compilation. Per core = divided by the cores this
process may use (JAX's CPU convolutions use all of them).

Decode vs encode = the two stages timed alone in this process over the same clips:
ffmpeg decoding (``pipelines.tokens.media.decode_video``) and VQGAN encoding of the decoded
frames in batches of ``--encode-batch`` after one warm-up call (compilation reported
apart). Their shares are of (decode + encode).

    .venv/bin/python benchmarks/video_pipeline.py [--config small|amused] [--videos 8] [--frames 16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from orchestration import cli
from trainer.evaluation import synthetic_books as sample_data
from trainer.evaluation import synthetic_videos as sample_media
from pipelines.tokens import media
from pipelines.tokens import vision_layout
from pipelines.tokens.vqgan import PRESETS, VQGAN
from schemas import manifest, packed


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def stages(clips: list[pathlib.Path], vqgan: VQGAN, batch: int) -> dict:
    """Decode and encode timed apart over the same clips."""
    start = time.perf_counter()
    frames = np.concatenate([media.decode_video(str(clip)) for clip in clips])
    decode_s = time.perf_counter() - start
    padded = np.concatenate([frames, np.zeros((-len(frames) % batch, *frames.shape[1:]), np.uint8)])
    start = time.perf_counter()
    vqgan.encode(vqgan.preprocess(padded[:batch]))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    vqgan.encode(vqgan.preprocess(padded))
    encode_s = (time.perf_counter() - start) * len(frames) / len(padded)  # the real frames' share of the work
    return {
        "frames": len(frames),
        "decode_frames_per_s": round(len(frames) / decode_s, 2),
        "encode_frames_per_s": round(len(frames) / encode_s, 2),
        "first_encode_call_s": round(compile_s, 2),
        "decode_share": round(decode_s / (decode_s + encode_s), 3),
        "encode_share": round(encode_s / (decode_s + encode_s), 3),
    }


def end_to_end(workdir: pathlib.Path, videos: pathlib.Path, vqgan_dir: pathlib.Path, batch: int) -> dict:
    corpus = sample_data.write_books(workdir / "books.jsonl", 20)
    tokenizer = str(workdir / "tok.model")
    cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--output", tokenizer])
    start = time.perf_counter()
    code = cli.main(["data", "video-text", "--input", str(videos), "--output", str(workdir / "out"), "--tokenizer",
                     tokenizer, "--vqgan", str(vqgan_dir), "--seq-len", "8192", "--encode-batch", str(batch),
                     "--overwrite"])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"lwm data video-text exited {code}")
    directory = str(workdir / "out" / "seq8192")
    result = manifest.read(directory, verify_hashes=False)
    frames = 0
    for path in manifest.shard_paths(directory, result):
        reader = ArrayRecordReader(path)
        for record in reader.read_all() if reader.num_records() else ():
            frames += int(packed.decode(record)["vision_mask"].sum()) // vision_layout.FRAME_TOKENS
        reader.close()
    return {"seconds": round(seconds, 1), "records": result.records, "tokens": result.tokens, "frames": frames,
            "frames_per_s_per_core": round(frames / seconds / _cores(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="small")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16, help="frames per generated clip at 8 fps (4 fps sampled)")
    parser.add_argument("--encode-batch", type=int, default=16)
    args = parser.parse_args()
    cores = _cores()
    print(json.dumps({"cores": cores, "load_average_1min": round(os.getloadavg()[0], 2), "config": args.config}))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        videos = sample_media.write_video_text(workdir / "raw", args.videos, frames=args.frames, fps=8)
        vqgan_dir = workdir / "vqgan"
        VQGAN.init_random(PRESETS[args.config], seed=0).save(str(vqgan_dir))
        clips = sorted((workdir / "raw" / "videos").glob("*.mp4"))
        split = stages(clips, VQGAN.load(str(vqgan_dir), batch_size=args.encode_batch), args.encode_batch)
        print(json.dumps({"stages": split}))
        print(json.dumps({"end_to_end": end_to_end(workdir, videos, vqgan_dir, args.encode_batch)}))


if __name__ == "__main__":
    main()
