"""``lwm data chat-qa``: books → model-generated long-context chat QA, packed like every other dataset.

read, validate and drop duplicate ids (:mod:`pipelines.kit.sources`) → cut each book
into sentence-aligned chunks of about ``chunk_tokens`` tokens
(:mod:`pipelines.chat_qa.contexts`) → ask the generator (:mod:`pipelines.chat_qa.generators.interface`)
for ``qa_per_chunk`` pairs per chunk, in batches, reusing every pair the cache
(:mod:`pipelines.chat_qa.cache`) already holds and storing each new one as soon as it
exists → per book and bucket, contexts of adjacent chunks as long as fit L, each
followed by the QA turns about its chunks in LWM's chat format, loss on the
answers only → the shared packed-dataset writer (:mod:`pipelines.kit.packed_writer`).

Pairs that could not be generated are dead letters (with the raw reply) and are
not cached, so a rerun asks for them again; the book's context still holds their
chunk's text. Beam metrics count generated, reused, retried and failed pairs.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import flags
from pipelines.kit import progress
from pipelines.chat_qa import generators
from pipelines.kit.buckets import Bucket
from pipelines.kit.packed_writer import ALL_BUCKETS, DatasetSpec, WritePackedDatasets, count, route
from pipelines.kit.job import Job, check_inputs, check_tokenizer
from pipelines.kit.naming import METRICS_NAMESPACE
from pipelines.kit.output import OutputConfig
from pipelines.chat_qa.cache import QACache, key
from pipelines.chat_qa.contexts import Chunk, ChatTemplate, QATokens, assemble, chunk_book
from pipelines.chat_qa.generators import GeneratorConfig
from pipelines.chat_qa.generators.interface import Identity, QAOutcome, QAPair, QARequest
from pipelines.kit.sources import ReadUnique
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import raw, storage


@dataclasses.dataclass(frozen=True)
class ChatQAConfig:
    """Everything a chat-QA job needs; recorded in every manifest it writes (but where the cache lives)."""

    inputs: tuple[str, ...] = flags.field(flag="input", metavar="GLOB")
    """Book files: .jsonl/.json/.parquet/.txt, optionally .gz (local or gs://, globs allowed)."""
    tokenizer: str = flags.field()
    """SentencePiece .model file (lwm tokenizer train, or Llama-2's tokenizer.model)."""
    output: OutputConfig = flags.field()
    generator: GeneratorConfig = GeneratorConfig()
    cache: str = flags.field("", record=False)
    """Where generated pairs are kept (local or gs://; empty: OUTPUT/qa_cache); --overwrite keeps it."""
    regenerate: bool = flags.field(False, record=False)
    """Ignore cached pairs: ask the generator about every chunk again (new pairs replace cached ones)."""
    chunk_tokens: int = 1000
    """Tokens per chunk, about: chunks end at sentence ends (LWM: ~1000)."""
    qa_per_chunk: int = 1
    """Question-answer pairs asked about each chunk (LWM: 1)."""
    answer_weight: float = 1.0
    """Loss weight of answer tokens and their EOS; every other token has 0."""
    chunk_batch: int = flags.field(8, record=False)
    """Books per chunking call."""

    def __post_init__(self):
        if self.chunk_tokens < 1 or self.qa_per_chunk < 1:
            raise ValueError("chunk_tokens and qa_per_chunk must be at least 1")
        if not self.cache:  # resolved now, so a run staged elsewhere (--overwrite) still uses OUTPUT/qa_cache
            object.__setattr__(self, "cache", storage.join(self.output.output, "qa_cache"))


@dataclasses.dataclass(frozen=True)
class ChunkedBook:
    id: str
    source: str
    chunks: tuple[Chunk, ...]


@dataclasses.dataclass(frozen=True)
class GeneratedPair:
    chunk: int
    number: int
    pair: QAPair


class ChunkBooks(beam.DoFn):
    """Batches of books → :class:`ChunkedBook`; the tokenizer is loaded once per worker."""

    def __init__(self, tokenizer_path: str, chunk_tokens: int):
        self.tokenizer_path = tokenizer_path
        self.chunk_tokens = chunk_tokens

    def setup(self):
        self.tokenizer = TextTokenizer(self.tokenizer_path)
        self.chunks = Metrics.counter(METRICS_NAMESPACE, "chunks")

    def process(self, batch: Sequence[raw.Document]) -> Iterable[ChunkedBook]:
        for document in batch:
            chunks = chunk_book(document.id, document.text, self.tokenizer.encode_batch, self.chunk_tokens)
            self.chunks.inc(len(chunks))
            progress.add(tokens=sum(len(c) for c in chunks))
            yield ChunkedBook(document.id, document.source, tuple(chunks))


def requests(book: ChunkedBook, count: int) -> Iterable[QARequest]:
    for chunk in book.chunks:
        for number in range(count):
            yield QARequest(chunk, number, count, book.source)


class QACount(str, enum.Enum):
    """What the job counts beside :class:`~pipelines.kit.buckets.Count`, in every bucket's manifest."""

    GENERATED = "qa_generated"  # pairs the generator produced in this run
    REUSED = "qa_reused"  # pairs taken from the cache
    RETRIED = "qa_retried"  # generator requests repeated (429, 5xx, timeouts, unparseable replies)
    FAILED = "qa_failed"  # pairs that ended as dead letters (not cached: a rerun tries them again)


class LookUpPairs(beam.DoFn):
    """Batches of requests → cached pairs (tagged ``cached``: ``(book id, GeneratedPair)``) and the requests left."""

    def __init__(self, identity: Identity, cache_dir: str, regenerate: bool):
        self.identity = identity
        self.cache_dir = cache_dir
        self.regenerate = regenerate

    def setup(self):
        self.cache = QACache(self.cache_dir)
        self.reused = Metrics.counter(METRICS_NAMESPACE, "qa_reused")

    def process(self, batch: Sequence[QARequest]):
        keys = [key(r, self.identity) for r in batch]
        cached = {} if self.regenerate else self.cache.get_many(keys)
        for request, cache_key in zip(batch, keys):
            if cache_key not in cached:
                yield request
                continue
            self.reused.inc()
            yield count(None, QACount.REUSED)
            generated = GeneratedPair(request.chunk.index, request.number, cached[cache_key])
            yield beam.pvalue.TaggedOutput("cached", (request.chunk.book_id, generated))


class Generate(beam.DoFn):
    """Batches of requests → their outcomes, each as soon as it is ready; the generator is built once per worker."""

    def __init__(self, generator: GeneratorConfig):
        self.generator_config = generator

    def setup(self):
        self.generator = generators.build(self.generator_config)

    def process(self, batch: Sequence[QARequest]) -> Iterable[QAOutcome]:
        yield from self.generator.generate(batch)

    def teardown(self):
        self.generator.close()


class StorePairs(beam.DoFn):
    """Outcomes → cached and emitted pairs (``(book id, GeneratedPair)``), or dead letters (never cached)."""

    def __init__(self, identity: Identity, cache_dir: str):
        self.identity = identity
        self.cache_dir = cache_dir

    def setup(self):
        self.cache = QACache(self.cache_dir)
        self.counters = {n: Metrics.counter(METRICS_NAMESPACE, f"qa_{n}") for n in ("generated", "retried", "failed")}

    def process(self, outcome: QAOutcome):
        request = outcome.request
        self.counters["retried"].inc(outcome.retries)
        if outcome.retries:
            yield count(None, QACount.RETRIED, outcome.retries)
        if outcome.pair is None:
            self.counters["failed"].inc()
            yield count(None, QACount.FAILED)
            source = f"{request.source}#{request.name}"
            letter = raw.DeadLetter(request.chunk.book_id, outcome.reason, outcome.detail, source)
            yield beam.pvalue.TaggedOutput("dead_letters", (ALL_BUCKETS, letter))
            return
        self.cache.put(key(request, self.identity), outcome.pair, request, self.identity)
        self.counters["generated"].inc()
        yield count(None, QACount.GENERATED)
        yield request.chunk.book_id, GeneratedPair(request.chunk.index, request.number, outcome.pair)


class AssembleContexts(beam.DoFn):
    """(book id, its chunks and pairs) → ``(seq_len, Segment)`` contexts per bucket, counts, dead letters.

    A context none of whose chunks got a pair has no loss and is left out (counted
    as ``contexts_without_qa``); a chunk too long for L even alone is dead-lettered.
    """

    def __init__(self, tokenizer_path: str, buckets: Sequence[Bucket], answer_weight: float):
        self.tokenizer_path = tokenizer_path
        self.buckets = tuple(buckets)
        self.answer_weight = answer_weight

    def setup(self):
        self.tokenizer = TextTokenizer(self.tokenizer_path)
        tokenizer = self.tokenizer
        self.template = ChatTemplate.from_encoder(tokenizer.encode_batch, tokenizer.bos_id, tokenizer.eos_id)
        self.without_qa = Metrics.counter(METRICS_NAMESPACE, "contexts_without_qa")

    def process(self, item):
        book_id, grouped = item
        (book,) = grouped["book"]
        generated = sorted(grouped["pairs"], key=lambda g: (g.chunk, g.number))
        texts = self.tokenizer.encode_batch([t for g in generated for t in (g.pair.question, g.pair.answer)])
        pairs = [QATokens(g.chunk, texts[2 * i], texts[2 * i + 1]) for i, g in enumerate(generated)]
        chunks = [c.tokens for c in book.chunks]
        letters = []

        def fit(bucket: Bucket) -> list:
            examples, too_long, without_qa = assemble(book_id, chunks, pairs, self.template, bucket.seq_len)
            self.without_qa.inc(len(without_qa))
            for index in too_long:
                detail = f"chunk {index} ({len(chunks[index])} tokens) with its QA turns does not fit {bucket.seq_len}"
                letter = raw.DeadLetter(book_id, "too_long", detail, f"{book.source}#chunk{index}")
                letters.append((bucket.seq_len, letter))
            return [e.segment(self.answer_weight) for e in examples]

        yield from route(sum(len(c) for c in chunks), self.buckets, fit)
        for letter in letters:
            yield beam.pvalue.TaggedOutput("dead_letters", letter)


def build(pipeline: beam.Pipeline, config: ChatQAConfig):
    """Add the chat-QA job to ``pipeline``; returns the PCollection of manifest paths."""
    inputs = pipeline | "ReadInputs" >> ReadUnique(config.inputs, raw.iter_documents)
    books = (
        inputs["records"]
        | "BatchBooks" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.chunk_batch)
        | "Chunk" >> beam.ParDo(ChunkBooks(config.tokenizer, config.chunk_tokens))
    )
    handler = generators.model_handler(config.generator, config.tokenizer)
    identity = handler.identity if handler else generators.identity(config.generator)
    size = config.generator.batch
    looked_up = (
        books
        | "Requests" >> beam.FlatMap(requests, config.qa_per_chunk)
        | "SpreadRequests" >> beam.Reshuffle()
        | "BatchLookUps" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
        | "LookUp" >> beam.ParDo(LookUpPairs(identity, config.cache, config.regenerate)).with_outputs(
            "cached", "counts", main="missing")
    )
    if handler:
        # Imported here: Beam's inference module loads torch, which the other generators never need.
        from apache_beam.ml.inference.base import RunInference

        outcomes = looked_up.missing | "Generate" >> RunInference(handler)
    else:
        outcomes = (
            looked_up.missing
            | "BatchRequests" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "Generate" >> beam.ParDo(Generate(config.generator))
        )
    stored = outcomes | "Store" >> beam.ParDo(StorePairs(identity, config.cache)).with_outputs(
        "dead_letters", "counts", main="pairs")
    pairs = (looked_up.cached, stored.pairs) | "Pairs" >> beam.Flatten()
    assembled = (
        {"book": books | "KeyBooks" >> beam.Map(lambda b: (b.id, b)), "pairs": pairs}
        | "GroupByBook" >> beam.CoGroupByKey()
        | "Assemble"
        >> beam.ParDo(AssembleContexts(config.tokenizer, config.output.buckets, config.answer_weight)).with_outputs(
            "counts", "dead_letters", main="segments")
    )
    dead_letters = (
        inputs["dead_letters"] | "ForAllBuckets" >> beam.Map(lambda d: (ALL_BUCKETS, d)),
        stored.dead_letters,
        assembled.dead_letters,
    ) | "DeadLetters" >> beam.Flatten()
    counts = (assembled.counts, looked_up.counts, stored.counts) | "Counts" >> beam.Flatten()
    spec = DatasetSpec.for_job(JOB.name, config, TextTokenizer(config.tokenizer), counts=(QACount,),
                               generator_id=identity.id, prompt_version=identity.prompt_version)
    return {
        "segments": assembled.segments,
        "counts": counts,
        "dead_letters": dead_letters,
        "input_examples": inputs["input_examples"],
    } | "WriteDatasets" >> WritePackedDatasets(spec)


def check(config: ChatQAConfig) -> tuple[int, int]:
    """Chunk size, generator, tokenizer and inputs, before any output is touched; returns the inputs' (files, bytes)."""
    shortest = min(b.seq_len for b in config.output.buckets)
    if config.chunk_tokens >= shortest:
        raise ValueError(f"--chunk-tokens {config.chunk_tokens} leaves no room for QA turns in sequences of {shortest}")
    check_tokenizer(config.tokenizer)
    generators.check(config.generator)
    return check_inputs(config.inputs)


JOB = Job("chat-qa", ChatQAConfig, build, check, help=(
    "books → long-context chat QA: contexts of adjacent chunks + generated question-answer turns, "
    "loss on answers, packed per length bucket"),
    examples=(
        "lwm data chat-qa --input 'books/*.jsonl' --output qa/ --tokenizer tokenizer.model --seq-len 32768 "
        "--generator extractive   # offline, deterministic, no model",
        "lwm data chat-qa --input 'books/*.jsonl' --output qa/ --tokenizer tokenizer.model --seq-len 32768 "
        "--generator openai:my-model@http://host:8000/v1 --api-key-env MY_KEY",
        "lwm data chat-qa --input 'books/*.jsonl' --output qa/ --tokenizer tokenizer.model --seq-len 32768 "
        "--generator lwm:runs/stages/chat-1024/checkpoints   # our own checkpoint",
        "lwm data chat-qa --input haystacks.jsonl --output needles/ --tokenizer tokenizer.model --seq-len 4096 "
        "--generator needle   # the needle eval's question about each needle sentence",
    ))
run = JOB.run
