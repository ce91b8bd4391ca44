"""Running a data job: the kit every job module uses (see :mod:`pipelines` for how to add one).

A job is a :class:`Job`: its name, its config dataclass (holding an
``output: OutputConfig``), a ``check`` of its inputs and a ``build`` that adds it to a
Beam pipeline. :func:`run` does what every job needs around that, in this order:

1. check every input (globs, tokenizer, job-specific files) and the output's
   writability, before any output is touched;
2. refuse existing output unless ``overwrite``; with it, build into a staging
   directory beside the output (:func:`pipelines.kit.naming.staging_dir`);
3. run the pipeline (or, ``dry_run``, only build it and describe it);
4. swap each new dataset into place; the old one stays readable until then.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipelines.kit import naming
from pipelines.kit import progress
from pipelines.kit import beam_runner as runner
from pipelines.kit.buckets import Bucket
from pipelines.kit.output import OutputConfig
from schemas import manifest as manifest_lib
from schemas import storage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """One data job, as :mod:`pipelines` registers it and ``lwm data NAME`` runs it."""

    name: str  # the CLI command and the manifests' ``job``
    config: type  # its frozen config dataclass, with an ``output: OutputConfig`` field
    build: Callable[[beam.Pipeline, Any], Any]  # adds the job to a pipeline (given the config)
    check: Callable[[Any], tuple[int, int]]  # raises ValueError for a bad input, else (input files, bytes); never writes
    help: str  # one line for ``lwm data --help``
    # Flag names for fields of configs owned elsewhere, by dotted path (None: keep off the CLI).
    renames: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    # Runnable ``lwm data NAME ...`` lines (optionally ``# what it does``) for the end of its --help.
    examples: tuple[str, ...] = ()

    def run(self, config, options: PipelineOptions | None = None, *, dry_run: bool = False) -> "JobResult":
        """``pipelines.books.run(config, options)``: see :func:`run`."""
        return run(self, config, options, dry_run=dry_run)


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What a finished (or submitted, or dry-run) job reports."""

    job: str
    output: OutputConfig
    runner: str
    seconds: float
    counters: dict[str, int]  # the job's Beam counters (namespace ``lwm``)
    manifests: dict[str, manifest_lib.Manifest]  # bucket directory → its manifest; empty unless complete
    description: str = ""  # dry run: the resolved options and stage names
    warnings: tuple[str, ...] = ()  # e.g. buckets that got no records

    def to_dict(self) -> dict[str, Any]:
        """``lwm data JOB --json``: job, output, runner, seconds, counters, ``datasets`` (bucket directory →
        its manifest's fields, ``records`` and ``utilization`` included; empty until the job completes),
        warnings, and ``dry_run`` (the description) for a dry run, else null."""
        return {"job": self.job, "output": self.output.output, "runner": self.runner,
                "seconds": round(self.seconds, 3), "counters": dict(self.counters),
                "datasets": {d: json.loads(m.to_json()) for d, m in self.manifests.items()},
                "warnings": list(self.warnings), "dry_run": self.description or None}

    def summary(self) -> str:
        if self.description:
            return self.description
        if not self.manifests:
            return f"submitted to {self.runner}; a dataset is complete once its manifest.json exists"
        lines = [f"done in {self.seconds:.1f}s; " + ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items()))]
        for directory, manifest in self.manifests.items():
            counts = manifest.counts
            lines.append(
                f"  {directory}: {manifest.records} records, {manifest.tokens} tokens, "
                f"utilization {manifest.utilization:.4f}; documents {counts['documents']} "
                f"(too short {counts['too_short']}, too long {counts['too_long']}), "
                f"dead letters {sum(counts['dead_letter'].values())} of {counts['input_examples']} inputs")
        return "\n".join(lines)


def check_inputs(patterns: Sequence[str]) -> tuple[int, int]:
    """Every input pattern matches at least one file; returns (files, bytes) over all of them."""
    if not patterns:
        raise ValueError("no --input given")
    files = {}
    for pattern in patterns:
        matched = FileSystems.match([pattern])[0].metadata_list
        if not matched:
            raise ValueError(f"--input {pattern!r} matches no file")
        files.update((m.path, m.size_in_bytes) for m in matched)
    return len(files), sum(files.values())


def check_tokenizer(path: str):
    """The SentencePiece model at ``path``, loaded; a missing or wrong file is a one-line ValueError."""
    from pipelines.tokens.text_tokenizer import TextTokenizer

    if not FileSystems.exists(path):
        raise ValueError(f"--tokenizer {path!r} does not exist (train one with `lwm tokenizer train`)")
    try:
        return TextTokenizer(path)
    except Exception as error:  # SentencePiece raises RuntimeError/OSError for a file it cannot parse
        raise ValueError(f"--tokenizer {path!r} is not a SentencePiece model ({type(error).__name__})") from None


def check_writable(output: str) -> None:
    """The output directory can be created and written (probed with a small file), before any work."""
    try:
        storage.probe_writable(output)
    except OSError as error:
        raise ValueError(f"--output {output!r} is not writable ({error.strerror or type(error).__name__})") from None


def _holds_files(directory: str) -> bool:
    return bool(FileSystems.match([FileSystems.join(directory, "**")])[0].metadata_list)


def check_free_space(output: str, input_bytes: int) -> None:
    """Warn when a local output's filesystem has less free space than the input's size (a rough
    bound of one dataset: about 2 bytes per token against about 4 bytes of text)."""
    if not storage.is_local(output):
        return
    free = shutil.disk_usage(storage.absolute(output)).free
    if free < input_bytes:
        log.warning("only %.1f MiB free under %s for %.1f MiB of input: the datasets may not fit",
                    free / 2**20, output, input_bytes / 2**20)


def prepare_output(output: OutputConfig) -> str | None:
    """Check the output and decide where this run writes; returns the staging root, or None to write in place.

    Existing files in a bucket directory are refused unless ``overwrite``; with it
    the run writes into a fresh staging root beside them (a stale one, left by a
    killed run, is removed first) and :func:`swap_in` replaces the old datasets at the end.
    """
    check_writable(output.output)
    staging = naming.staging_dir(output.output)
    if output.overwrite:
        storage.remove(staging, recursive=True)
    existing = [naming.bucket_dir(output.output, b.name) for b in output.buckets]
    existing = [d for d in existing if _holds_files(d)]
    if not existing:
        return None
    if not output.overwrite:
        raise ValueError(f"{existing[0]} already holds files; pass --overwrite to replace them")
    return staging


def swap_in(staging: str, output: OutputConfig) -> None:
    """Move each staged dataset into place, replacing the old one (see :func:`_replace`), then drop the staging root."""
    for bucket in output.buckets:
        _replace(naming.bucket_dir(staging, bucket.name), naming.bucket_dir(output.output, bucket.name))
    storage.remove(staging, recursive=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two local directories (Linux ``renameat2``); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_cwd = -100
    if libc.renameat2(at_cwd, a.encode(), at_cwd, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def _replace(new: str, target: str) -> None:
    """Put the complete dataset ``new`` at ``target``.

    Locally the two directories are exchanged in one atomic step, so ``target``
    always holds a complete dataset (old, then new). On object stores, which have
    no atomic rename, the old manifest goes first (readers then refuse the
    directory as incomplete rather than mixing datasets), then the old files, then
    the new files with the new manifest last.
    """
    if storage.is_local(target):
        new, target = storage.absolute(new), storage.absolute(target)
        if not os.path.exists(target):
            os.rename(new, target)
        elif _exchange(new, target):
            shutil.rmtree(new)
        else:
            old = f"{new}.old"
            os.rename(target, old)
            os.rename(new, target)
            shutil.rmtree(old)
        return
    storage.remove(storage.join(target, manifest_lib.MANIFEST_NAME))
    storage.remove(target, recursive=True)
    files = [p for p in storage.glob(storage.join(new, "**")) if storage.isfile(p)]
    files.sort(key=lambda p: p.endswith("/" + manifest_lib.MANIFEST_NAME))
    for path in files:
        destination = storage.join(target, path[len(new.rstrip("/")) + 1:])
        storage.makedirs(destination.rsplit("/", 1)[0])  # a no-op on object stores
        storage.rename(path, destination)


def stage_names(pipeline: beam.Pipeline) -> list[str]:
    """The job graph's stages: each top-level transform and, indented, its parts."""
    names = []
    for transform in pipeline.transforms_stack[0].parts:
        names.append(transform.full_label)
        names.extend(f"  {part.full_label}" for part in transform.parts)
    return names


def describe(pipeline: beam.Pipeline, options: PipelineOptions) -> str:
    """``--dry-run``: the resolved options and the stage names; nothing runs and nothing is written.

    With ``--runner DataflowRunner`` the runner also builds its job description (the
    Dataflow ``Job`` and the portable pipeline it submits) offline, with Beam's own
    ``--dry_run``: no credentials and no upload; the package workers would install is
    built locally.
    """
    lines = ["pipeline options:"]
    lines += [f"  --{k}={v}" for k, v in sorted(options.get_all_options(drop_default=True).items())]
    lines += ["stages:"] + [f"  {name}" for name in stage_names(pipeline)]
    if _is_dataflow(options):
        job = dataflow_job(pipeline)
        lines.append(f"Dataflow job {job.proto.name!r} ({job.proto.type_.name}): "
                     f"{len(job.proto_pipeline.components.transforms)} transforms in its portable pipeline")
    return "\n".join(lines)


def _is_dataflow(options: PipelineOptions) -> bool:
    return "dataflow" in (options.view_as(StandardOptions).runner or "").lower()


def dataflow_job(pipeline: beam.Pipeline):
    """The ``apiclient.Job`` DataflowRunner would submit for ``pipeline``, built offline: the pipeline's
    options must hold Beam's ``--dry_run`` from its construction on (its validation then skips GCS too)."""
    if not pipeline.options.view_as(TestOptions).dry_run:
        raise ValueError("dataflow_job needs a pipeline built with --dry_run")
    return pipeline.run().job


def _counters(result) -> dict[str, int]:
    counters = result.metrics().query(MetricsFilter().with_namespace(naming.METRICS_NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in counters:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return totals


def run(job: Job, config, options: PipelineOptions | None = None, *, dry_run: bool = False) -> JobResult:
    """Run ``job`` with ``config`` on Beam ``options`` (default: the offline local runner) and
    return what it wrote; see the module docstring for the steps."""
    options = options or runner.pipeline_options([])
    runner_name = options.view_as(StandardOptions).runner
    input_files, input_bytes = job.check(config)
    output = config.output
    staging = None if dry_run else prepare_output(output)
    staged = config if staging is None else dataclasses.replace(
        config, output=dataclasses.replace(output, output=staging))
    if not dry_run:
        check_free_space(output.output, input_bytes)
    progress.start(input_bytes, input_files)
    start = time.time()
    if dry_run and _is_dataflow(options):
        options.view_as(TestOptions).dry_run = True
    pipeline = beam.Pipeline(options=options)
    job.build(pipeline, staged)
    if dry_run:
        return JobResult(job.name, output, runner_name, 0.0, {}, {}, describe(pipeline, options))
    log.info("lwm data %s: %d bucket(s) → %s (%s)", job.name, len(output.buckets), output.output, runner_name)
    result = pipeline.run()
    result.wait_until_finish()
    counters = _counters(result)
    directories = [naming.bucket_dir(output.output, b.name) for b in output.buckets]
    if not all(storage.exists(storage.join(naming.bucket_dir(staged.output.output, b.name), manifest_lib.MANIFEST_NAME))
               for b in output.buckets):
        return JobResult(job.name, output, runner_name, time.time() - start, counters, {})
    if staging is not None:
        swap_in(staging, output)
    manifests = {d: manifest_lib.read(d, verify_hashes=False) for d in directories}
    warnings = tuple(empty_bucket_warning(b, m) for b, m in zip(output.buckets, manifests.values()) if not m.records)
    for warning in warnings:
        log.warning("%s", warning)
    return JobResult(job.name, output, runner_name, time.time() - start, counters, manifests, warnings=warnings)


def empty_bucket_warning(bucket: Bucket, manifest: manifest_lib.Manifest) -> str:
    """Why a bucket's dataset has no records, and which document lengths it would need."""
    counts = manifest.counts
    wanted = f"{bucket.min_tokens}" + (f" to {bucket.max_tokens - 1}" if bucket.max_tokens else " or more")
    return (f"{bucket.name} is empty: it takes documents of {wanted} tokens; of {counts['input_examples']} inputs "
            f"{counts['too_short']} were shorter, {counts['too_long']} longer, "
            f"{sum(counts['dead_letter'].values())} dead-lettered")

