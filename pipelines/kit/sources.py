"""The front half every data job shares: input files → unique, valid records + dead letters.

match patterns → split each file into ranges → open each range (any Beam
filesystem, still compressed: the parser decompresses so corrupt archives raise) →
parse with the job's record parser → split valid records from dead letters → keep
the first record of each id (by path, then line or row) and dead-letter the rest as
``duplicate_id``.

Ranges: an uncompressed JSON-lines file larger than :data:`RANGE_BYTES` is read as
ranges of whole lines of about that size (their first line numbers counted once, by
a scan for line ends), so one large file is read and tokenized by many workers at
once, each in its own process, and no text moves between them. Other files are
one range each.

Deduplication moves no texts: a first pass over the ranges sends only (id, path,
index) through a shuffle, to find the ids seen more than once and where each was
first seen; that small map is a side input of the second pass, the reader itself,
so no text is ever shuffled or held between stages (reading twice costs far less
than moving every text).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.kit import progress
from pipelines.kit.naming import METRICS_NAMESPACE
from schemas import raw
from schemas.raw import DeadLetter

# (binary stream, path, first_line=n) → the records of the file (or of its lines from n on), bad ones as
# dead letters.
Parser = Callable[..., Iterator[object]]
RANGE_BYTES = 4 << 20  # the size of the ranges a large JSON-lines file is read in (a few per worker)
_SCAN_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FileRange:
    """Bytes ``[start, stop)`` of the file at ``path`` (``size`` bytes), whole lines from line ``first_line``
    (1-based); ``stop`` None is the whole file, read as a stream."""

    path: str
    size: int
    start: int = 0
    stop: int | None = None
    first_line: int = 1

    @property
    def last(self) -> bool:
        return self.stop is None or self.stop >= self.size


def line_ranges(stream, target: int) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, first_line)`` of consecutive ranges of whole lines covering ``stream``, each
    ending at the first line end at or after ``target`` bytes from its start (the last: at the end)."""
    start, first_line = 0, 1  # of the range being scanned
    position, line = 0, 1  # of the block being scanned: its offset, and the line number at its start
    while block := stream.read(_SCAN_BLOCK):
        at = 0
        while (cut := block.find(b"\n", max(at, start + target - 1 - position))) >= 0:
            line += block.count(b"\n", at, cut + 1)
            at = cut + 1
            yield start, position + at, first_line
            start, first_line = position + at, line
        line += block.count(b"\n", at)
        position += len(block)
    if position > start:
        yield start, position, first_line


def _splittable(path: str) -> bool:
    return raw.input_format(path) == "jsonl" and not path.lower().endswith(".gz")


class SplitFiles(beam.DoFn):
    """A matched file → its :class:`FileRange`: ranges of about ``range_bytes`` for a larger uncompressed
    JSON-lines file, else (or when the scan fails: the reader then reports the file) the whole file."""

    def __init__(self, range_bytes: int):
        self.range_bytes = range_bytes

    def process(self, metadata) -> Iterable[FileRange]:
        path, size = metadata.path, metadata.size_in_bytes
        if path.endswith(("/", "\\")):  # a directory a pattern matched (skipped, as Beam's ReadMatches does)
            return
        if size <= self.range_bytes or not _splittable(path):
            yield FileRange(path, size)
            return
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
                ranges = [FileRange(path, size, *r) for r in line_ranges(stream, self.range_bytes)]
        except Exception:  # ReadRecords reports the file as unreadable_file
            ranges = [FileRange(path, size)]
        yield from ranges


def read_range(file_range: FileRange, parse: Parser) -> Iterator[object]:
    """The records of one range (raises what opening or reading the file raises)."""
    with FileSystems.open(file_range.path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
        if file_range.stop is None:
            yield from parse(stream, file_range.path)
            return
        stream.seek(file_range.start)
        data = stream.read(file_range.stop - file_range.start)
    yield from parse(io.BytesIO(data), file_range.path, first_line=file_range.first_line)


class ReadRecords(beam.DoFn):
    """A range → its records, the duplicates among them as ``duplicate_id`` dead letters (:func:`keep_first`
    with the ``duplicated`` side input); a range that fails to read → an ``unreadable_file`` dead letter."""

    def __init__(self, parse: Parser):
        self.parse = parse

    def process(self, file_range: FileRange, duplicated: dict[str, tuple[str, int, str]]) -> Iterable[object]:
        if file_range.start == 0:
            Metrics.counter(METRICS_NAMESPACE, "files_read").inc()
        try:
            for record in read_range(file_range, self.parse):
                progress.add(documents=1)
                if isinstance(record, DeadLetter):
                    yield record
                else:
                    yield from keep_first(record, duplicated)
        except Exception as error:  # a file that fails mid-read: report it, keep the job alive
            yield DeadLetter("", "unreadable_file", f"{type(error).__name__}: {error}", file_range.path)
        read = (file_range.stop or file_range.size) - file_range.start
        progress.add(files=int(file_range.last), input_bytes=read)


class ReadPositions(beam.DoFn):
    """A range → ``(id, ((path, index, source), 1))`` of each valid record: the first pass of
    deduplication, which reads the files but keeps nothing of their texts."""

    def __init__(self, parse: Parser):
        self.parse = parse

    def process(self, file_range: FileRange):
        try:
            for record in read_range(file_range, self.parse):
                if not isinstance(record, DeadLetter):
                    yield _position(record)
        except Exception:  # the second pass (ReadRecords) reports the file
            return


def _position(record) -> tuple[str, tuple[tuple[str, int, str], int]]:
    """(id, ((path, index, source), 1)): all a record sends through the dedupe shuffle (never its text)."""
    return record.id, ((record.path, record.index, record.source), 1)


def first_and_count(values: Iterable[tuple[tuple[str, int, str], int]]) -> tuple[tuple[str, int, str], int]:
    """Combine (position, count) pairs: the first position by (path, index), and the total count."""
    values = list(values)
    return min(v[0] for v in values), sum(v[1] for v in values)


def keep_first(record, duplicated: dict[str, tuple[str, int, str]]) -> Iterable[object]:
    """The record, unless its id is ``duplicated`` and it is not the first (by path, index) of that id:
    then a ``duplicate_id`` dead letter naming where the id was first seen."""
    first = duplicated.get(record.id)
    if first is None or (record.path, record.index) == first[:2]:
        yield record
    else:
        yield DeadLetter(record.id, "duplicate_id", f"id first seen at {first[2]}", record.source)


def count_dead_letter(letter: DeadLetter) -> DeadLetter:
    """Count a dead letter by reason in the job's Beam metrics; returns it unchanged."""
    Metrics.counter(METRICS_NAMESPACE, f"dead_letter_{letter.reason}").inc()
    return letter


def _is_dead_letter(item, _partitions) -> int:
    return int(isinstance(item, DeadLetter))


class ReadUnique(beam.PTransform):
    """Input patterns → ``{"records", "dead_letters", "input_examples"}``.

    ``records``: valid records with distinct ids; ``dead_letters``: every rejected
    record, counted by reason; ``input_examples``: how many records were read in all.
    ``range_bytes``: the size of the ranges a large JSON-lines file is read in.
    """

    def __init__(self, inputs: Iterable[str], parse: Parser, range_bytes: int = RANGE_BYTES):
        super().__init__()
        self.inputs = list(inputs)
        self.parse = parse
        self.range_bytes = range_bytes

    def expand(self, pipeline):
        ranges = (
            pipeline
            | "Patterns" >> beam.Create(self.inputs)
            | "Match" >> fileio.MatchAll()
            | "Split" >> beam.ParDo(SplitFiles(self.range_bytes))
            | "Spread" >> beam.Reshuffle()
        )
        duplicated = (
            ranges
            | "ReadPositions" >> beam.ParDo(ReadPositions(self.parse))
            | "FirstById" >> beam.CombinePerKey(first_and_count)
            | "Duplicated" >> beam.Filter(lambda kv: kv[1][1] > 1)
            | "FirstPosition" >> beam.MapTuple(lambda record_id, first: (record_id, first[0]))
        )
        # The side input keeps the reader out of ReadPositions' stage: records go from the read straight
        # on to the job (tokenizing, in the same worker), never held or shuffled as texts.
        read = ranges | "Read" >> beam.ParDo(ReadRecords(self.parse), beam.pvalue.AsDict(duplicated))
        unique, rejected = read | "Valid" >> beam.Partition(_is_dead_letter, 2)
        return {
            "records": unique,
            "dead_letters": rejected | "CountDeadLetters" >> beam.Map(count_dead_letter),
            "input_examples": read | "CountInputs" >> beam.combiners.Count.Globally(),
        }
