"""Vision tokenization on CPU: VQGAN encoder frames/s, video decode frames/s, and their time shares.

Per core = frames/s over wall time divided by the cores this process may use (XLA and
ffmpeg both use every core they are given). The video is ffmpeg's ``testsrc2`` at
640×360, 25 fps, H.264, decoded at LWM's 4 fps into 256×256 frames; the share is each
stage's seconds per frame over the sum, i.e. where a video worker's CPU time goes.

    .venv/bin/python benchmarks/vqgan_cpu.py [--configs small amused] [--frames 16] [--batch 8] [--video-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines.tokens.media import VideoConfig, decode_video, ffmpeg_tools  # noqa: E402
from pipelines.tokens.vqgan import PRESETS, VQGAN  # noqa: E402


def encoder_seconds_per_frame(name: str, frames: int, batch: int) -> float:
    vq = VQGAN.init_random(PRESETS[name], seed=0, batch_size=batch)
    x = vq.preprocess(np.random.default_rng(0).integers(0, 256, (frames, 256, 256, 3), np.uint8))
    vq.encode(x[:batch])  # compile
    start = time.perf_counter()
    codes = vq.encode(x)
    elapsed = time.perf_counter() - start
    assert codes.shape == (frames, 16, 16)
    return elapsed / frames


def video_seconds_per_frame(seconds: float, repeats: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "testsrc2.mp4")
        subprocess.run([ffmpeg_tools().ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=640x360:rate=25:duration={seconds}", "-pix_fmt", "yuv420p",
                        "-c:v", "libx264", path], check=True)
        best, n = float("inf"), 0
        for _ in range(repeats):
            start = time.perf_counter()
            n = len(decode_video(path, VideoConfig(fps=4.0)))
            best = min(best, time.perf_counter() - start)
    return best / n, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "amused"], choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int, default=16, help="frames encoded after the compile batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--video-seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3, help="video decodes; the fastest counts")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores}; ffmpeg: {ffmpeg_tools().ffmpeg}")
    video_s, n = video_seconds_per_frame(args.video_seconds, args.repeats)
    print(f"video decode (640x360 H.264 -> 4 fps, 256x256): {1 / video_s:8.1f} frames/s, "
          f"{1 / video_s / cores:8.1f} frames/s/core ({n} frames)")
    for name in args.configs:
        enc_s = encoder_seconds_per_frame(name, args.frames, args.batch)
        print(f"encoder {name:7s} (batch {args.batch}): {1 / enc_s:8.2f} frames/s, {1 / enc_s / cores:8.2f} "
              f"frames/s/core; time share decode {video_s / (video_s + enc_s):6.1%} / "
              f"encode {enc_s / (video_s + enc_s):6.1%}")


if __name__ == "__main__":
    main()
