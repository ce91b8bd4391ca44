"""The Beam job behind ``lwm data image-text`` and ``lwm data video-text`` (one code path for both).

read (JSON lines / Parquet, any Beam filesystem; :mod:`schemas.raw_vision`) → validate
(dead letters) → drop duplicate ids (the first by path and line is kept) → fetch and
decode the media (inline bytes or a path on any Beam filesystem; ``pipelines.tokens.media``,
whose ``MediaError`` becomes a dead letter with its reason, so a bad file never crashes
or stalls the job) → batch frames across examples (``BatchElements``, sized in frames)
→ VQGAN encode (loaded once per worker in ``setup``; every device call the same batch
shape, so there is one compiled program and codes do not depend on how examples were
batched) → tokenize captions → LWM layout (:mod:`pipelines.tokens.vision_layout`) → for every
bucket holding the example: the whole segment if it fits, else (``resample_to_fit``)
the most uniformly spaced frames that fit, else a ``too_long`` dead letter for that
bucket: a vision span is never cut → the shared packed-dataset writer
(:mod:`pipelines.kit.packed_writer`).

Images are one-frame videos here; what differs between the two jobs is the media
(:class:`pipelines.vision.image_text.ImageMedia`, :class:`pipelines.vision.video_text.VideoMedia`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
from typing import Any, Protocol, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import flags
from pipelines.tokens import vision_layout
from pipelines.kit.packed_writer import ALL_BUCKETS, DatasetSpec, WritePackedDatasets, route
from pipelines.kit.job import check_inputs, check_tokenizer
from pipelines.tokens.media import MediaError, sample_frame_indices
from pipelines.kit.naming import METRICS_NAMESPACE
from pipelines.kit.output import OutputConfig
from pipelines.kit.sources import ReadUnique, count_dead_letter
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import Markers
from pipelines.vision import examples
from pipelines.vision.examples import LayoutConfig
from schemas import manifest as manifest_lib
from schemas import raw_vision
from schemas.raw import DeadLetter

log = logging.getLogger(__name__)
# The VQGAN weights directory's files (pipelines.tokens.vqgan.CONFIG_FILE, PARAMS_FILE); named here so that
# building the CLI does not import JAX.
VQGAN_FILES = ("config.json", "params.safetensors")


class Media(Protocol):
    """What a job's media kind provides: its name, the input field of inline bytes, and decoding."""

    name: str  # "image" or "video": the input field, the layout's wording, the job "{name}-text"
    takes_paths: bool  # decode() reads local files by path (no copy into memory first)

    def decode(self, source: bytes | str) -> np.ndarray:
        """Encoded bytes (or a local path) → uint8 RGB frames [F, 256, 256, 3]; raises ``MediaError``."""

    def config(self) -> dict[str, Any]:
        """The decoding options, recorded in the manifest."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Everything an image-text or video-text job needs; recorded in every manifest it writes.

    The two jobs' configs (:class:`pipelines.vision.image_text.ImageTextConfig`,
    :class:`pipelines.vision.video_text.VideoTextConfig`) fix ``media`` to their kind.
    """

    inputs: tuple[str, ...] = flags.field(flag="input", metavar="GLOB")
    """Input files: .jsonl/.json/.parquet (.gz) with id, caption, and inline media bytes (base64 in JSON)
    or a 'path'/'url' (local or gs://; relative to the input file)."""
    tokenizer: str = flags.field()
    """SentencePiece .model file for captions and layout text."""
    vqgan: str = flags.field()
    """VQGAN weights directory (lwm convert vqgan-import)."""
    output: OutputConfig = flags.field()
    media: Media = flags.field()
    layout: LayoutConfig = LayoutConfig()
    special: SpecialTokens = SpecialTokens()
    resample_to_fit: bool = False
    """Keep the most evenly spaced frames that fit a bucket instead of dead-lettering a too_long video."""
    min_frames: int = 1
    """With --resample-to-fit, the fewest frames to keep."""
    encode_batch: int = flags.field(16, record=False)
    """Frames per VQGAN call (batched across examples; codes do not depend on it)."""

    def __post_init__(self):
        if self.encode_batch < 1 or self.min_frames < 1:
            raise ValueError(f"encode_batch and min_frames must be >= 1, got {self.encode_batch}, {self.min_frames}")

    @property
    def job(self) -> str:
        return f"{self.media.name}-text"


def fetch(example: raw_vision.VisionExample, local_paths: bool) -> bytes | str:
    """The example's media: inline bytes, a local path (if the decoder takes paths), or the fetched bytes."""
    if example.media is not None:
        return example.media
    location = example.location
    if not FileSystems.exists(location):
        raise MediaError("missing_file", location)
    if local_paths and FileSystems.get_scheme(location) is None:  # a plain local path
        return location
    with FileSystems.open(location, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable(detail: str) -> str:
    """An arbitrary exception's message without object addresses (``<… object at 0x7f…>``), so reruns
    give the same dead letters."""
    return _ADDRESS.sub("", detail)


class DecodeMedia(beam.DoFn):
    """Example → (example without its inline bytes, uint8 frames); failures → tagged dead letters."""

    def __init__(self, media: Media):
        self.media = media

    def setup(self):
        self.frames = Metrics.counter(METRICS_NAMESPACE, "frames_decoded")

    def process(self, example: raw_vision.VisionExample):
        try:
            frames = self.media.decode(fetch(example, self.media.takes_paths))
        except MediaError as error:
            letter = DeadLetter(example.id, error.reason, error.detail, example.source)
            yield beam.pvalue.TaggedOutput("dead_letters", letter)
            return
        except Exception as error:  # filesystem errors, anything else: one dead letter, not a crash
            detail = _stable(f"{example.location or 'inline'}: {type(error).__name__}: {error}")
            yield beam.pvalue.TaggedOutput("dead_letters", DeadLetter(example.id, "unreadable_media", detail, example.source))
            return
        self.frames.inc(len(frames))
        yield dataclasses.replace(example, media=None), frames


class EncodeFrames(beam.DoFn):
    """Batches of (example, frames) → (example, int32 codes [F, 16, 16]); the VQGAN is loaded once per worker.

    The frames of a batch are padded to a multiple of ``batch_size``, so every device
    call has one shape: one compilation, and each frame's codes independent of its batch.
    """

    def __init__(self, vqgan_path: str, batch_size: int):
        self.vqgan_path = vqgan_path
        self.batch_size = batch_size

    def setup(self):
        from pipelines.tokens.vqgan import VQGAN  # JAX: imported where frames are encoded, not to build the CLI

        self.vq = VQGAN.load(self.vqgan_path, batch_size=self.batch_size)
        self.encoded = Metrics.counter(METRICS_NAMESPACE, "frames_encoded")

    def process(self, batch: Sequence[tuple[raw_vision.VisionExample, np.ndarray]]):
        if not batch:  # BatchElements emits an empty batch when its first element is over the size target
            return
        frames = np.concatenate([f for _, f in batch])
        padding = -len(frames) % self.batch_size
        padded = np.concatenate([frames, np.zeros((padding, *frames.shape[1:]), frames.dtype)])
        codes = self.vq.encode(self.vq.preprocess(padded))[: len(frames)]
        self.encoded.inc(len(frames))
        ends = np.cumsum([len(f) for _, f in batch])
        for (example, _), start, end in zip(batch, ends - [len(f) for _, f in batch], ends):
            yield example, codes[start:end]


def assign_buckets(example_id: str, source: str, parts: Sequence[vision_layout.Part], codes: np.ndarray,
                   markers: Markers, config: VisionConfig):
    """One example's ``(seq_len, Segment)`` for every bucket holding it, with counts and ``too_long`` dead letters.

    The bucket is chosen by the example's full length; one longer than the bucket's
    sequence length is resampled to fewer frames if configured, else dead-lettered.
    """
    frames = len(codes)
    length = vision_layout.text_length(parts, markers) + vision_layout.FRAME_TOKENS * frames

    def fit(bucket):
        keep = frames
        if length > bucket.seq_len:
            keep = vision_layout.frames_that_fit(parts, markers, frames, bucket.seq_len) if config.resample_to_fit else 0
            if keep < config.min_frames:
                detail = f"{length} tokens ({frames} frame(s)) > {bucket.seq_len}" + (
                    f"; fewer than {config.min_frames} frame(s) fit" if config.resample_to_fit else "")
                return DeadLetter(example_id, "too_long", detail, source)
            Metrics.counter(METRICS_NAMESPACE, "resampled").inc()
        chosen = codes if keep == frames else codes[sample_frame_indices(frames, keep)]
        return [examples.assemble((example_id, 0), parts, chosen, markers, config.layout)]

    return route(length, config.output.buckets, fit)


class LayOut(beam.DoFn):
    """(example, codes) → bucketed segments: tokenize the caption, lay out, fit each bucket."""

    def __init__(self, config: VisionConfig):
        self.config = config

    def setup(self):
        self.tokenizer = TextTokenizer(self.config.tokenizer)
        self.markers = Markers.from_tokenizer(self.tokenizer, self.config.special)

    def process(self, item):
        example, codes = item
        config = self.config
        parts = examples.example_parts(example.id, example.caption, config.media.name, config.layout,
                                            self.tokenizer.encode)
        yield from assign_buckets(example.id, example.source, parts, codes, self.markers, config)


def read_and_decode(pipeline: beam.Pipeline, config) -> tuple:
    """The front of a vision job (``config`` has ``inputs`` and ``media``): ``(frames, dead_letters,
    input_examples)``, where ``frames`` are (example, uint8 frames) pairs and ``dead_letters`` every record
    the read or the decoder refused, counted by reason, as ``(ALL_BUCKETS, letter)``."""
    parse = functools.partial(raw_vision.iter_examples, media_field=config.media.name)
    inputs = pipeline | "ReadInputs" >> ReadUnique(config.inputs, parse)
    decoded = inputs["records"] | "Decode" >> beam.ParDo(DecodeMedia(config.media)).with_outputs("dead_letters", main="frames")
    dead_letters = (
        (inputs["dead_letters"], decoded.dead_letters | "CountMediaDeadLetters" >> beam.Map(count_dead_letter))
        | "EarlyDeadLetters" >> beam.Flatten()
        | "ForAllBuckets" >> beam.Map(lambda d: (ALL_BUCKETS, d))
    )
    return decoded.frames, dead_letters, inputs["input_examples"]


def encode(frames, config):
    """(example, uint8 frames) → (example, int32 codes [F, 16, 16]) with ``config.vqgan``, in batches of
    ``config.encode_batch`` frames (every call is padded to that many anyway)."""
    return (
        frames
        | "Batch" >> beam.BatchElements(min_batch_size=config.encode_batch, max_batch_size=config.encode_batch,
                                        element_size_fn=lambda item: len(item[1]))
        | "Encode" >> beam.ParDo(EncodeFrames(config.vqgan, config.encode_batch))
    )


def dataset_spec(config) -> DatasetSpec:
    """The packed-dataset spec of a vision job: its config, tokenizer, VQGAN fingerprint and media options."""
    return DatasetSpec.for_job(config.job, config, TextTokenizer(config.tokenizer), vqgan_sha256=vqgan_sha256(config.vqgan),
                               media={"kind": config.media.name, **config.media.config()})


def build(pipeline: beam.Pipeline, config: VisionConfig):
    """Add the job to ``pipeline``; returns the PCollection of manifest paths."""
    frames, dead_letters, input_examples = read_and_decode(pipeline, config)
    bucketed = (
        encode(frames, config)
        | "LayOut" >> beam.ParDo(LayOut(config)).with_outputs("counts", "dead_letters", main="segments")
    )
    return {
        "segments": bucketed.segments,
        "counts": bucketed.counts,
        "dead_letters": (dead_letters, bucketed.dead_letters) | "AllDeadLetters" >> beam.Flatten(),
        "input_examples": input_examples,
    } | "WriteDatasets" >> WritePackedDatasets(dataset_spec(config))


def vqgan_sha256(path: str) -> str:
    """A fingerprint of VQGAN weights: sha256 over its config and params files."""
    return hashlib.sha256(
        "".join(manifest_lib.file_sha256(FileSystems.join(path, name)) for name in VQGAN_FILES).encode()
    ).hexdigest()


def check(config: VisionConfig) -> tuple[int, int]:
    """Tokenizer, VQGAN weights and inputs, before any output is touched; returns the inputs' (files, bytes)."""
    check_tokenizer(config.tokenizer)
    check_vqgan(config.vqgan)
    return check_inputs(config.inputs)


def check_vqgan(path: str) -> None:
    """A one-line ValueError unless ``path`` holds VQGAN weights."""
    missing = [name for name in VQGAN_FILES if not FileSystems.exists(FileSystems.join(path, name))]
    if missing:
        raise ValueError(f"--vqgan {path!r} holds no {', '.join(missing)}: not VQGAN weights "
                         "(see lwm convert vqgan-import)")
