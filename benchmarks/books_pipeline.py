"""Books pipeline figures: efficiency against plain SentencePiece, and packing utilization.

Efficiency = (tokens/s per core of ``lwm data books`` on the local runner) /
(tokens/s of plain SentencePiece encoding of the same text in one process, one thread:
SentencePiece's batch encode would otherwise use every core).
Per core: the pipeline's tokens/s over wall time divided by its worker count
(CPU time would hide idle time).

Utilization = non-pad tokens / all tokens at L = 32768 for documents of 10K–100K
tokens (the paper's 32K-stage filter), on a synthetic corpus of that shape, beside
the naive one-document-per-sequence layout (each piece padded to L).

    .venv/bin/python benchmarks/books_pipeline.py [--books 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import tempfile
import time

import numpy as np
import sentencepiece

from orchestration import cli, sample_data
from pipelines import packing
from schemas import manifest


def efficiency(workdir: pathlib.Path, books: int, workers: int) -> dict:
    corpus = sample_data.write_books(workdir / "books.jsonl", books, min_sentences=2000, max_sentences=6000, seed=1)
    tokenizer_path = str(workdir / "tok.model")
    cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "2000", "--output", tokenizer_path])
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    plain = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in plain.encode(texts, num_threads=1))
    baseline = tokens / (time.perf_counter() - start)  # one process, one thread

    args = ["data", "books", "--input", str(corpus), "--output", str(workdir / "out"), "--tokenizer", tokenizer_path,
            "--seq-len", "32768", "--overwrite"]
    if workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    start = time.perf_counter()
    cli.main(args)
    seconds = time.perf_counter() - start
    result = manifest.read(str(workdir / "out" / "seq32768"), verify_hashes=False)
    pipeline = result.tokens / seconds / workers
    return {
        "corpus_tokens": tokens,
        "sentencepiece_tokens_per_s_per_core": round(baseline),
        "pipeline_tokens_per_s_per_core": round(pipeline),
        "pipeline_seconds": round(seconds, 1),
        "workers": workers,
        "efficiency": round(pipeline / baseline, 3),
        "bytes_per_token_on_disk": round(sum(s.bytes for s in result.shards) / (result.tokens + result.pad_tokens), 3),
    }


def utilization(documents: int = 3000, seq_len: int = 32768, groups: int = 16, seed: int = 0) -> dict:
    """Pack documents with log-uniform lengths in [10K, 100K) tokens, as the pipeline does."""
    rng = random.Random(seed)
    lengths = [int(10_000 * 10 ** rng.random()) for _ in range(documents)]
    per_group: dict[int, list[packing.Segment]] = {}
    naive_sequences = 0
    for index, length in enumerate(lengths):
        segment = packing.text_segment(f"d{index}", np.zeros(length, np.int32))
        pieces = packing.cut(segment, seq_len)
        naive_sequences += len(pieces)
        per_group.setdefault(index % groups, []).extend(pieces)
    sequences = sum(len(packing.pack(group, seq_len)) for group in per_group.values())
    tokens = sum(lengths)
    return {
        "documents": documents,
        "pack_groups": groups,
        "utilization_packed": round(tokens / (sequences * seq_len), 4),
        "utilization_one_document_per_sequence": round(tokens / (naive_sequences * seq_len), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--documents", type=int, default=3000)
    args = parser.parse_args()
    print(json.dumps({"cpu_count": os.cpu_count()}))
    print(json.dumps(utilization(args.documents)))
    with tempfile.TemporaryDirectory() as workdir:
        print(json.dumps(efficiency(pathlib.Path(workdir), args.books, args.workers)))


if __name__ == "__main__":
    main()
