"""The front half every data job shares: input files → unique, valid records + dead letters.

match patterns → open each file (any Beam filesystem, still compressed: the
parser decompresses so corrupt archives raise) → parse with the job's record
parser → split valid records from dead letters → keep the first record of each id
(by path, then line or row) and dead-letter the rest as ``duplicate_id``.
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


def first_of_duplicates(item) -> Iterable[object]:
    """(id, records) → the first record by (path, index), the others as ``duplicate_id`` dead letters."""
    record_id, records = item
    kept, *others = sorted(records, key=lambda r: (r.path, r.index))
    yield kept
    for other in others:
        yield DeadLetter(record_id, "duplicate_id", f"id first seen at {kept.source}", other.source)


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
        read = (
            pipeline
            | "Patterns" >> beam.Create(self.inputs)
            | "Match" >> fileio.MatchAll()
            | "Open" >> fileio.ReadMatches()
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadRecords(self.parse))
        )
        valid, rejected = read | "Valid" >> beam.Partition(_is_dead_letter, 2)
        unique, duplicates = (
            valid
            | "KeyById" >> beam.Map(lambda r: (r.id, r))
            | "GroupById" >> beam.GroupByKey()
            | "Dedupe" >> beam.FlatMap(first_of_duplicates)
            | "Unique" >> beam.Partition(_is_dead_letter, 2)
        )
        return {
            "records": unique,
            "dead_letters": (rejected, duplicates)
            | "DeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.Map(count_dead_letter),
            "input_examples": read | "CountInputs" >> beam.combiners.Count.Globally(),
        }
