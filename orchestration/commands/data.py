"""`lwm data ...`: Beam preprocessing jobs and the dataset inspector.

Unknown arguments are Beam pipeline options and pass straight through
(``--runner DataflowRunner --project P --region R --temp_location gs://...``,
``--direct_running_mode=multi_processing --direct_num_workers=2``, ...).
"""

from __future__ import annotations

import logging
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from pipelines import books, buckets, inspection
from pipelines.dataset import NAMESPACE
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


def _common_args(parser, name: str) -> None:
    """Options every data job shares (after its own ``--input``)."""
    parser.add_argument("--output", required=True, help="output directory (local or gs://)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    _bucket_args(parser)
    parser.add_argument("--name", help=f"shard name prefix (default {name})")
    parser.add_argument("--text-weight", type=float, default=1.0, help="loss weight of text tokens")
    parser.add_argument("--no-bos", action="store_true", help="do not add BOS at each document start")
    parser.add_argument("--no-eos", action="store_true", help="do not add EOS at each document end")
    parser.add_argument("--pack-groups", type=int, default=16, help="hash groups per bucket packed independently")
    parser.add_argument("--shard-mb", type=int, default=256, help="target shard size in MiB")
    parser.add_argument("--num-shards", type=int, help="fixed number of shards per bucket")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier output in the bucket directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="log Beam progress")


def _vision_args(parser) -> None:
    """LWM layout and encoding options of the image-text and video-text jobs."""
    parser.add_argument("--generation-fraction", type=float, default=0.5,
                        help="share of examples laid out caption → vision (the rest vision → caption), by id")
    parser.add_argument("--layout-salt", default="", help="changes which examples get which direction")
    parser.add_argument("--template", choices=("plain", "chat"), default="plain",
                        help="plain: caption and <vision>…</vision> only; chat: LWM's USER/ASSISTANT format")
    parser.add_argument("--vision-weight", type=float, default=1.0, help="loss weight of vision tokens")
    parser.add_argument("--no-condition-loss", action="store_true",
                        help="no loss on the conditioning side (the caption in generation, the vision in understanding)")
    parser.add_argument("--resample-to-fit", action="store_true",
                        help="keep the most evenly spaced frames that fit a bucket instead of dead-lettering too_long")
    parser.add_argument("--min-frames", type=int, default=1, help="with --resample-to-fit, the fewest frames to keep")
    parser.add_argument("--encode-batch", type=int, default=16, help="frames per VQGAN call (batched across examples)")


def _video_args(parser) -> None:
    parser.add_argument("--fps", type=float, default=4.0, help="frames sampled per second (0: --max-frames spread evenly)")
    parser.add_argument("--max-frames", type=int, help="at most this many frames per video, evenly spread")
    parser.add_argument("--max-duration", type=float, default=600.0, help="dead-letter videos longer than this (s)")
    parser.add_argument("--ffmpeg-timeout", type=float, default=120.0, help="limit for each ffmpeg call (s)")


def _print_summary(output: str, job_buckets, seconds: float, result) -> None:
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals = {c.key.metric.name: c.committed for c in counters}
    print(f"done in {seconds:.1f}s; " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
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


def _run_job(job: str, config, run, overwrite: bool, extra) -> int:
    """What every data job does around its library call: check inputs, clear output, run, summarise."""
    check_inputs(config.inputs)
    prepare_output([f"{config.output.rstrip('/')}/{b.name}" for b in config.buckets], overwrite)
    options = pipeline_options(extra)
    start = time.time()
    print(f"lwm data {job}: {len(config.buckets)} bucket(s) → {config.output} ({options.get_all_options()['runner']})")
    result = run(config, options)
    if "dataflow" in options.get_all_options()["runner"].lower():
        print(f"submitted ({result.state}); a dataset is complete once its manifest.json exists")
        return 0
    _print_summary(config.output, config.buckets, time.time() - start, result)
    return 0


def _common(args) -> dict:
    """Config fields every data job takes from the shared options."""
    return dict(
        inputs=tuple(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        buckets=_parse_buckets(args),
        special=SpecialTokens(bos=not args.no_bos, eos=not args.no_eos),
        pack_groups=args.pack_groups,
        shard_bytes=args.shard_mb << 20,
        num_shards=args.num_shards,
    )


def run_books(args, extra) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    config = books.BooksConfig(name=args.name or "books", text_weight=args.text_weight, **_common(args))
    return _run_job("books", config, books.run, args.overwrite, extra)


def run_vision(args, extra) -> int:
    from pipelines import image_text, media, video_text, vision_layout, vision_text
    from pipelines.vqgan import CONFIG_FILE

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not FileSystems.exists(FileSystems.join(args.vqgan, CONFIG_FILE)):
        raise ValueError(f"--vqgan {args.vqgan!r} holds no {CONFIG_FILE}: not VQGAN weights (see lwm convert vqgan-import)")
    if args.job == "image-text":
        kind, run = image_text.ImageMedia(min_short_side=args.min_image_side), image_text.run
    else:
        video = media.VideoConfig(fps=args.fps or None, max_frames=args.max_frames, max_duration_s=args.max_duration,
                                  timeout_s=args.ffmpeg_timeout)
        kind, run = video_text.VideoMedia(video), video_text.run
    layout = vision_layout.LayoutConfig(
        generation_fraction=args.generation_fraction,
        text_weight=args.text_weight,
        vision_weight=args.vision_weight,
        condition_loss=not args.no_condition_loss,
        template=args.template,
        salt=args.layout_salt,
    )
    config = vision_text.VisionConfig(
        vqgan=args.vqgan, media=kind, name=args.name or "", layout=layout, resample_to_fit=args.resample_to_fit,
        min_frames=args.min_frames, encode_batch=args.encode_batch, **_common(args),
    )
    return _run_job(args.job, config, run, args.overwrite, extra)


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
    _common_args(parser, "books")
    parser.set_defaults(func=run_books, accepts_extra=True)

    for job, kind in (("image-text", "image"), ("video-text", "video")):
        parser = group.add_parser(
            job,
            help=f"{kind}-caption pairs → VQGAN codes in LWM's layout → packed ArrayRecord shards per length bucket",
            description=__doc__,
        )
        parser.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                            help=f".jsonl/.json/.parquet (.gz) files: id, caption, and inline '{kind}' bytes "
                                 "(base64 in JSON) or a 'path'/'url' (local or gs://; relative to the input file)")
        parser.add_argument("--vqgan", required=True, help="VQGAN weights directory (lwm convert vqgan-import)")
        _common_args(parser, job.replace("-", "_"))
        _vision_args(parser)
        if kind == "image":
            parser.add_argument("--min-image-side", type=int, default=0, help="dead-letter images with a shorter side")
        else:
            _video_args(parser)
        parser.set_defaults(func=run_vision, accepts_extra=True)

    parser = group.add_parser("inspect", help="summary and one decoded record of a packed dataset")
    parser.add_argument("directory", help="a dataset directory (holding manifest.json)")
    parser.add_argument("--record", type=int, default=0, help="which record of the first shard to show")
    parser.add_argument("--tokenizer", help="tokenizer to render text with (default: the manifest's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    parser.set_defaults(func=run_inspect)
