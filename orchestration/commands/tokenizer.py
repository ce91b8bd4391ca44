"""`lwm tokenizer train`: a SentencePiece model from a corpus, offline."""

from __future__ import annotations

import collections
import time

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from orchestration.commands import add_examples, add_json_flag, print_json, progress
from pipelines.tokens import text_tokenizer
from pipelines.kit.job import check_inputs
from schemas import raw


def _texts(patterns, counts: collections.Counter):
    """Every book's text; ``counts`` gets ``books`` and each skipped record's reason."""
    for pattern in patterns:
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
                for item in raw.iter_documents(stream, metadata.path):
                    if isinstance(item, raw.Document):
                        counts["books"] += 1
                        yield item.text
                    else:
                        counts[item.reason] += 1


def _skipped(counts: collections.Counter) -> str:
    reasons = {reason: n for reason, n in sorted(counts.items()) if reason != "books"}
    if not reasons:
        return "no record skipped"
    return f"{sum(reasons.values())} record(s) skipped: " + ", ".join(f"{r} {n}" for r, n in reasons.items())


def train(args, extra) -> int:
    check_inputs(args.input)
    counts = collections.Counter()
    start = time.perf_counter()
    try:
        text_tokenizer.train(_texts(args.input, counts), args.vocab_size, args.output, model_type=args.model_type,
                             input_sentence_size=args.input_sentence_size,
                             shuffle_input_sentence=not args.no_shuffle, num_threads=args.threads)
    except ValueError as error:
        if sum(counts.values()):  # the corpus was read: say what it held
            raise ValueError(f"{error}; --input held {counts['books']} book(s), {_skipped(counts)}") from None
        raise
    model = text_tokenizer.TextTokenizer(args.output)
    progress(args, f"read {counts['books']} book(s); {_skipped(counts)}")
    if args.json:
        print_json({"output": args.output, "vocab_size": model.vocab_size, "sha256": model.sha256,
                    "books": counts["books"], "skipped": {r: n for r, n in counts.items() if r != "books"},
                    "seconds": round(time.perf_counter() - start, 3)})
    else:
        print(f"wrote {args.output}: {model.vocab_size} pieces, sha256 {model.sha256}")
    return 0


def register(subparsers) -> None:
    group = subparsers.add_parser("tokenizer").add_subparsers(dest="action", required=True)
    parser = group.add_parser(
        "train",
        help="train a SentencePiece model (BPE, byte fallback, Llama-style special ids) from book files",
        description="Reads .jsonl/.parquet/.txt book files (the `lwm data books` formats) one book at a time and "
        "trains offline on every core. Long lines (a whole book on one line) are fed to SentencePiece in "
        "sentence-sized pieces; above --input-sentence-size sentences it trains on a uniform sample of that many "
        "(seeded: the same corpus gives the same model), so memory follows the sample, not the corpus.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="GLOB", help="book files (any Beam filesystem)")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces (at most; small corpora may give fewer)")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece algorithm")
    parser.add_argument("--input-sentence-size", type=int, default=text_tokenizer.INPUT_SENTENCE_SIZE, metavar="N",
                        help="train on at most N sentences, sampled uniformly over the corpus; 0: every sentence "
                        "(default: %(default)s)")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="take the first --input-sentence-size sentences instead of a uniform sample")
    parser.add_argument("--threads", type=int, metavar="N", help="SentencePiece threads (default: every core)")
    add_json_flag(parser, "output, vocab_size, sha256, books, skipped {reason: count}, seconds")
    parser.set_defaults(func=train)
    add_examples(parser,
                 "lwm tokenizer train --input 'corpus/*.jsonl' --vocab-size 32000 --output tokenizer.model",
                 "lwm tokenizer train --input 'gs://bucket/books/*.jsonl' --vocab-size 32000 --output tokenizer.model "
                 "--input-sentence-size 10000000",
                 "lwm tokenizer train --input books.jsonl --vocab-size 512 --output tok.model --json   # for scripts")
