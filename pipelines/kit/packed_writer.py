"""The back half of every data job: segments → packed, sharded, manifested datasets.

:class:`WritePackedDatasets` takes what a job's front half produced (books,
image-text or video-text alike) and writes one dataset per length bucket into
``OUTPUT/seq{L}/``:

1. segments are hashed into ``hash_groups`` groups by their document id, as
   bytes (:func:`pipelines.kit.packing.segment_to_bytes`, about 2 bytes per token),
   where they are made: the key needs nothing computed later, so they go from
   the producer straight into the shuffle;
2. the groups' token totals fix their bucket's :class:`BucketPlan`: whether the
   bucket is large enough for its groups to pack on their own
   (:func:`pipelines.kit.packing.packed_in_place`) and the run of shards each packing
   unit writes;
3. in a large bucket each group is sorted (GroupByKey order is not
   deterministic), packed with best-fit-decreasing and written, less its least
   full sequence; those sequences' segments (in a small bucket, every segment)
   go through a second, small shuffle (under ``groups × 16`` sequences' worth)
   to be packed together as the bucket's leftovers; each unit deals its
   sequences round-robin over its own shards, each encoded
   (:mod:`schemas.packed`) and written with ``group_size:1`` to a temporary name
   (a local file first where the output is remote) and renamed when complete;
   so packed records are never shuffled or held beyond one shard;
4. once every shard exists, each bucket's dead letters and then its
   ``manifest.json`` are written (:mod:`schemas.manifest`), with an empty shard
   for any run that got no sequences.

Every choice is a function of the data (stable hashes, sorted groups), so the
same inputs and config give byte-identical shards in every running mode.

Memory on the local runner: ``FnApiRunner`` holds a stage's output until the next
stage has read it, and a GroupByKey's input as decoded values; so what crosses
stages here is bytes (segments), or small (token totals, shard summaries), and the
segments cross one stage boundary, the shuffle. That is why the groups are a
fixed number and the plan comes after them: a group count chosen from the
bucket's token total made the segments wait for that total in a stage of their
own, one more copy of them (12.5 bytes of peak memory per input token against
10.1 now, BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from array_record.python.array_record_module import ArrayRecordWriter

from pipelines.kit import packing
from pipelines.kit.buckets import Bucket, Count
from pipelines.kit.naming import METRICS_NAMESPACE, bucket_dir
from pipelines.kit.output import OutputConfig, recorded
from schemas import packed
from schemas import manifest as manifest_lib
from schemas import storage
from schemas.raw import DeadLetter

log = logging.getLogger(__name__)
ALL_BUCKETS = 0  # bucket key of a dead letter that concerns every bucket (rejected before bucketing)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where and how a job writes its datasets: its name, output config, tokenizer and recorded config."""

    job: str
    output: OutputConfig
    tokenizer: dict[str, Any]  # {"path": as given, "uri": absolute, "sha256": ..., "vocab_size": n}
    config: dict[str, Any]  # the job's resolved config, recorded in every manifest
    # The count names a job may emit (enums of str values; :class:`Count` and the job's own):
    # each is written to the manifest's ``counts`` (0 when never emitted), any other name fails.
    counts: tuple[type[enum.Enum], ...] = (Count,)

    @classmethod
    def for_job(cls, job: str, config, tokenizer, *, counts: tuple[type[enum.Enum], ...] = (),
                **extra_config) -> "DatasetSpec":
        """The spec of a job whose config has ``output`` (an :class:`OutputConfig`) and ``tokenizer`` (a path);
        ``tokenizer`` is the job's loaded :class:`~pipelines.tokens.text_tokenizer.TextTokenizer`; ``counts``
        the job's own count enums beside :class:`Count`."""
        return cls(
            job=job,
            output=config.output,
            tokenizer={"path": config.tokenizer, "uri": storage.absolute(config.tokenizer),
                       "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            config={**recorded(config), **extra_config},
            counts=(Count, *counts),
        )

    @property
    def name(self) -> str:
        return self.output.shard_name(self.job)

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        return self.output.buckets

    def bucket_dir(self, bucket: Bucket) -> str:
        return bucket_dir(self.output.output, bucket.name)

    @property
    def hash_groups(self) -> int:
        """The groups each bucket's segments are hashed into: ``pack_groups``, fewer where ``num_shards``
        leaves no shard for the leftovers' group."""
        num_shards = self.output.num_shards
        return self.output.pack_groups if num_shards is None else max(1, min(self.output.pack_groups, num_shards - 1))

    def plan(self, seq_len: int, group_tokens: Mapping[int, int]) -> "BucketPlan":
        """The plan of a bucket from its hash groups' token totals: which groups are packed in place
        (:func:`pipelines.kit.packing.packed_in_place`) and the shards each packing unit (those groups, then
        the leftovers) writes: ``num_shards`` shared by their tokens, at least one each, or shards of about
        ``shard_mb`` (estimated at 2 bytes per token, full sequences)."""
        groups = self.hash_groups
        in_place = packing.packed_in_place(group_tokens, seq_len, groups)
        units = {group: group_tokens[group] for group in in_place}
        if groups > 1:  # the leftovers: a small bucket whole, or at most one sequence from each group
            units[LEFTOVERS] = seq_len * len(in_place) if in_place else sum(group_tokens.values())
        if self.output.num_shards:
            counts = _share(self.output.num_shards, units)
        else:
            counts = {unit: _shards_by_size(tokens, seq_len, self.output.shard_bytes) for unit, tokens in units.items()}
        runs, first = {}, 0
        for unit, n in counts.items():
            runs[unit] = range(first, first + n)
            first += n
        return BucketPlan(groups, runs)


LEFTOVERS = -1  # the packing unit of a small bucket, or of each in-place group's least full sequence


def _shards_by_size(tokens: int, seq_len: int, shard_bytes: int) -> int:
    sequences = math.ceil(tokens / seq_len)
    return max(1, min(sequences, math.ceil(sequences * seq_len * 2 / shard_bytes)))


def _share(shards: int, units: dict[int, int]) -> dict[int, int]:
    """``shards`` over the units: one each, the rest in proportion to their tokens (largest remainders
    first, then unit order: integers only, so every worker computes the same)."""
    extra, total = shards - len(units), max(1, sum(units.values()))
    counts = {unit: 1 + extra * tokens // total for unit, tokens in units.items()}
    order = {unit: index for index, unit in enumerate(units)}
    by_remainder = sorted(units, key=lambda unit: (-(extra * units[unit] % total), order[unit]))
    for unit in by_remainder[:shards - sum(counts.values())]:
        counts[unit] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """How one bucket is packed and written: segments hashed into ``groups`` groups; ``runs`` the consecutive
    shards each packing unit writes (a group packed in place, or :data:`LEFTOVERS`), in shard order; groups
    without a run (a small bucket's) are packed as the leftovers. No shuffle brings records to their shards."""

    groups: int
    runs: dict[int, range]

    @property
    def shards(self) -> int:
        return sum(len(run) for run in self.runs.values())


def count(bucket: Bucket | None, what: enum.Enum, n: int = 1) -> beam.pvalue.TaggedOutput:
    """A ``counts`` output: ``n`` more ``what`` in ``bucket`` (None: in every bucket, e.g. per-job work)."""
    return beam.pvalue.TaggedOutput("counts", ((ALL_BUCKETS if bucket is None else bucket.seq_len, what.value), n))


def route(length: int, buckets: Sequence[Bucket], fit: Callable[[Bucket], "list[packing.Segment] | DeadLetter"]):
    """Route one example of ``length`` tokens to every bucket whose length range holds it, and count it.

    ``fit(bucket)`` gives the example's segments for that bucket (each at most its
    ``seq_len``), or a dead letter when it cannot fit. Yields what
    :class:`WritePackedDatasets` takes: ``(seq_len, Segment)`` as the main output,
    ``counts`` and ``dead_letters`` tagged; use it as a ``FlatMap``/``ParDo`` body
    ``.with_outputs("counts", "dead_letters", main="segments")``.
    """
    for bucket in buckets:
        outside = bucket.outside(length)
        if outside is not None:
            yield count(bucket, outside)
            continue
        result = fit(bucket)
        if isinstance(result, DeadLetter):
            yield beam.pvalue.TaggedOutput("dead_letters", (bucket.seq_len, result))
            continue
        yield count(bucket, Count.DOCUMENTS)
        yield count(bucket, Count.SEGMENTS, len(result))
        for segment in result:
            yield bucket.seq_len, segment


@dataclasses.dataclass(frozen=True)
class WrittenShard:
    seq_len: int
    info: manifest_lib.ShardInfo
    tokens: int
    pad_tokens: int
    max_ids: dict[str, int]
    payload_bytes: int  # the records' own bytes


def max_ids(tokens: np.ndarray, vision_mask: np.ndarray, present: np.ndarray) -> dict[str, int]:
    """Largest token id per modality among the ``present`` (non-padding) positions."""
    result = {}
    for modality, where in (("text", present & ~vision_mask), ("vision", present & vision_mask)):
        if where.any():
            result[modality] = int(tokens[where].max())
    return result


def merge_max_ids(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for modality, value in part.items():
            merged[modality] = max(merged.get(modality, value), value)
    return dict(sorted(merged.items()))


def _write_array_record(path: str, records: Iterable[bytes]) -> int:
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    for record in records:
        writer.write(record)
        count += 1
    writer.close()
    return count


def write_shard(path: str, records: list[bytes]) -> manifest_lib.ShardInfo:
    """Write one ArrayRecord shard at ``path`` (any filesystem) via a temporary name.

    array-record writes local files only, so a remote shard is written locally and
    streamed up; either way the final name appears only once the file is complete.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    local = FileSystems.get_scheme(path) in (None, "file")
    with tempfile.TemporaryDirectory() as scratch:
        staging = temporary if local else os.path.join(scratch, "shard")
        if local:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_array_record(staging, records)
        size = os.path.getsize(staging)
        sha256 = manifest_lib.file_sha256(staging)
        if not local:
            with open(staging, "rb") as source, FileSystems.create(temporary) as target:
                shutil.copyfileobj(source, target, 1 << 22)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return manifest_lib.ShardInfo(os.path.basename(path), len(records), size, sha256)


_GROUPED_SEGMENT = beam.typehints.Tuple[beam.typehints.Tuple[int, int], bytes]  # ((seq_len, group), segment)


def _hash_to_group(item, groups: int) -> tuple[tuple[int, int], bytes]:
    """(seq_len, Segment) → ((seq_len, hash group of its document id), its bytes): what crosses the shuffle."""
    seq_len, segment = item
    return (seq_len, packing.hash_group(segment, groups)), packing.segment_to_bytes(segment)


def _pack_group(item, spec: DatasetSpec, plans: dict[int, BucketPlan]):
    """One hash group → its shards, less its least full sequence; or, in a small bucket, all its segments:
    those go on (tagged ``leftovers``) to be packed with the bucket's leftovers."""
    (seq_len, group), encoded = item
    plan = plans[seq_len]
    if group not in plan.runs:
        for data in encoded:
            yield beam.pvalue.TaggedOutput("leftovers", (seq_len, data))
        return
    sequences, leftover = packing.pack_in_place([packing.segment_from_bytes(data) for data in encoded], seq_len,
                                                plan.groups)
    for segment in leftover:
        yield beam.pvalue.TaggedOutput("leftovers", (seq_len, packing.segment_to_bytes(segment)))
    yield from _write_run(spec, seq_len, plan, group, sequences)


def _pack_leftovers(item, spec: DatasetSpec, plans: dict[int, BucketPlan]) -> Iterable[WrittenShard]:
    seq_len, encoded = item
    sequences = packing.pack([packing.segment_from_bytes(data) for data in encoded], seq_len)
    yield from _write_run(spec, seq_len, plans[seq_len], LEFTOVERS, sequences)


def _write_run(spec: DatasetSpec, seq_len: int, plan: BucketPlan, unit: int,
               sequences: list[list[packing.Segment]]) -> Iterable[WrittenShard]:
    """A packing unit's sequences, dealt round-robin over its own run of shards, written."""
    Metrics.counter(METRICS_NAMESPACE, "packed_examples").inc(len(sequences))
    shards = plan.runs[unit]
    for offset, shard in enumerate(shards):
        yield _write_shard(spec, seq_len, shard, plan.shards, sequences[offset::len(shards)])


def _write_shard(spec: DatasetSpec, seq_len: int, shard: int, shards: int,
                 sequences: list[list[packing.Segment]]) -> WrittenShard:
    """Encode one shard's sequences (one at a time: a decoded example is L long) and write them."""
    records, ids, tokens = [], [], 0
    for sequence in sequences:
        example = packing.to_example(sequence, seq_len)
        ids.append(max_ids(example["tokens"], example["vision_mask"], example["segment_ids"] > 0))
        records.append(packed.encode(**example))
        tokens += sum(len(s) for s in sequence)
    bucket = next(b for b in spec.buckets if b.seq_len == seq_len)
    path = FileSystems.join(spec.bucket_dir(bucket), manifest_lib.shard_name(spec.name, shard, shards))
    info = write_shard(path, records)
    Metrics.counter(METRICS_NAMESPACE, "shards_written").inc()
    log.debug("wrote %s (%d records)", path, info.records)
    return WrittenShard(seq_len, info, tokens, len(records) * seq_len - tokens, merge_max_ids(ids),
                        sum(len(r) for r in records))


def bucket_counts(counts: Iterable[tuple[tuple[int, str], int]], bucket: Bucket,
                  kinds: Sequence[type[enum.Enum]]) -> dict[str, int]:
    """Summed ``((seq_len or ALL_BUCKETS, name), n)`` counts of one bucket: every name of ``kinds``
    (0 when never counted); a name no kind declares is a ValueError, not a silently lost count."""
    totals: collections.Counter = collections.Counter()
    for (seq_len, name), n in counts:
        if seq_len in (ALL_BUCKETS, bucket.seq_len):
            totals[name] += n
    known = [c.value for kind in kinds for c in kind]
    unknown = sorted(set(totals) - set(known))
    if unknown:
        raise ValueError(f"counts {unknown} are not declared in the job's count enums ({known})")
    return {name: totals[name] for name in known}


class _WriteManifest(beam.DoFn):
    """Per bucket, after every shard: fill shard gaps, write dead letters, then the manifest."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def process(self, bucket: Bucket, written, plans, counts, dead_letters, input_examples):
        spec = self.spec
        directory = spec.bucket_dir(bucket)
        shards = sorted((w for w in written if w.seq_len == bucket.seq_len), key=lambda w: w.info.path)
        infos = {w.info.path: w.info for w in shards}
        records = sum(info.records for info in infos.values())
        total = plans[bucket.seq_len].shards if bucket.seq_len in plans else 0
        for index in range(total):
            name = manifest_lib.shard_name(spec.name, index, total)
            if name not in infos:  # the shards of a group the hash left empty still exist, with 0 records
                infos[name] = write_shard(FileSystems.join(directory, name), [])
        letters = sorted(
            (letter for key, letter in dead_letters if key in (ALL_BUCKETS, bucket.seq_len)),
            key=lambda d: (d.source, d.id, d.reason, d.detail),
        )
        with storage.open(storage.join(directory, manifest_lib.DEAD_LETTER_FILE), "wb") as f:
            f.write("".join(d.to_json() + "\n" for d in letters).encode())
        by_reason = collections.Counter(d.reason for d in letters)
        summary = {
            "input_examples": input_examples,
            **bucket_counts(counts, bucket, spec.counts),
            "packed_examples": records,
            "dead_letter": dict(sorted(by_reason.items())),
        }
        result = manifest_lib.Manifest(
            job=spec.job,
            name=spec.name,
            seq_len=bucket.seq_len,
            tokenizer=spec.tokenizer,
            shards=tuple(infos[name] for name in sorted(infos)),
            counts=summary,
            tokens=sum(w.tokens for w in shards),
            pad_tokens=sum(w.pad_tokens for w in shards),
            config={**spec.config, "bucket": bucket.spec()},
            dead_letter=(manifest_lib.DEAD_LETTER_FILE,),
            max_ids=merge_max_ids(w.max_ids for w in shards),
            payload_bytes=sum(w.payload_bytes for w in shards),
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        yield manifest_lib.write(directory, result)


class WritePackedDatasets(beam.PTransform):
    """Pack, shard and write one dataset per bucket; see the module docstring.

    Input: a dict of PCollections
      ``segments``: ``(seq_len, Segment)``, each segment at most ``seq_len`` long;
      ``dead_letters``: ``(seq_len or ALL_BUCKETS, DeadLetter)``;
      ``counts``: ``((seq_len or ALL_BUCKETS, name), n)``, names from the spec's count enums, summed per key (:func:`route` makes
      ``segments``, ``counts`` and per-bucket ``dead_letters``);
      ``input_examples``: a single int, the number of records the job read.
    Output: the manifest paths, one per bucket.
    """

    def __init__(self, spec: DatasetSpec):
        super().__init__()
        self.spec = spec

    def expand(self, inputs):
        spec = self.spec
        pipeline = inputs["segments"].pipeline
        segments = inputs["segments"]
        # Keyed where the segments are made (no side input to wait for), so they go straight into the shuffle.
        keyed = segments | "HashToGroups" >> beam.Map(_hash_to_group, spec.hash_groups).with_output_types(
            _GROUPED_SEGMENT)
        plans = (
            keyed
            | "GroupTokens" >> beam.MapTuple(lambda key, data: (key, packing.segment_length(data)))
            | "SumGroupTokens" >> beam.CombinePerKey(sum)
            | "ByBucket" >> beam.MapTuple(lambda key, tokens: (key[0], (key[1], tokens)))
            | "GroupsOfBucket" >> beam.GroupByKey()
            | "Plan" >> beam.MapTuple(lambda seq_len, totals: (seq_len, spec.plan(seq_len, dict(totals))))
        )
        packed_groups = (
            keyed
            | "GroupForPacking" >> beam.GroupByKey()
            | "PackGroups" >> beam.FlatMap(_pack_group, spec, beam.pvalue.AsDict(plans)).with_outputs(
                "leftovers", main="written")
        )
        leftovers = (
            packed_groups.leftovers
            | "GroupLeftovers" >> beam.GroupByKey()
            | "PackLeftovers" >> beam.FlatMap(_pack_leftovers, spec, beam.pvalue.AsDict(plans))
        )
        written = (packed_groups.written, leftovers) | "AllShards" >> beam.Flatten()
        counts = inputs["counts"] | "SumCounts" >> beam.CombinePerKey(sum)
        return (
            pipeline
            | "Buckets" >> beam.Create(list(spec.buckets))
            | "WriteManifests"
            >> beam.ParDo(
                _WriteManifest(spec),
                beam.pvalue.AsList(written),
                beam.pvalue.AsDict(plans),
                beam.pvalue.AsList(counts),
                beam.pvalue.AsList(inputs["dead_letters"]),
                beam.pvalue.AsSingleton(inputs["input_examples"]),
            )
        )
