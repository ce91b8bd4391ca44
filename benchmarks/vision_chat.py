"""Vision chat figures: prefill memory of long videos over the ring, and what cache reuse saves a second turn.

1. Prefill of a video prompt of F frames (F × 257 vision tokens plus the chat text) on the demo
   model's architecture (``tiny``, random weights: memory and time do not depend on them) with ring
   attention over ``--sp`` simulated CPU devices: the compiled per-device peak (arguments + outputs +
   temporaries − aliases, XLA's memory analysis) at each F, and (``--run``) the wall time of the prefill.
   Goal: memory linear in frames (the cache and the per-device share of activations grow with F).
2. A second turn after an F-frame first turn: the time of ``ChatSession``'s second turn (its tokens fed
   through the cache, then the answer) ÷ the time of prefilling the whole conversation again and
   answering (``Sampler.generate``). Goal: ≤ 0.1. Both timed after a warm-up that compiles them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/python benchmarks/vision_chat.py --frames 64,128,256 --run-frames 64
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from schemas import vocab
from trainer import checkpoint
from trainer.inference import sampler as sample
from trainer.model import PRESETS, init_params
from trainer.sharding import activate, logical_to_spec

TEXT = 40  # chat text around the frames (BOS, system prompt, question, tags, ASSISTANT:)


def prompt(frames: int, rng) -> tuple[np.ndarray, np.ndarray]:
    vision = rng.integers(0, vocab.VISION_CODEBOOK_SIZE, (frames, 257))
    vision[:, -1] = vocab.EOF_ID
    vision[-1, -1] = vocab.EOV_ID
    tokens = np.concatenate([rng.integers(3, 512, 30), vision.reshape(-1), rng.integers(3, 512, TEXT - 30)])
    mask = np.r_[np.zeros(30, bool), np.ones(vision.size, bool), np.zeros(TEXT - 30, bool)]
    return tokens, mask


def prefill_peak_mib(sampler: sample.Sampler, length: int, decode_steps: int = 256) -> float:
    padded = sample.prefill_length(length, sampler.sp, sampler.config)
    decode_slots = -(-(-(-decode_steps // sampler.sp)) // 16) * 16
    fn = sample._prefill_program(sampler.config, sampler.mesh, decode_slots)
    sharding = NamedSharding(sampler.mesh, logical_to_spec(("batch", "length")))
    shapes = {"tokens": jnp.int32, "vision_mask": jnp.bool_, "segment_ids": jnp.int32, "positions": jnp.int32}
    inputs = {k: jax.ShapeDtypeStruct((1, padded), d, sharding=sharding) for k, d in shapes.items()}
    with activate(sampler.mesh):
        stats = fn.lower(sampler.params, inputs, jax.ShapeDtypeStruct((1, 1), jnp.int32)).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes) / 2**20


def second_turn_ratio(sampler: sample.Sampler, frames: int, answer: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    tokens, mask = prompt(frames, rng)
    question = rng.integers(3, 512, 12)
    settings = sample.SampleSettings(max_new_tokens=answer, eos_id=None)

    def cached():
        context = sampler.prefill(tokens, mask, reserve=2 * answer + 32)
        first = sampler.sample(context, settings)
        start = time.perf_counter()
        second = sampler.sample(sampler.extend(first.context, question), settings)
        return time.perf_counter() - start, first.tokens, second

    def recomputed(first_answer):
        conversation = np.concatenate([tokens, first_answer, question])
        masks = [np.r_[mask, np.zeros(len(conversation) - len(mask), bool)]]
        start = time.perf_counter()
        sampler.generate([conversation], settings, vision_masks=masks)
        return time.perf_counter() - start

    cached()  # compile
    reuse, first_answer, _ = cached()
    recomputed(first_answer)  # compile
    return reuse, recomputed(first_answer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="64,128,256", help="frame counts of the memory sweep")
    parser.add_argument("--run-frames", default="64", help="frame counts whose prefill is also run and timed")
    parser.add_argument("--sp", type=int, default=8, help="devices of the ring")
    parser.add_argument("--turn-frames", type=int, default=64, help="frames of the first turn (figure 2)")
    parser.add_argument("--answer", type=int, default=16, help="answer tokens a turn (figure 2)")
    args = parser.parse_args(argv)
    frames = [int(f) for f in args.frames.split(",")]
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=1 << 17, rope_theta=50000.0,
                                 dtype="float32", param_dtype="float32")
    with tempfile.TemporaryDirectory() as ckpt:
        checkpoint.save_params(ckpt, init_params(config, jax.random.key(0)), config)
        sampler = sample.Sampler(ckpt, sp=args.sp)
        print(f"1. prefill over sp={args.sp} ({jax.devices()[0].platform}, tiny model, fp32)")
        first = None
        for f in frames:
            length = TEXT + 257 * f
            mib = prefill_peak_mib(sampler, length)
            first = first or mib / f
            line = f"  {f:4d} frames ({length:6d} tokens): peak {mib:8.1f} MiB per device ({mib / f / first:.2f}x per frame)"
            if str(f) in args.run_frames.split(","):
                tokens, mask = prompt(f, np.random.default_rng(0))
                sampler.prefill(tokens, mask)  # compile
                start = time.perf_counter()
                context = sampler.prefill(tokens, mask)
                jax.block_until_ready(context.state.cache)
                line += f", wall {time.perf_counter() - start:.1f} s"
            print(line, flush=True)
        reuse, again = second_turn_ratio(sampler, args.turn_frames, args.answer)
        print(f"2. second turn after {args.turn_frames} frames, {args.answer} answer tokens: cache reuse {reuse:.2f} s, "
              f"prefill again {again:.2f} s, ratio {reuse / again:.3f}")


if __name__ == "__main__":
    main()
