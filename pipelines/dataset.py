"""The back half of every data job: segments → packed, sharded, manifested datasets.

:class:`WritePackedDatasets` takes what a job's front half produced (books,
image-text or video-text alike) and writes one dataset per length bucket into
``OUTPUT/seq{L}/``:

1. each bucket's token total (summed where the segments are made) fixes its
   :class:`BucketPlan`: how many pack groups (as many as the bucket's size allows
   without costing utilization, :func:`pipelines.packing.pack_groups`, at most
   ``pack_groups``) and how many shards, each shard owned by one group;
2. segments cross the one shuffle as bytes (:func:`pipelines.packing.segment_to_bytes`,
   about 2 bytes per token), keyed by (bucket, hash of their document id % groups)
   so no key is hot;
3. each group is sorted (GroupByKey order is not deterministic), packed with
   best-fit-decreasing, and its sequences dealt round-robin over the group's own
   shards, each encoded (:mod:`schemas.packed`) and written with ``group_size:1``
   to a temporary name (a local file first where the output is remote) and
   renamed when complete; so packed records are never shuffled or held beyond
   one shard;
4. once every shard exists, each bucket's dead letters and then its
   ``manifest.json`` are written (:mod:`schemas.manifest`), with an empty shard
   for any group the hash left without segments.

Every choice is a function of the data (stable hashes, sorted groups), so the
same inputs and config give byte-identical shards in every running mode.

Memory on the local runner: ``FnApiRunner`` holds a stage's output until the next
stage has read it, and a GroupByKey's input as decoded values; so what crosses
stages here is bytes (segments), or small (token totals, shard summaries).
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
from typing import Any, Callable, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from array_record.python.array_record_module import ArrayRecordWriter

from pipelines import packing
from pipelines.buckets import Bucket, Count
from pipelines.naming import METRICS_NAMESPACE, bucket_dir, stable_hash
from pipelines.output import OutputConfig, recorded
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
        ``tokenizer`` is the job's loaded :class:`~pipelines.text_tokenizer.TextTokenizer`; ``counts``
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

    def plan(self, seq_len: int, tokens: int) -> "BucketPlan":
        """The plan of a bucket of ``tokens`` tokens: groups from the data; ``num_shards`` shards (then at
        most that many groups) or shards of about ``shard_mb`` (estimated at 2 bytes per token, full
        sequences), at least one per group."""
        groups = packing.pack_groups(tokens, seq_len, self.output.pack_groups)
        if self.output.num_shards:
            return BucketPlan(min(groups, self.output.num_shards), self.output.num_shards)
        sequences = math.ceil(tokens / seq_len)
        by_size = max(1, min(sequences, math.ceil(sequences * seq_len * 2 / self.output.shard_bytes)))
        return BucketPlan(groups, max(groups, by_size))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """How one bucket is packed and written: ``groups`` pack groups, ``shards`` shards, each group
    writing its own consecutive run of shards (so no second shuffle brings records to their shard)."""

    groups: int
    shards: int

    def shards_of(self, group: int) -> range:
        return range(group * self.shards // self.groups, (group + 1) * self.shards // self.groups)


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


_KEYED_SEGMENT = beam.typehints.Tuple[int, int, bytes]  # (seq_len, hash of the document id, encoded segment)
_GROUPED_SEGMENT = beam.typehints.Tuple[beam.typehints.Tuple[int, int], bytes]  # ((seq_len, group), segment)


def _encode_segment(item) -> tuple[int, int, bytes]:
    """(seq_len, Segment) → (seq_len, stable hash of its document id, its bytes): what is held and shuffled
    (the hash in 63 bits: Beam's ``VarIntCoder`` holds signed 64-bit ints)."""
    seq_len, segment = item
    return seq_len, stable_hash(segment.key[0]) >> 1, packing.segment_to_bytes(segment)


def _key_by_group(item, plans: dict[int, BucketPlan]):
    """(seq_len, id hash, bytes) → ((seq_len, group), bytes)."""
    seq_len, id_hash, data = item
    return (seq_len, id_hash % plans[seq_len].groups), data


def _pack_and_write(item, spec: DatasetSpec, plans: dict[int, BucketPlan]) -> Iterable[WrittenShard]:
    """One pack group → its packed sequences, dealt round-robin over the group's own shards, written."""
    (seq_len, group), encoded = item
    sequences = packing.pack([packing.segment_from_bytes(data) for data in encoded], seq_len)
    Metrics.counter(METRICS_NAMESPACE, "packed_examples").inc(len(sequences))
    plan = plans[seq_len]
    shards = plan.shards_of(group)
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
        plans = (
            segments
            | "SegmentTokens" >> beam.MapTuple(lambda seq_len, segment: (seq_len, len(segment)))
            | "BucketTokens" >> beam.CombinePerKey(sum)
            | "Plan" >> beam.MapTuple(lambda seq_len, tokens: (seq_len, spec.plan(seq_len, tokens)))
        )
        # Encoded inside the producer's stage: the segments wait for their plan, then cross the shuffle, as bytes.
        written = (
            segments
            | "Encode" >> beam.Map(_encode_segment).with_output_types(_KEYED_SEGMENT)
            | "KeyByGroup" >> beam.Map(_key_by_group, beam.pvalue.AsDict(plans)).with_output_types(_GROUPED_SEGMENT)
            | "GroupForPacking" >> beam.GroupByKey()
            | "PackAndWrite" >> beam.FlatMap(_pack_and_write, spec, beam.pvalue.AsDict(plans))
        )
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
