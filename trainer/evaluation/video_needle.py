"""``video-needle``: a needle image among a video's frames, the long-video test after LongVA's V-NIAH.

A trial of N frames and depth d, in order:

1. **Haystack**: the frames of the haystack videos at their own rate, one after another
   (``--haystack-videos``; default: moving-shape clips from :mod:`trainer.evaluation.synthetic_videos`,
   written under ``OUT/haystack/``), decoded by the data jobs' code (``pipelines.tokens.media``).
   N − 1 of them are taken at ``sample_frame_indices`` (LWM's rule) from a seeded starting point
   (each round another one; the sequence wraps around).
2. **Needle**: a picture of another kind (a star, cross, diamond or ring of some colour on stripes,
   ``synthetic_videos.needle_picture``) inserted at frame index ``k = round(d × (N − 1))``
   (half up), so the prompt holds exactly N frames.
3. **Question**: which different thing one frame shows, with lettered options (the needle and
   needles of other shapes, in a fixed order; ``pipelines.tokens.prompts.video_needle_question``), laid out as
   ``lwm chat`` lays a video out (``vision_layout.conversation``); frames VQGAN-encoded as the jobs do.
4. **Score**: correct iff the first option letter in the greedy answer is the expected one.

Outputs ``OUT/results.jsonl`` (every trial: frames, depth, round, needle frame index, the needle's
token offset, options, expected letter, answer, correct), ``OUT/table.txt`` and ``OUT/heatmap.png``
(frames × depth). Trials are seeded by (seed, frames, depth, round): a sweep is deterministic.
Frame counts beyond the checkpoint's context are refused before anything runs, naming the largest
that fits. Chance is 1 / ``options``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
from typing import Callable, Sequence

import numpy as np

from pipelines.tokens import media
from pipelines.tokens.prompts import VIDEO_NEEDLE_LETTERS, check_video_needle_counts, video_needle_question
from pipelines.tokens.vision_layout import FRAME_TOKENS, Markers, Turn, conversation
from schemas import flags, storage
from trainer.evaluation import Target, Task, synthetic_videos
from trainer.evaluation.haystack import RESULTS, accuracies, accuracy_grid, check_depths, heatmap, table



@dataclasses.dataclass(frozen=True)
class VideoNeedleConfig:
    """One sweep: ``frames`` × ``depths`` × ``rounds`` prompts, answered greedily in batches."""

    vqgan: str = flags.field("", metavar="DIR")
    """The VQGAN the checkpoint was trained with (lwm convert vqgan-import); required."""
    frames: tuple[int, ...] = flags.field((8, 16, 32), parse=flags.number_list(int), metavar="N,...")
    """Frames per prompt (the needle one of them), comma-separated."""
    depths: tuple[float, ...] = flags.field((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), parse=flags.number_list(float), metavar="D,...")
    """Needle depths in [0, 1]: frame index round(d × (N − 1)), comma-separated."""
    rounds: int = 2
    """Trials per (frames, depth), each with another needle and haystack start."""
    options: int = 4
    """Lettered options (the needle and other needle kinds); chance is 1 / options."""
    haystack_videos: tuple[str, ...] = flags.field((), metavar="FILE")
    """Haystack video files; none: moving-shape clips the command writes under OUT/haystack."""
    seed: int = 0
    """Seed of needles, options and haystack starts."""
    max_new_tokens: int = flags.field(8, flag="max-tokens")
    """Most answer tokens (greedy, stops at EOS)."""
    batch_size: int = 8
    """Prompts sampled together."""
    sp: int = 1
    """Devices of the ring prompts and caches are split over."""

    def __post_init__(self):
        check_depths(self.depths)
        check_video_needle_counts(self.frames, self.options)
        if self.rounds < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("rounds, max_new_tokens and batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt of the sweep: its ids and vision mask, where the needle is, what answer is right."""

    frames: int
    depth: float
    round: int
    tokens: np.ndarray
    vision_mask: np.ndarray
    needle_frame: int
    needle_offset: int  # token offset of the needle frame's first code in the prompt
    options: tuple[str, ...]
    expected: str  # the right option's letter


def needle_index(frames: int, depth: float) -> int:
    """The needle's frame index: round(depth × (frames − 1)), halves rounded up."""
    return int(np.floor(depth * (frames - 1) + 0.5))


def first_letter(answer: str, options: int) -> str | None:
    """The first option letter standing alone in ``answer`` ("B", "(B)", "B." count; "Bob" does not)."""
    letters = VIDEO_NEEDLE_LETTERS[:options]
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", answer)
    return match[1] if match else None


def score(answer: str, expected: str, options: int) -> bool:
    return first_letter(answer, options) == expected


def needle_kinds() -> list[tuple[str, str]]:
    """Every needle picture's (shape, colour), in a fixed order."""
    return [(s, c) for s in synthetic_videos.NEEDLE_SHAPES for c in sorted(synthetic_videos.COLOURS)]


def draw_needle(options: int, rng: random.Random) -> tuple[tuple[str, str], tuple[str, ...], str]:
    """The needle (shape, colour), the option names and the expected letter.

    Distractors take the needle's other shapes, each shape once before any twice, so the shape alone
    tells the needle apart. Options are listed in :func:`needle_kinds`' fixed order (shape, then
    colour), as V-NIAH asks each needle a multiple-choice question of fixed options: what the sweep
    measures is whether the model finds and recognises the needle frame, not whether it can look a
    name up in a shuffled list (a second skill, and one a small demo model does not learn in minutes)."""
    kinds = needle_kinds()
    needle = rng.choice(kinds)
    others = [k for k in kinds if k[0] != needle[0]]
    others = rng.sample(others, len(others))
    seen = {k: [o for o in others if o[0] == k[0]].index(k) for k in others}  # how many of its shape precede it
    choices = sorted([needle, *sorted(others, key=seen.get)[:options - 1]], key=kinds.index)
    names = tuple(synthetic_videos.needle_name(*k) for k in choices)
    return needle, names, VIDEO_NEEDLE_LETTERS[choices.index(needle)]


def trial_rng(config: VideoNeedleConfig, frames: int, depth: float, round_index: int) -> random.Random:
    """The random draws of one sweep cell's trial: seeded by (seed, frames, depth, round)."""
    return random.Random(f"{config.seed}/video-needle/{frames}/{depth}/{round_index}")


def build_trial(haystack_codes: np.ndarray, needle_codes: Callable[[str, str], np.ndarray], encode,
                markers: Markers, *, options: int, rng: random.Random, frames: int, depth: float,
                round_index: int) -> Trial:
    """The prompt of one trial: ``frames - 1`` haystack frames' codes (``haystack_codes [M, 16, 16]``, from
    a starting point ``rng`` draws) with the needle's (``needle_codes(shape, colour)``, drawn with ``options``
    lettered options) inserted at :func:`needle_index`. The eval draws with :func:`trial_rng`; the
    ``video-needle`` data job with its own seeds."""
    needle, options, expected = draw_needle(options, rng)
    total = len(haystack_codes)
    start = rng.randrange(total)
    span = max(total, frames - 1)  # too few haystack frames: the sequence wraps around
    picked = (start + media.sample_frame_indices(span, frames - 1)) % total
    k = needle_index(frames, depth)
    codes = np.concatenate([haystack_codes[picked[:k]], needle_codes(*needle)[None], haystack_codes[picked[k:]]])
    question = video_needle_question(options)
    tokens, mask = conversation([Turn("user", question, vision=True)], codes, encode, markers)
    offset = int(np.flatnonzero(mask)[0]) + k * FRAME_TOKENS
    return Trial(frames, depth, round_index, tokens, mask, k, offset, options, expected)


def haystack_frames(paths: Sequence[str], out: str | None) -> np.ndarray:
    """uint8 frames ``[M, 256, 256, 3]`` of the haystack videos at their own rate, in order; without paths,
    moving-shape clips written (once) under ``out/haystack`` (or a temporary directory)."""
    if not paths:
        root = pathlib.Path(out or os.path.join(os.environ.get("TMPDIR", "/tmp"), "lwm-video-needle")) / "haystack"
        listing = root / "video_text.jsonl"
        if not listing.exists():
            synthetic_videos.write_video_text(root, 8, seed=7, frames=16, fps=8)
        paths = [str(root / json.loads(line)["path"]) for line in listing.read_text().splitlines()]
    config = media.VideoConfig(native=True, max_duration_s=24 * 3600.0)
    frames = []
    for path in paths:
        try:
            frames.append(media.decode_video(path, config))
        except media.MediaError as error:
            raise ValueError(f"haystack video {path}: {' '.join(str(error).split())}") from None
    return np.concatenate(frames)


def run(sampler, tokenizer, vqgan, config: VideoNeedleConfig, out: str, *,
        progress: Callable[[str], None] = print) -> list[dict]:
    """The sweep on a loaded sampler, tokenizer and VQGAN; writes ``out`` (module docstring)."""
    from pipelines.tokens.text_tokenizer import SpecialTokens
    from trainer.inference.sampler import SampleSettings
    from trainer.inference.vision_chat import check_vision_head, frames_that_fit

    check_vision_head(sampler.config)
    markers = Markers.from_tokenizer(tokenizer, SpecialTokens())
    text = len(conversation([Turn("user", video_needle_question(["a red star"] * config.options), vision=True)],
                            np.zeros((1, 16, 16), np.int32), tokenizer.encode, markers)[0]) - FRAME_TOKENS + 16
    most = frames_that_fit(sampler.config, text, config.max_new_tokens, sampler.sp)
    if max(config.frames) > most:
        raise ValueError(f"{max(config.frames)} frames do not fit the checkpoint's context (max_position_embeddings "
                         f"{sampler.config.max_position_embeddings}); the largest frame count that fits is {most}")
    for n in config.frames:
        sampler.check_fits(min(config.batch_size, len(config.depths) * config.rounds), text + n * FRAME_TOKENS,
                           config.max_new_tokens)
    os.makedirs(out, exist_ok=True)
    haystack = vqgan.encode(vqgan.preprocess(haystack_frames(config.haystack_videos, out)))
    needles: dict = {}

    def needle_codes(shape, colour):
        if (shape, colour) not in needles:
            picture = synthetic_videos.needle_picture(shape, colour)
            needles[shape, colour] = vqgan.encode(vqgan.preprocess(picture[None]))[0]
        return needles[shape, colour]

    settings = SampleSettings(max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_id)
    results = []
    with open(os.path.join(out, RESULTS), "w") as stream:
        for n in config.frames:
            cell = [build_trial(haystack, needle_codes, tokenizer.encode, markers, options=config.options,
                                rng=trial_rng(config, n, d, r), frames=n, depth=d, round_index=r)
                    for d in config.depths for r in range(config.rounds)]
            for start in range(0, len(cell), config.batch_size):
                chunk = cell[start:start + config.batch_size]
                answers = sampler.generate([t.tokens for t in chunk], settings,
                                           vision_masks=[t.vision_mask for t in chunk])
                for trial, ids in zip(chunk, answers):
                    answer = tokenizer.decode(ids)
                    record = {"frames": n, "depth": trial.depth, "round": trial.round,
                              "needle_frame": trial.needle_frame, "needle_offset": trial.needle_offset,
                              "options": list(trial.options), "expected": trial.expected, "answer": answer,
                              "correct": score(answer, trial.expected, config.options)}
                    stream.write(json.dumps(record) + "\n")
                    results.append(record)
            stream.flush()
            progress(f"{n} frames: {100 * np.mean([r['correct'] for r in results if r['frames'] == n]):.0f}% "
                     f"of {len(cell)} trials correct")
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table(results, config.depths, config.frames, "frames") + "\n")
    heatmap(accuracy_grid(results, config.depths, config.frames, "frames"), config.frames, config.depths,
            os.path.join(out, "heatmap.png"),
            title=f"video needle: {config.options} options, {config.rounds} rounds", xlabel="frames")
    return results


def metrics(config: VideoNeedleConfig, out: str) -> dict[str, float]:
    """``video-needle_accuracy/{frames}``: the share of correct trials at each frame count."""
    lines = storage.read_bytes(storage.join(out, RESULTS)).decode().splitlines()
    return accuracies([json.loads(line) for line in lines if line.strip()], config.frames, "video-needle", "frames")


def metric_names(config: VideoNeedleConfig) -> tuple[str, ...]:
    return tuple(f"video-needle_accuracy/{n}" for n in config.frames)


def run_task(config: VideoNeedleConfig, target: Target, out: str) -> str:
    from pipelines.tokens.vqgan import VQGAN
    from trainer import checkpoint
    from trainer.inference.sampler import open_checked
    from trainer.inference.vision_chat import check_vision_head

    # Refused before anything loads: a missing checkpoint, one that cannot see, no VQGAN.
    check_vision_head(checkpoint.restore_model_config(checkpoint.resolve_dir(target.ckpt), target.step))
    if not config.vqgan:
        raise ValueError("video-needle needs --vqgan DIR (the VQGAN the checkpoint was trained with)")
    vqgan = VQGAN.load(config.vqgan)
    tokenizer, sampler = open_checked(target.ckpt, target.tokenizer, step=target.step, sp=config.sp)
    run(sampler, tokenizer, vqgan, config, out)
    with open(os.path.join(out, "table.txt")) as f:
        table_text = f.read()
    return (f"\nvideo needle accuracy (%), depth × frames (chance {100 / config.options:.0f}%):\n{table_text}"
            f"results: {os.path.join(out, RESULTS)}\nheatmap: {os.path.join(out, 'heatmap.png')}")


TASK = Task(
    "video-needle", VideoNeedleConfig, run_task, metrics, metric_names,
    help="video needle in a haystack (LongVA's V-NIAH): a needle image among N frames, lettered options",
    description="Take N-1 frames of the haystack videos (LWM's frame rule), insert a needle picture (a star, "
    "cross, diamond or ring on stripes) at frame round(d*(N-1)) for each depth d, ask in LWM's vision chat layout "
    "which different thing one frame shows with lettered options, and score the greedy answer (correct iff its "
    "first option letter is the right one). Writes OUT/results.jsonl, OUT/table.txt and OUT/heatmap.png "
    "(frames × depth). Deterministic for a --seed. Frame counts beyond the checkpoint's context are refused.",
    examples=(
        "lwm eval video-needle --ckpt runs/stages/chat-1024 --tokenizer tokenizer.model --vqgan vqgan_small_random "
        "--frames 2,3 --depths 0,0.5,1 --out evals/video_needle",
        "lwm eval video-needle --ckpt lwm-chat-1m/ --tokenizer lwm-chat-1m/tokenizer.model --vqgan lwm-chat-1m/vqgan "
        "--haystack-videos 'videos/*.mp4' --frames 64,256,1024 --sp 8 --out vniah/ --json",
    ))
