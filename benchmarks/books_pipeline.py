"""Books pipeline figures: efficiency against plain SentencePiece, and packing utilization.

Efficiency = (tokens/s per core of ``lwm data books`` on the local runner) /
(tokens/s of plain SentencePiece encoding of the same text in one process, one thread:
SentencePiece's batch encode would otherwise use every core).
Per core: the pipeline's tokens/s over wall time divided by its worker count
(CPU time would hide idle time).

Utilization = non-pad tokens / all tokens, packed as the pipeline packs (pack groups
chosen from the data, beside the former fixed 16 groups and the naive one example per
sequence), for three mixes of realistic sizes: text documents of 10K–100K tokens at
L = 32768 (the paper's 32K-stage filter), images (256 codes + caption) at L = 1024,
videos (4–31 frames) at L = 8192.

    .venv/bin/python benchmarks/books_pipeline.py [--books 40] [--workers 1 2] [--src CHECKOUT]

Also printed: bytes moved through the job's shuffles per input token (before and
after shuffling only what must move), and each run's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
import typing

import numpy as np
import sentencepiece

from apache_beam import coders

from orchestration import cli, sample_data
from pipelines import dataset, packing, sources
from pipelines.naming import stable_hash
from pipelines.text_tokenizer import SpecialTokens, TextTokenizer
from schemas import manifest, packed, raw


def _corpus(workdir: pathlib.Path, books: int) -> tuple[pathlib.Path, str]:
    corpus = sample_data.write_books(workdir / "books.jsonl", books, min_sentences=2000, max_sentences=6000, seed=1)
    tokenizer_path = str(workdir / "tok.model")
    cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "2000", "--output", tokenizer_path])
    return corpus, tokenizer_path


# The job in a fresh interpreter that reports its own peak RSS (VmHWM: ru_maxrss would also count the
# benchmark process it was forked from).
_JOB_WITH_PEAK_MEMORY = (
    "import sys; from orchestration import cli; code = cli.main(sys.argv[1:]); "
    "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); sys.exit(code)"
)


def efficiency(workdir: pathlib.Path, corpus: pathlib.Path, tokenizer_path: str, workers: int, src: str) -> dict:
    """The job (``src``'s code) in its own process: tokens/s per core against plain SentencePiece, peak RSS."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    plain = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in plain.encode(texts, num_threads=1))
    baseline = tokens / (time.perf_counter() - start)  # one process, one thread
    del texts

    args = ["data", "books", "--input", str(corpus), "--output", str(workdir / "out"), "--tokenizer", tokenizer_path,
            "--seq-len", "32768", "--overwrite"]
    if workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _JOB_WITH_PEAK_MEMORY, *args], env={**os.environ, "PYTHONPATH": src},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0])
    result = manifest.read(str(workdir / "out" / "seq32768"), verify_hashes=False)
    pipeline = result.tokens / seconds / workers
    return {
        "corpus_tokens": result.tokens,
        "sentencepiece_tokens_per_s_per_core": round(baseline),
        "pipeline_tokens_per_s_per_core": round(pipeline),
        "pipeline_seconds": round(seconds, 1),
        "workers": workers,
        "efficiency": round(pipeline / baseline, 3),
        "peak_rss_mb": round(peak_kib / 1024),  # the job's main process (the runner, and with 1 worker everything)
        "bytes_per_token_on_disk": round(sum(s.bytes for s in result.shards) / (result.tokens + result.pad_tokens), 3),
    }


def shuffle_bytes(corpus: pathlib.Path, tokenizer_path: str, seq_len: int = 32768, groups: int = 16) -> dict:
    """Bytes per input token through each shuffle of the books job, encoded with the coders Beam uses there.

    Untyped elements go through Beam's ``FastPrimitivesCoder`` (pickling objects);
    the packing shuffle's elements are typed, so :class:`~pipelines.dataset.SegmentCoder`
    encodes them. "before" is the job as it was: whole documents through the dedupe
    shuffle and pickled segments through the packing shuffle.
    """
    pickled = coders.registry.get_coder(typing.Any)
    typed = coders.registry.get_coder(dataset._GROUPED_SEGMENT)
    tokenizer = TextTokenizer(tokenizer_path)
    with open(corpus, "rb") as stream:
        documents = list(raw.iter_documents(stream, str(corpus)))
    moved = dict.fromkeys(["dedupe_before", "dedupe_after", "pack_before", "pack_after", "shards"], 0)
    tokens = 0
    per_group: dict[int, list[packing.Segment]] = {}
    for document in documents:
        moved["dedupe_before"] += len(pickled.encode((document.id, document)))
        moved["dedupe_after"] += len(pickled.encode(sources._position(document)))
        framed = tokenizer.frame(tokenizer.encode(document.text), SpecialTokens())
        tokens += len(framed)
        for piece in packing.cut(packing.text_segment(document.id, framed), seq_len):
            key = (seq_len, stable_hash(document.id) % groups)
            moved["pack_before"] += len(pickled.encode((key, piece)))
            moved["pack_after"] += len(typed.encode((key, piece)))
            per_group.setdefault(key[1], []).append(piece)
    for group, segments in per_group.items():
        for index, sequence in enumerate(packing.pack(segments, seq_len)):
            record = dataset.PackedRecord(seq_len, group, index, packed.encode(**packing.to_example(sequence, seq_len)),
                                          sum(map(len, sequence)), {"text": 0})
            moved["shards"] += len(pickled.encode(((seq_len, 0, 1), record)))
    before = moved["dedupe_before"] + moved["pack_before"] + moved["shards"]
    after = moved["dedupe_after"] + moved["pack_after"] + moved["shards"]
    return {"input_tokens": tokens, **{f"{k}_bytes_per_token": round(v / tokens, 3) for k, v in moved.items()},
            "total_before_bytes_per_token": round(before / tokens, 3),
            "total_after_bytes_per_token": round(after / tokens, 3)}


def _segments(kind: str, count: int, rng: random.Random) -> list[packing.Segment]:
    """Synthetic segments of realistic sizes: text documents of 10K–100K tokens (log-uniform, cut at
    32K); images as 256 codes + eov + a 10–60-token caption with its tags; videos as 4–31 frames of 257."""
    segments = []
    for index in range(count):
        if kind == "text":
            segment = packing.text_segment(f"d{index}", np.zeros(int(10_000 * 10 ** rng.random()), np.int32))
            segments.extend(packing.cut(segment, 32768))
            continue
        frames = 1 if kind == "image-text" else rng.randint(4, 31)
        text, vision = rng.randint(10, 60) + 6, frames * 257
        mask = np.concatenate([np.zeros(text, bool), np.ones(vision, bool)])
        segments.append(packing.Segment((f"v{index}", 0), np.zeros(len(mask), np.int32), mask,
                                        np.ones(len(mask), np.float32)))
    return segments


MIXES = {"text": (3000, 32768), "image-text": (2000, 1024), "video-text": (500, 8192)}  # examples, L


def utilization(kind: str, max_groups: int = 16, seed: int = 0) -> dict:
    """Packing utilization of one mix as the pipeline packs it: groups chosen from the data
    (``packing.pack_groups``) beside the former fixed ``max_groups`` hash groups."""
    count, seq_len = MIXES[kind]
    segments = _segments(kind, count, random.Random(seed))
    tokens = sum(len(s) for s in segments)
    result = {"mix": kind, "examples": count, "seq_len": seq_len, "tokens": tokens}
    for label, groups in (("fixed", max_groups), ("from_data", packing.pack_groups(tokens, seq_len, max_groups))):
        per_group: dict[int, list[packing.Segment]] = {}
        for segment in segments:
            per_group.setdefault(stable_hash(segment.key[0]) % groups, []).append(segment)
        sequences = sum(len(packing.pack(group, seq_len)) for group in per_group.values())
        result[f"groups_{label}"] = groups
        result[f"utilization_{label}"] = round(tokens / (sequences * seq_len), 4)
    result["utilization_one_example_per_sequence"] = round(tokens / (len(segments) * seq_len), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--src", default=str(pathlib.Path(__file__).resolve().parents[1]),
                        help="the project checkout whose job is measured (e.g. an older commit, for before/after)")
    parser.add_argument("--skip-utilization", action="store_true")
    args = parser.parse_args()
    print(json.dumps({"cpu_count": os.cpu_count(), "src": args.src}))
    if not args.skip_utilization:
        for kind in MIXES:
            print(json.dumps(utilization(kind)))
    with tempfile.TemporaryDirectory() as workdir:
        corpus, tokenizer_path = _corpus(pathlib.Path(workdir), args.books)
        print(json.dumps(shuffle_bytes(corpus, tokenizer_path)))
        for workers in args.workers:
            print(json.dumps(efficiency(pathlib.Path(workdir), corpus, tokenizer_path, workers, args.src)))


if __name__ == "__main__":
    main()
