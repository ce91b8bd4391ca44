"""``lwm data video-needle``: training exercises in the exact form of ``lwm eval video-needle``.

What ``lwm data chat-qa --generator needle`` is to the text needle, this job is to the
video needle. The haystack videos (video-text inputs; their captions are not used) are
decoded and VQGAN-encoded once by the video-text job's own transforms, and every needle
picture (``trainer.evaluation.synthetic_videos.needle_picture``) with them; the codes
form one pool (haystack frames ordered by example id). Each of ``count`` exercises is then
made from the pool with no further encoding:

1. the eval's own trial builder (``trainer.evaluation.video_needle.build_trial``) lays out
   ``frames`` frames (one of ``--frames`` at random), the needle at a random frame
   index, and the question with lettered options, in LWM's vision chat layout;
2. the answer (``pipelines.tokens.prompts.video_needle_answer``, the right option as the
   question lists it) and EOS follow, and only they carry loss.

Exercises are seeded by (``--seed``, index), so a rerun writes the same records; keep
the seed (and the videos) apart from the eval's, as the demo does. Bad haystack
videos become dead letters as in the video-text job; an exercise longer than every
bucket is refused before the job starts.
"""

from __future__ import annotations

import dataclasses
import random

import apache_beam as beam
import numpy as np

from pipelines.kit.job import Job, check_inputs, check_tokenizer
from pipelines.kit.output import OutputConfig
from pipelines.kit.packed_writer import WritePackedDatasets, route
from pipelines.kit.packing import Segment
from pipelines.tokens.prompts import (VIDEO_NEEDLE_LETTERS, check_video_needle_counts, video_needle_answer,
                                      video_needle_question)
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import Markers, Turn, conversation
from pipelines.vision import vision_text
from pipelines.vision.video_text import VIDEO_RENAMES, VideoMedia
# The trainer's video needle (its trial builder, needle pictures) is imported where exercises are made,
# so that building the `lwm data` CLI imports no trainer code.
from schemas import flags, raw_vision
from schemas.raw import DeadLetter

JOB_NAME = "video-needle"
NEEDLE_SOURCE = "<needle picture>"  # the path of the pool's needle entries, beside the haystack videos' examples


@dataclasses.dataclass(frozen=True)
class VideoNeedleDataConfig:
    """A video-needle exercise job's config; recorded in every manifest it writes."""

    inputs: tuple[str, ...] = flags.field(flag="input", metavar="GLOB")
    """Haystack videos: video-text inputs (id, caption, inline video bytes or a 'path'/'url'); captions are not used."""
    tokenizer: str = flags.field()
    """SentencePiece .model file for the question and answer text."""
    vqgan: str = flags.field()
    """VQGAN weights directory (lwm convert vqgan-import): the one the eval will use."""
    output: OutputConfig = flags.field()
    media: VideoMedia = VideoMedia()
    special: SpecialTokens = SpecialTokens()
    count: int = 1000
    """Exercises to write."""
    frames: tuple[int, ...] = flags.field((2, 3), parse=flags.number_list(int), metavar="N,...")
    """Frames per exercise (the needle one of them): each exercise takes one of these at random."""
    options: int = 4
    """Lettered options per question (the needle and needles of other shapes)."""
    seed: int = 1
    """Seed of the exercises (the eval's default seed is 0: keep them apart)."""
    encode_batch: int = flags.field(16, record=False)
    """Frames per VQGAN call (codes do not depend on it)."""

    def __post_init__(self):
        check_video_needle_counts(self.frames, self.options)
        if self.count < 1 or self.encode_batch < 1:
            raise ValueError(f"count and encode_batch must be >= 1, got {self.count}, {self.encode_batch}")

    @property
    def job(self) -> str:
        return JOB_NAME


@dataclasses.dataclass(frozen=True)
class Pool:
    """Every frame an exercise draws from: haystack codes ``[M, 16, 16]`` and each needle kind's ``[16, 16]``."""

    haystack: np.ndarray
    needles: dict[tuple[str, str], np.ndarray]


def make_pool(coded) -> Pool:
    """``(example, codes)`` pairs of the encoded haystack videos and needle pictures → the :class:`Pool`."""
    haystack = sorted((example.id, codes) for example, codes in coded if example.path != NEEDLE_SOURCE)
    if not haystack:
        raise ValueError("no haystack frames: no input video could be read and decoded (lwm data video-text on the "
                         "same inputs names each one's reason)")
    needles = {tuple(example.id.split(":")): codes[0] for example, codes in coded if example.path == NEEDLE_SOURCE}
    return Pool(np.concatenate([codes for _, codes in haystack]), needles)


def exercise(index: int, pool: Pool, encode, markers: Markers, config: VideoNeedleDataConfig) -> Segment:
    """Exercise ``index``: an eval trial (random frame count and needle position) + answer + EOS, loss on
    the answer and EOS only."""
    from trainer.evaluation.video_needle import build_trial

    rng = random.Random(f"{config.seed}/video-needle-exercise/{index}")
    frames = rng.choice(config.frames)
    position = rng.randrange(frames)
    trial = build_trial(pool.haystack, lambda shape, colour: pool.needles[shape, colour], encode, markers,
                        options=config.options, rng=rng, frames=frames, depth=position / (frames - 1),
                        round_index=index)
    option = trial.options[VIDEO_NEEDLE_LETTERS.index(trial.expected)]
    answer = np.concatenate([np.asarray(encode(video_needle_answer(trial.expected, option)), np.int32),
                             np.array([markers.eos], np.int32)])
    tokens = np.concatenate([trial.tokens, answer])
    weights = np.concatenate([np.zeros(len(trial.tokens), np.float32), np.ones(len(answer), np.float32)])
    vision_mask = np.concatenate([trial.vision_mask, np.zeros(len(answer), bool)])
    return Segment((f"video-needle-{index:08d}", 0), tokens, vision_mask, weights)


class MakeExercises(beam.DoFn):
    """Exercise index → its segment routed to the buckets holding it (counts, ``too_long`` dead letters)."""

    def __init__(self, config: VideoNeedleDataConfig):
        self.config = config

    def setup(self):
        self.tokenizer = TextTokenizer(self.config.tokenizer)
        self.markers = Markers.from_tokenizer(self.tokenizer, self.config.special)

    def process(self, index: int, pool: Pool):
        segment = exercise(index, pool, self.tokenizer.encode, self.markers, self.config)
        source = f"exercise {index}"

        def fit(bucket):
            if len(segment) > bucket.seq_len:
                return DeadLetter(segment.key[0], "too_long", f"{len(segment)} tokens > {bucket.seq_len}", source)
            return [segment]

        yield from route(len(segment), self.config.output.buckets, fit)


def _needle_frames(kind: tuple[str, str]):
    from trainer.evaluation.synthetic_videos import needle_picture

    shape, colour = kind
    example = raw_vision.VisionExample(f"{shape}:{colour}", "", NEEDLE_SOURCE, 0)
    return example, needle_picture(shape, colour)[None]


def build(pipeline: beam.Pipeline, config: VideoNeedleDataConfig):
    """Add the job to ``pipeline``; returns the PCollection of manifest paths."""
    from trainer.evaluation.video_needle import needle_kinds

    frames, dead_letters, input_examples = vision_text.read_and_decode(pipeline, config)
    needles = pipeline | "NeedleKinds" >> beam.Create(needle_kinds()) | "NeedlePictures" >> beam.Map(_needle_frames)
    pool = (
        vision_text.encode((frames, needles) | "AllFrames" >> beam.Flatten(), config)
        | "Gather" >> beam.combiners.ToList()
        | "Pool" >> beam.Map(make_pool)
    )
    made = (
        pipeline
        | "Indices" >> beam.Create(range(config.count))
        | "Exercises" >> beam.ParDo(MakeExercises(config), pool=beam.pvalue.AsSingleton(pool)).with_outputs(
            "counts", "dead_letters", main="segments")
    )
    return {
        "segments": made.segments,
        "counts": made.counts,
        "dead_letters": (dead_letters, made.dead_letters) | "AllDeadLetters" >> beam.Flatten(),
        "input_examples": input_examples,
    } | "WriteDatasets" >> WritePackedDatasets(vision_text.dataset_spec(config))


def longest_exercise(config: VideoNeedleDataConfig, tokenizer: TextTokenizer) -> int:
    """An upper bound of an exercise's tokens: the most frames, every option the longest needle name."""
    from trainer.evaluation.synthetic_videos import needle_name
    from trainer.evaluation.video_needle import needle_kinds

    name = max((needle_name(*kind) for kind in needle_kinds()), key=lambda n: len(tokenizer.encode(n)))
    question = video_needle_question([name] * config.options)
    prompt, _ = conversation([Turn("user", question, vision=True)], np.zeros((max(config.frames), 16, 16), np.int32),
                             tokenizer.encode, Markers.from_tokenizer(tokenizer, config.special))
    return len(prompt) + len(tokenizer.encode(video_needle_answer("A", name))) + 1


def check(config: VideoNeedleDataConfig) -> tuple[int, int]:
    """Tokenizer, VQGAN weights, inputs, and that the longest exercise fits a bucket, before any output is
    touched; returns the inputs' (files, bytes)."""
    tokenizer = check_tokenizer(config.tokenizer)
    vision_text.check_vqgan(config.vqgan)
    longest, largest = longest_exercise(config, tokenizer), max(b.seq_len for b in config.output.buckets)
    if longest > largest:
        raise ValueError(f"exercises of {max(config.frames)} frames take up to {longest} tokens, more than the "
                         f"largest bucket ({largest}); use fewer --frames or longer buckets")
    return check_inputs(config.inputs)


JOB = Job(JOB_NAME, VideoNeedleDataConfig, build, check, help=(
    "haystack videos + needle pictures → video needle-in-a-haystack exercises in the eval's layout, loss on the "
    "answer → packed ArrayRecord shards"),
    renames=VIDEO_RENAMES,
    examples=(
        "lwm data video-needle --input raw/video_text/video_text.jsonl --vqgan vqgan/ --tokenizer tokenizer.model "
        "--output data/video_needle --seq-len 1024 --frames 2,3 --fps 2 --count 2000",
        "lwm data video-needle --input 'clips/*.jsonl' --vqgan vqgan/ --tokenizer tokenizer.model "
        "--output data/video_needle --buckets 8192,32768 --frames 16,64 --fps 1 --seed 5",
    ))
run = JOB.run
