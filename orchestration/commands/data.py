"""`lwm data ...`: Beam preprocessing jobs and the dataset inspector.

Each job's flags are derived from its config dataclass (``pipelines.JOBS``). Other
arguments are Beam pipeline options and pass through (``--runner DataflowRunner
--project P --region R --temp_location gs://...``,
``--direct_running_mode=multi_processing --direct_num_workers=2``, ...); an
argument that neither the job nor Beam knows is an error.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import signal
import sys

import yaml

import pipelines
from orchestration.commands import add_examples, add_json_flag, print_json
from schemas import flags
from pipelines.kit import inspection
from pipelines.kit import job as job_lib
from pipelines.kit import progress
from pipelines.kit import beam_runner as runner


class _JobLog(logging.StreamHandler):
    """The job's lines on the current ``sys.stderr``: plain messages, ``warning: ...`` for warnings."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: this project's progress lines; -v: Beam's INFO logs and shard details too.

    The job's own lines go to stderr through one handler of the ``pipelines`` logger; a root
    handler may already exist (Beam's), so levels are set explicitly rather than by ``basicConfig``.
    """
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    ours = logging.getLogger("pipelines")
    ours.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    if not any(isinstance(h, _JobLog) for h in ours.handlers):
        ours.addHandler(_JobLog())
    ours.propagate = False


def _on_interrupt(job: job_lib.Job, output: str):
    """A SIGINT handler: one line saying what is left, exit 130 at once.

    Beam runs bundles in threads and worker processes that would each print a
    traceback for a KeyboardInterrupt; the old dataset (with ``--overwrite``) is
    untouched until the job's final swap, which is atomic.
    """

    def handler(signum, frame):
        print(f"lwm data {job.name}: interrupted; the output in {output} is incomplete and readers will refuse it "
              "(an existing dataset there is unchanged; rerun with --overwrite)", file=sys.stderr, flush=True)
        os._exit(130)

    return handler


def run_job(job: job_lib.Job, parser: argparse.ArgumentParser, args, extra) -> int:
    config = flags.from_args(job.config, args)
    if args.print_config:
        print(yaml.safe_dump({"job": job.name, "config": flags.to_mapping(config)}, sort_keys=False), end="")
        return 0
    options = runner.pipeline_options(extra, known=[o for a in parser._actions for o in a.option_strings])
    _configure_logging(args.verbose - args.quiet)
    progress.enable(not args.quiet)
    previous = signal.signal(signal.SIGINT, _on_interrupt(job, config.output.output))
    try:
        result = job.run(config, options, dry_run=args.dry_run)
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.summary())
    return 0


def run_inspect(args, extra) -> int:
    options = dict(record=args.record, tokenizer=args.tokenizer, verify_hashes=not args.no_verify)
    if args.json:
        print_json(inspection.inspect_dict(args.directory, **options))
    else:
        print(inspection.inspect(args.directory, **options))
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout in ``--help``."""


def register(subparsers) -> None:
    data = subparsers.add_parser("data")
    group = data.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, module in pipelines.JOBS.items():
        job = importlib.import_module(module).JOB
        parser = group.add_parser(name, help=job.help, description=f"{job.help}\n\n{__doc__}", formatter_class=_Formatter)
        flags.add_flags(parser, job.config, renames=job.renames)
        parser.add_argument("--dry-run", action="store_true",
                            help="print the resolved pipeline options and the job graph's stages; run nothing")
        parser.add_argument("--print-config", action="store_true",
                            help="print the job's resolved config as a stage plan's datasets: entry takes it "
                            "({job: ..., config: ...}, YAML); run nothing")
        add_json_flag(parser, "job, output, runner, seconds, counters, datasets {directory: manifest fields}, "
                      "warnings, dry_run (the --dry-run description, else null)")
        parser.set_defaults(func=functools.partial(run_job, job, parser), accepts_extra=True)
        add_examples(parser, *job.examples)

    parser = group.add_parser("inspect", help="summary and one decoded record of a packed dataset")
    parser.add_argument("directory", help="a dataset directory (holding manifest.json)")
    parser.add_argument("--record", type=int, default=0, help="which record to show, counted over the shards in manifest order (default: 0)")
    parser.add_argument("--tokenizer", help="tokenizer to render text with (default: the manifest's, by its absolute uri)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    add_json_flag(parser, "dataset, manifest (manifest.json's fields with records and utilization), record "
                  "{index, shard, index_in_shard, segments [{segment, tokens, spans [{text, loss_weight, vision}]}], "
                  "padding, note}")
    parser.set_defaults(func=run_inspect)
    add_examples(parser,
                 "lwm data inspect out/seq32768              # manifest summary + record 0, loss spans marked",
                 "lwm data inspect out/seq32768 --record 5 --no-verify",
                 "lwm data inspect out/seq32768 --json       # the same as one JSON document")
