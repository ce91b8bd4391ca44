"""The front half every data job shares: input files → unique, valid records + dead letters.

match patterns → open each file (any Beam filesystem, still compressed: the
parser decompresses so corrupt archives raise) → parse with the job's record
parser → split valid records from dead letters → keep the first record of each id
(by path, then line or row) and dead-letter the rest as ``duplicate_id``.

Deduplication moves no texts: a first pass over the files sends only (id, path,
index) through a shuffle, to find the ids seen more than once and where each was
first seen; that small map is a side input of the filter in the second pass, fused
with the read, so no text is ever shuffled or held between stages (reading twice
costs far less than moving every text).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from pipelines import progress
from pipelines.naming import METRICS_NAMESPACE
from schemas.raw import DeadLetter

# (binary stream, path) → the file's records, bad ones as dead letters.
Parser = Callable[[object, str], Iterator[object]]


class ReadRecords(beam.DoFn):
    """A matched file → its records; a file that fails to read → an ``unreadable_file`` dead letter."""

    def __init__(self, parse: Parser):
        self.parse = parse

    def process(self, readable: fileio.ReadableFile) -> Iterable[object]:
        path = readable.metadata.path
        Metrics.counter(METRICS_NAMESPACE, "files_read").inc()
        try:
            with readable.open(compression_type=CompressionTypes.UNCOMPRESSED) as stream:
                for record in self.parse(stream, path):
                    progress.add(documents=1)
                    yield record
        except Exception as error:  # a file that fails mid-read: report it, keep the job alive
            yield DeadLetter("", "unreadable_file", f"{type(error).__name__}: {error}", path)
        progress.add(files=1, input_bytes=readable.metadata.size_in_bytes)


class ReadPositions(beam.DoFn):
    """A matched file → ``(id, ((path, index, source), 1))`` of each valid record: the first pass of
    deduplication, which reads the files but keeps nothing of their texts."""

    def __init__(self, parse: Parser):
        self.parse = parse

    def process(self, readable: fileio.ReadableFile):
        try:
            with readable.open(compression_type=CompressionTypes.UNCOMPRESSED) as stream:
                for record in self.parse(stream, readable.metadata.path):
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
    """

    def __init__(self, inputs: Iterable[str], parse: Parser):
        super().__init__()
        self.inputs = list(inputs)
        self.parse = parse

    def expand(self, pipeline):
        files = (
            pipeline
            | "Patterns" >> beam.Create(self.inputs)
            | "Match" >> fileio.MatchAll()
            | "Open" >> fileio.ReadMatches()
            | "Spread" >> beam.Reshuffle()
        )
        read = files | "Read" >> beam.ParDo(ReadRecords(self.parse))
        valid, rejected = read | "Valid" >> beam.Partition(_is_dead_letter, 2)
        duplicated = (
            files
            | "ReadPositions" >> beam.ParDo(ReadPositions(self.parse))
            | "FirstById" >> beam.CombinePerKey(first_and_count)
            | "Duplicated" >> beam.Filter(lambda kv: kv[1][1] > 1)
            | "FirstPosition" >> beam.MapTuple(lambda record_id, first: (record_id, first[0]))
        )
        unique, duplicates = (
            valid
            | "Dedupe" >> beam.FlatMap(keep_first, beam.pvalue.AsDict(duplicated))
            | "Unique" >> beam.Partition(_is_dead_letter, 2)
        )
        return {
            "records": unique,
            "dead_letters": (rejected, duplicates)
            | "DeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.Map(count_dead_letter),
            "input_examples": read | "CountInputs" >> beam.combiners.Count.Globally(),
        }
