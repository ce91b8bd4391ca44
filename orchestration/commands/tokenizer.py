"""`lwm tokenizer train`: a SentencePiece model from a corpus, offline."""

from __future__ import annotations

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines import text_tokenizer
from pipelines.job import check_inputs
from schemas import raw


def _texts(patterns):
    for pattern in patterns:
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
                for item in raw.iter_documents(stream, metadata.path):
                    if isinstance(item, raw.Document):
                        yield item.text


def train(args, extra) -> int:
    check_inputs(args.input)
    text_tokenizer.train(_texts(args.input), args.vocab_size, args.output, model_type=args.model_type)
    model = text_tokenizer.TextTokenizer(args.output)
    print(f"wrote {args.output}: {model.vocab_size} pieces, sha256 {model.sha256}")
    return 0


def register(subparsers) -> None:
    group = subparsers.add_parser("tokenizer", help="train text tokenizers").add_subparsers(dest="action", required=True)
    parser = group.add_parser(
        "train",
        help="train a SentencePiece model (BPE, byte fallback, Llama-style special ids) from book files",
        description="Reads .jsonl/.parquet/.txt book files (the `lwm data books` formats) and trains offline.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="GLOB", help="book files (any Beam filesystem)")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces (at most; small corpora may give fewer)")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.set_defaults(func=train)
