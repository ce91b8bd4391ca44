"""``lwm data books``: raw books → tokenized, length-bucketed, packed ArrayRecord datasets.

read, validate and drop duplicate ids (:mod:`pipelines.sources`, with the JSON
lines / Parquet / text parser of :mod:`schemas.raw`) → tokenize in batches
(one tokenizer per worker, loaded in ``setup``) with explicit BOS/EOS → for every
bucket holding the document's length: cut into pieces of at most L → the shared
packed-dataset writer (:mod:`pipelines.dataset`).

Runs on any Beam runner; :func:`run` picks an offline local runner by default.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import packing
from pipelines.buckets import Bucket
from pipelines.dataset import ALL_BUCKETS, NAMESPACE, DatasetSpec, WritePackedDatasets
from pipelines.sources import ReadUnique
from pipelines.text_tokenizer import SpecialTokens, TextTokenizer
from schemas import raw

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BooksConfig:
    """Everything a books job needs; recorded in every manifest it writes."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: str
    buckets: tuple[Bucket, ...]
    name: str = "books"
    text_weight: float = 1.0
    special: SpecialTokens = SpecialTokens()
    tokenize_batch: int = 32
    pack_groups: int = 16
    shard_bytes: int = 256 << 20
    num_shards: int | None = None

    def manifest_config(self) -> dict:
        fields = dataclasses.asdict(self)
        del fields["output"]  # where a dataset lives is not part of what it is
        fields["buckets"] = [b.spec() for b in self.buckets]
        fields["inputs"] = list(self.inputs)
        return fields


class Tokenize(beam.DoFn):
    """Batches of documents → (id, framed token ids); the tokenizer is loaded once per worker."""

    def __init__(self, tokenizer_path: str, special: SpecialTokens):
        self.tokenizer_path = tokenizer_path
        self.special = special

    def setup(self):
        self.tokenizer = TextTokenizer(self.tokenizer_path)
        self.tokens = Metrics.counter(NAMESPACE, "tokens")

    def process(self, batch: Sequence[raw.Document]):
        ids = self.tokenizer.encode_batch([d.text for d in batch])
        for document, row in zip(batch, ids):
            framed = self.tokenizer.frame(row, self.special)
            self.tokens.inc(len(framed))
            yield document.id, framed


def assign_buckets(item, buckets: Sequence[Bucket], text_weight: float):
    """(id, tokens) → ``(seq_len, Segment)`` pieces for every bucket holding it, and counts."""
    doc_id, tokens = item
    segment = packing.text_segment(doc_id, tokens, text_weight)
    for bucket in buckets:
        place = bucket.place(len(tokens))
        if place != "in":
            yield beam.pvalue.TaggedOutput("counts", ((bucket.seq_len, place), 1))
            continue
        pieces = packing.cut(segment, bucket.seq_len)
        yield beam.pvalue.TaggedOutput("counts", ((bucket.seq_len, "documents"), 1))
        yield beam.pvalue.TaggedOutput("counts", ((bucket.seq_len, "segments"), len(pieces)))
        for piece in pieces:
            yield bucket.seq_len, piece


def build(pipeline: beam.Pipeline, config: BooksConfig, tokenizer: TextTokenizer):
    """Add the books job to ``pipeline``; returns the PCollection of manifest paths."""
    inputs = pipeline | "ReadInputs" >> ReadUnique(config.inputs, raw.iter_documents)
    dead_letters = inputs["dead_letters"] | "ForAllBuckets" >> beam.Map(lambda d: (ALL_BUCKETS, d))
    bucketed = (
        inputs["records"]
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.tokenize_batch)
        | "Tokenize" >> beam.ParDo(Tokenize(config.tokenizer, config.special))
        | "Bucket"
        >> beam.FlatMap(assign_buckets, config.buckets, config.text_weight).with_outputs("counts", main="segments")
    )
    spec = DatasetSpec.for_job("books", config, tokenizer)
    return {
        "segments": bucketed.segments,
        "counts": bucketed.counts,
        "dead_letters": dead_letters,
        "input_examples": inputs["input_examples"],
    } | "WriteDatasets" >> WritePackedDatasets(spec)


def run(config: BooksConfig, options: PipelineOptions) -> beam.runners.runner.PipelineResult:
    """Run the books job to completion with ``options`` (see :mod:`pipelines.runner`)."""
    tokenizer = TextTokenizer(config.tokenizer)
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline, config, tokenizer)
    return pipeline.result
