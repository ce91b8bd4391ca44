"""``lwm data lwm-jsonl``: JSON lines prepared for LWM's own trainer → packed, bucketed datasets.

LWM's vision-language data (its ``json_vision`` dataset, ``docs/data.md`` and
``lwm/data.py`` in LWM's repository) is one JSON object per line whose vision fields
already hold VQ codes and whose ``fields`` entry (``--fields-key``) spells the layout:

* comma-separated fields, concatenated in order;
* a field in brackets (``[question]``) gets no loss;
* ``a+b`` joins the text fields ``a`` and ``b`` with a space (``--subfield-separator``);
* ``<|bos|>`` / ``<|eos|>`` insert those ids;
* a field whose name contains ``vision`` is a list of codes, 256 per frame: laid out as
  ``<vision>``, each frame's codes followed by ``<eof>`` (the last frame's by ``<eov>``),
  ``</vision>``, with ``vision_mask`` on the codes and markers
  (:mod:`pipelines.tokens.vision_layout`); ``--max-n-frames`` keeps LWM's linspace
  choice of frames (:func:`pipelines.tokens.media.sample_frame_indices`);
* ``fields`` may be a list of specs: ``--fields-index`` picks one, else one is chosen
  per line as LWM chooses it, ``random.Random(line index).choice(specs)`` with the
  0-based line index in its file.

Each example is one BOS first (no loss) and one EOS last (with loss), as the released
models were trained; text is encoded without special tokens (LWM's later tokenizer
added a BOS before every text field, which is not reproduced). A line that cannot be
laid out is a dead letter: ``missing_field``, ``bad_fields`` (the spec is not a string
or list of strings), ``bad_vision`` (codes not a list of integers in [0, 8192), or
not a whole number of 256-code frames).

read (:class:`pipelines.kit.sources.ReadUnique`; id = ``path:line``) → lay out
(:func:`lay_out_line`, pure) → every bucket holding the example (a text-only example
longer than L is cut like a book; one with vision is ``too_long``) → the shared
packed-dataset writer.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Iterator

import apache_beam as beam
import numpy as np

from pipelines.kit import packing
from pipelines.kit.job import Job, check_inputs, check_tokenizer
from pipelines.kit.output import OutputConfig
from pipelines.kit.packed_writer import ALL_BUCKETS, DatasetSpec, WritePackedDatasets, route
from pipelines.kit.sources import ReadUnique
from pipelines.tokens.media import sample_frame_indices
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import Markers, vision_tokens
from schemas import flags, raw, vocab
from schemas.raw import DeadLetter

REASONS = raw.COMMON_REASONS + ("missing_field", "bad_fields", "bad_vision")


@dataclasses.dataclass(frozen=True)
class LwmJsonlConfig:
    """Everything an lwm-jsonl job needs; recorded in every manifest it writes."""

    inputs: tuple[str, ...] = flags.field(flag="input", metavar="GLOB")
    """Input files: LWM's JSON lines (.jsonl/.json, optionally .gz; local or gs://, globs allowed)."""
    tokenizer: str = flags.field()
    """SentencePiece .model file (Llama-2's tokenizer.model for LWM's data)."""
    output: OutputConfig = flags.field()
    fields_key: str = "fields"
    """The key of each line holding its fields spec (LWM's fields_from_example)."""
    fields_index: int = -1
    """Which spec of a list to use; -1: one per line, chosen as LWM does (seeded by the line index)."""
    max_n_frames: int = -1
    """Keep at most this many frames per vision field (LWM's linspace choice); -1: all."""
    subfield_separator: str = " "
    """Text joining the fields of ``a+b``."""

    def __post_init__(self):
        if self.max_n_frames == 0 or self.max_n_frames < -1:
            raise ValueError(f"max_n_frames must be -1 (all) or at least 1, got {self.max_n_frames}")
        if self.fields_index < -1:
            raise ValueError(f"fields_index must be -1 (chosen per line) or at least 0, got {self.fields_index}")


@dataclasses.dataclass(frozen=True)
class Line:
    """One JSON object of an input file and where it came from (1-based line)."""

    fields: dict
    path: str
    index: int

    @property
    def id(self) -> str:
        return self.source

    @property
    def source(self) -> str:
        return raw.source_of(self.path, self.index)


def _line(fields: Any, path: str, index: int) -> Line | DeadLetter:
    if not isinstance(fields, dict):
        return DeadLetter("", "not_an_object", f"expected a JSON object, got {type(fields).__name__}",
                          raw.source_of(path, index))
    return Line(fields, path, index)


def parse(stream, path: str, first_line: int = 1) -> Iterator[Line | DeadLetter]:
    """Every line of one input file (or of a range of its lines)."""
    return raw.iter_records(stream, path, _line, (), first_line=first_line)


def choose_spec(specs: Any, line_index: int, fields_index: int) -> str | None:
    """The fields spec of a line: itself, or one of a list (``fields_index``, else LWM's seeded choice)."""
    if isinstance(specs, (list, tuple)) and specs:
        specs = specs[fields_index] if 0 <= fields_index < len(specs) else (
            random.Random(line_index).choice(specs) if fields_index < 0 else None)
    return specs if isinstance(specs, str) and specs else None


def _codes(value: Any, name: str, max_n_frames: int) -> np.ndarray | str:
    """The frames' codes [F, 16, 16] of a vision field, or why not."""
    if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        return f"{name!r} is not a list of integer codes"
    per_frame = vocab.TOKENS_PER_FRAME
    if not value or len(value) % per_frame:
        return f"{name!r} holds {len(value)} codes, not a positive multiple of {per_frame}"
    codes = np.asarray(value, np.int64)
    if codes.min() < 0 or codes.max() >= vocab.VISION_CODEBOOK_SIZE:
        bad = codes.max() if codes.max() >= 0 else codes.min()
        return f"{name!r} holds code {bad}, outside [0, {vocab.VISION_CODEBOOK_SIZE})"
    frames = codes.reshape(-1, per_frame)
    return frames[sample_frame_indices(len(frames), max_n_frames)].reshape(-1, 16, 16)


def lay_out_line(fields: dict, line_index: int, encode: Callable[[str], np.ndarray], markers: Markers,
                 config: LwmJsonlConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[str, str]:
    """(tokens int32, vision_mask bool, loss_weights float32) of one line as LWM's processor makes it,
    or (dead-letter reason, detail). ``line_index`` is 0-based within the file."""
    spec = choose_spec(fields.get(config.fields_key), line_index, config.fields_index)
    if spec is None:
        if config.fields_key not in fields:
            return "missing_field", f"no {config.fields_key!r} field"
        return "bad_fields", (f"{config.fields_key!r} is not a non-empty string or list of them "
                              f"(fields_index {config.fields_index})")
    pieces = [([markers.bos], False, 0.0)]  # (ids, is vision, loss weight)
    for field in spec.split(","):
        weight = 1.0
        if field.startswith("[") and field.endswith("]"):
            field, weight = field[1:-1], 0.0
        if field in ("<|bos|>", "<|eos|>"):
            pieces.append(([markers.bos if field == "<|bos|>" else markers.eos], False, weight))
        elif "vision" in field:
            if field not in fields:
                return "missing_field", f"no {field!r} field"
            codes = _codes(fields[field], field, config.max_n_frames)
            if isinstance(codes, str):
                return "bad_vision", codes
            pieces += [(markers.vision_open, False, weight), (vision_tokens(codes), True, weight),
                       (markers.vision_close, False, weight)]
        else:
            names = field.split("+")
            missing = [n for n in names if not isinstance(fields.get(n), str)]
            if missing:
                return "missing_field", f"no text field {missing[0]!r}"
            pieces.append((encode(config.subfield_separator.join(fields[n] for n in names)), False, weight))
    pieces.append(([markers.eos], False, 1.0))
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _, _ in pieces])
    vision_mask = np.concatenate([np.full(len(ids), v) for ids, v, _ in pieces]).astype(bool)
    weights = np.concatenate([np.full(len(ids), w, np.float32) for ids, _, w in pieces])
    return tokens, vision_mask, weights


def assign_buckets(line: Line, laid_out, buckets):
    """One laid-out line → ``(seq_len, Segment)`` for every bucket holding it, counts and dead letters."""
    tokens, vision_mask, weights = laid_out
    segment = packing.Segment((line.id, 0), tokens, vision_mask, weights)

    def fit(bucket):
        if len(tokens) <= bucket.seq_len:
            return [segment]
        if not vision_mask.any():
            return packing.cut(segment, bucket.seq_len)
        return DeadLetter(line.id, "too_long", f"{len(tokens)} tokens with vision > {bucket.seq_len}", line.source)

    return route(len(tokens), buckets, fit)


class LayOut(beam.DoFn):
    """Lines → bucketed segments (the tokenizer loaded once per worker)."""

    def __init__(self, config: LwmJsonlConfig):
        self.config = config

    def setup(self):
        tokenizer = TextTokenizer(self.config.tokenizer)
        self.encode = tokenizer.encode
        self.markers = Markers.from_tokenizer(tokenizer, SpecialTokens(bos=True, eos=True))  # always, as LWM

    def process(self, line: Line):
        laid_out = lay_out_line(line.fields, line.index - 1, self.encode, self.markers, self.config)
        if isinstance(laid_out[0], str):
            yield beam.pvalue.TaggedOutput("dead_letters", (ALL_BUCKETS, DeadLetter(line.id, *laid_out, line.source)))
            return
        yield from assign_buckets(line, laid_out, self.config.output.buckets)


def build(pipeline: beam.Pipeline, config: LwmJsonlConfig):
    """Add the lwm-jsonl job to ``pipeline``; returns the PCollection of manifest paths."""
    inputs = pipeline | "ReadInputs" >> ReadUnique(config.inputs, parse)
    read_dead = inputs["dead_letters"] | "ForAllBuckets" >> beam.Map(lambda d: (ALL_BUCKETS, d))
    laid_out = inputs["records"] | "LayOut" >> beam.ParDo(LayOut(config)).with_outputs(
        "counts", "dead_letters", main="segments")
    dead_letters = (read_dead, laid_out.dead_letters) | "AllDeadLetters" >> beam.Flatten()
    spec = DatasetSpec.for_job("lwm-jsonl", config, TextTokenizer(config.tokenizer))
    return {
        "segments": laid_out.segments,
        "counts": laid_out.counts,
        "dead_letters": dead_letters,
        "input_examples": inputs["input_examples"],
    } | "WriteDatasets" >> WritePackedDatasets(spec)


def check(config: LwmJsonlConfig) -> tuple[int, int]:
    """Inputs and tokenizer, before any output is touched; returns the inputs' (files, bytes)."""
    check_tokenizer(config.tokenizer)
    return check_inputs(config.inputs)


JOB = Job("lwm-jsonl", LwmJsonlConfig, build, check,
          help="LWM's JSON lines (fields spec, VQ codes) → packed ArrayRecord shards per length bucket",
          examples=(
              "lwm data lwm-jsonl --input 'lwm_data/*.jsonl' --tokenizer tokenizer.model --output out/ --seq-len 8192",
              "lwm data lwm-jsonl --input chat.jsonl --tokenizer tokenizer.model --output out/ "
              "--buckets 32768,131072 --max-n-frames 32   # videos subsampled by LWM's linspace rule",
          ))
run = JOB.run
