"""``lwm data books``: raw books → tokenized, length-bucketed, packed ArrayRecord datasets.

read, validate and drop duplicate ids (:mod:`pipelines.kit.sources`, with the JSON
lines / Parquet / text parser of :mod:`schemas.raw`) → tokenize in batches
(one tokenizer per worker, loaded in ``setup``) with explicit BOS/EOS → for every
bucket holding the document's length: cut into pieces of at most L → the shared
packed-dataset writer (:mod:`pipelines.kit.packed_writer`).

Runs on any Beam runner; :func:`run` picks an offline local runner by default.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import flags
from pipelines.kit import packing
from pipelines.kit import progress
from pipelines.kit.buckets import Bucket
from pipelines.kit.packed_writer import ALL_BUCKETS, DatasetSpec, WritePackedDatasets, route
from pipelines.kit.job import Job, check_inputs, check_tokenizer
from pipelines.kit.naming import METRICS_NAMESPACE
from pipelines.kit.output import OutputConfig
from pipelines.kit.sources import ReadUnique
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from schemas import raw

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BooksConfig:
    """Everything a books job needs; recorded in every manifest it writes."""

    inputs: tuple[str, ...] = flags.field(flag="input", metavar="GLOB")
    """Input files: .jsonl/.json/.parquet/.txt, optionally .gz (local or gs://, globs allowed)."""
    tokenizer: str = flags.field()
    """SentencePiece .model file (lwm tokenizer train, or Llama-2's tokenizer.model)."""
    output: OutputConfig = flags.field()
    text_weight: float = 1.0
    """Loss weight of text tokens baked into the records."""
    special: SpecialTokens = SpecialTokens()
    tokenize_batch: int = 32
    """Documents per SentencePiece call."""


class Tokenize(beam.DoFn):
    """Batches of documents → (id, framed token ids); the tokenizer is loaded once per worker.

    Counts ``tokenize_cpu_ms``, the CPU time of encoding (SentencePiece and the ids' arrays; the
    process's: SentencePiece encodes a batch in a thread of its own, even with one thread), so a job's
    summary shows how much of its CPU went to tokenizing and how much to the rest."""

    def __init__(self, tokenizer_path: str, special: SpecialTokens):
        self.tokenizer_path = tokenizer_path
        self.special = special

    def setup(self):
        self.tokenizer = TextTokenizer(self.tokenizer_path)
        self.tokens = Metrics.counter(METRICS_NAMESPACE, "tokens")
        self.cpu_ms = Metrics.counter(METRICS_NAMESPACE, "tokenize_cpu_ms")

    def process(self, batch: Sequence[raw.Document]):
        started = time.process_time()
        ids = self.tokenizer.encode_batch([d.text for d in batch])
        self.cpu_ms.inc(round((time.process_time() - started) * 1000))
        for document, row in zip(batch, ids):
            framed = self.tokenizer.frame(row, self.special)
            self.tokens.inc(len(framed))
            progress.add(tokens=len(framed))
            yield document.id, framed


def assign_buckets(item, buckets: Sequence[Bucket], text_weight: float):
    """(id, tokens) → ``(seq_len, Segment)`` pieces of at most L for every bucket holding it, and counts."""
    doc_id, tokens = item
    segment = packing.text_segment(doc_id, tokens, text_weight)
    return route(len(tokens), buckets, lambda bucket: packing.cut(segment, bucket.seq_len))


def build(pipeline: beam.Pipeline, config: BooksConfig):
    """Add the books job to ``pipeline``; returns the PCollection of manifest paths."""
    inputs = pipeline | "ReadInputs" >> ReadUnique(config.inputs, raw.iter_documents)
    dead_letters = inputs["dead_letters"] | "ForAllBuckets" >> beam.Map(lambda d: (ALL_BUCKETS, d))
    bucketed = (
        inputs["records"]
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.tokenize_batch)
        | "Tokenize" >> beam.ParDo(Tokenize(config.tokenizer, config.special))
        | "Bucket" >> beam.FlatMap(assign_buckets, config.output.buckets, config.text_weight).with_outputs(
            "counts", "dead_letters", main="segments")
    )
    spec = DatasetSpec.for_job("books", config, TextTokenizer(config.tokenizer))
    return {
        "segments": bucketed.segments,
        "counts": bucketed.counts,
        "dead_letters": dead_letters,
        "input_examples": inputs["input_examples"],
    } | "WriteDatasets" >> WritePackedDatasets(spec)


def check(config: BooksConfig) -> tuple[int, int]:
    """Inputs and tokenizer, before any output is touched; returns the inputs' (files, bytes)."""
    check_tokenizer(config.tokenizer)
    return check_inputs(config.inputs)


JOB = Job("books", BooksConfig, build, check, help="raw books → packed ArrayRecord shards, one dataset per length bucket",
          examples=(
              "lwm data books --input 'books/*.jsonl' --output out/ --tokenizer tokenizer.model --seq-len 4096",
              "lwm data books --input 'books/*.jsonl' 'more/*.parquet' --output out/ --tokenizer tokenizer.model "
              "--buckets lwm-text   # the paper's five text stages",
              "lwm data books --input 'books/*.jsonl' --output out/ --tokenizer tokenizer.model --seq-len 4096 "
              "--dry-run   # options and job graph; runs nothing",
              "lwm data books --input 'gs://bucket/books/*.jsonl' --output gs://bucket/packed --tokenizer "
              "gs://bucket/tokenizer.model --buckets lwm-text --runner DataflowRunner --project MY_PROJECT "
              "--region us-central1 --temp_location gs://bucket/tmp --max_num_workers 64",
          ))
run = JOB.run
