"""`lwm data ...`: Beam preprocessing jobs and the dataset inspector.

Unknown arguments are Beam pipeline options and pass straight through
(``--runner DataflowRunner --project P --region R --temp_location gs://...``,
``--direct_running_mode=multi_processing --direct_num_workers=2``, ...).
"""

from __future__ import annotations

import logging
import time

from pipelines import books, buckets, inspection
from pipelines.runner import check_inputs, pipeline_options, prepare_output
from pipelines.text_tokenizer import SpecialTokens
from schemas import manifest as manifest_lib


def _bucket_args(parser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq-len", type=int, help="one bucket of this sequence length, any document length")
    which.add_argument(
        "--buckets",
        help="SEQ_LEN:MIN-MAX,... document-length buckets, one dataset each in OUTPUT/seq{L}/, "
        f"or a preset: {', '.join(buckets.PRESETS)}",
    )


def _parse_buckets(args) -> tuple[buckets.Bucket, ...]:
    return buckets.parse(args.buckets) if args.buckets else (buckets.Bucket(args.seq_len),)


def _print_summary(output: str, job_buckets, seconds: float) -> None:
    print(f"done in {seconds:.1f}s")
    for bucket in job_buckets:
        directory = f"{output.rstrip('/')}/{bucket.name}"
        manifest = manifest_lib.read(directory, verify_hashes=False)
        counts = manifest.counts
        dead = sum(counts["dead_letter"].values())
        print(
            f"  {bucket.name}: {manifest.records} records, {manifest.tokens} tokens, "
            f"utilization {manifest.utilization:.4f}; documents {counts['documents']} "
            f"(too short {counts['too_short']}, too long {counts['too_long']}), dead letters {dead} "
            f"of {counts['input_examples']} inputs"
        )


def run_books(args, extra) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    config = books.BooksConfig(
        inputs=tuple(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        buckets=_parse_buckets(args),
        name=args.name,
        text_weight=args.text_weight,
        special=SpecialTokens(bos=not args.no_bos, eos=not args.no_eos),
        pack_groups=args.pack_groups,
        shard_bytes=args.shard_mb << 20,
        num_shards=args.num_shards,
    )
    check_inputs(config.inputs)
    prepare_output([f"{config.output.rstrip('/')}/{b.name}" for b in config.buckets], args.overwrite)
    options = pipeline_options(extra)
    start = time.time()
    print(f"lwm data books: {len(config.buckets)} bucket(s) → {config.output} ({options.get_all_options()['runner']})")
    books.run(config, options)
    if options.get_all_options()["runner"] == "DataflowRunner":
        return 0
    _print_summary(config.output, config.buckets, time.time() - start)
    return 0


def run_inspect(args, extra) -> int:
    print(inspection.inspect(args.directory, record=args.record, tokenizer=args.tokenizer, verify_hashes=not args.no_verify))
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="preprocessing jobs (Beam) and dataset inspection")
    group = data.add_subparsers(dest="job", required=True, metavar="JOB")

    parser = group.add_parser(
        "books",
        help="raw books → packed ArrayRecord shards, one dataset per length bucket",
        description=__doc__,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="GLOB", help=".jsonl/.json/.parquet/.txt (.gz) files")
    parser.add_argument("--output", required=True, help="output directory (local or gs://)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    _bucket_args(parser)
    parser.add_argument("--name", default="books", help="shard name prefix")
    parser.add_argument("--text-weight", type=float, default=1.0, help="loss weight of text tokens")
    parser.add_argument("--no-bos", action="store_true", help="do not add BOS at each document start")
    parser.add_argument("--no-eos", action="store_true", help="do not add EOS at each document end")
    parser.add_argument("--pack-groups", type=int, default=16, help="hash groups per bucket packed independently")
    parser.add_argument("--shard-mb", type=int, default=256, help="target shard size in MiB")
    parser.add_argument("--num-shards", type=int, help="fixed number of shards per bucket")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier output in the bucket directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="log Beam progress")
    parser.set_defaults(func=run_books, accepts_extra=True)

    parser = group.add_parser("inspect", help="summary and one decoded record of a packed dataset")
    parser.add_argument("directory", help="a dataset directory (holding manifest.json)")
    parser.add_argument("--record", type=int, default=0, help="which record of the first shard to show")
    parser.add_argument("--tokenizer", help="tokenizer to render text with (default: the manifest's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    parser.set_defaults(func=run_inspect)
