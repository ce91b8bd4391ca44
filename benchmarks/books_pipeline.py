"""Books pipeline figures: efficiency against plain SentencePiece, and packing utilization.

Efficiency = (tokens/s per core of ``lwm data books`` on the local runner) /
(tokens/s of plain SentencePiece encoding the corpus's first texts in one process, one
thread: SentencePiece's batch encode would otherwise use every core; the mean of a pass
right before the job and one right after, so a drift in the machine's speed cancels).
Per core: the pipeline's tokens/s over wall time divided by its worker count
(CPU time would hide idle time): over the whole command (interpreter, imports and the
job), and over the job alone (the "done in" time the job reports: from its start to its
end, worker processes' start-up included). Also against the SentencePiece speed the
job's own workers had (its ``tokenize_cpu_ms`` counter), which plain SentencePiece's
run-to-run spread on a shared machine does not move.

Utilization = non-pad tokens / all tokens, packed as the pipeline packs (16 hash groups,
each packed alone where the bucket is large, their least full sequences repacked
together), beside the 16 groups each packed alone, everything packed as one group, and
the naive one example per sequence, for three mixes of realistic sizes: text documents
of 10K–100K tokens at L = 32768 (the paper's 32K-stage filter), images (256 codes +
caption) at L = 1024, videos (4–31 frames) at L = 8192.

    .venv/bin/python benchmarks/books_pipeline.py [--books 120 480] [--workers 1 2] [--src CHECKOUT]

Also printed: bytes moved through the job's shuffles per input token (before and
after shuffling only what must move); for each run the CPU seconds of the job's own
process (the runner; with one worker everything) and of its worker processes, and
its peak RSS; with two or more corpus sizes, the peak RSS per added input token
(least-squares over the sizes; one worker: the whole job in one process), and the
job's time split into fixed seconds (start-up, stage hand-offs, shutdown) and seconds
per token: the efficiency a large corpus tends to and the size at which it reaches 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time
import typing

import numpy as np
import sentencepiece

from apache_beam import coders

from orchestration import cli
from trainer.evaluation import synthetic_books as sample_data
from pipelines.kit import packed_writer as dataset
from pipelines.kit import packing
from pipelines.kit import sources
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from schemas import manifest, packed, raw


def _corpus(workdir: pathlib.Path, books: int) -> pathlib.Path:
    return sample_data.write_books(workdir / f"books{books}.jsonl", books, min_sentences=2000, max_sentences=6000,
                                   seed=1)


def _tokenizer(workdir: pathlib.Path, corpus: pathlib.Path) -> str:
    tokenizer_path = str(workdir / "tok.model")
    cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "2000", "--output", tokenizer_path])
    return tokenizer_path


# The job in a fresh interpreter that reports its own peak RSS (VmHWM: ru_maxrss would also count the
# benchmark process it was forked from) and the CPU time of itself and of its (finished) worker processes.
_JOB_WITH_USAGE = (
    "import resource, sys; from orchestration import cli; code = cli.main(sys.argv[1:]); "
    "own, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)); "
    "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].strip(), "
    "'cpu', own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime, file=sys.stderr); sys.exit(code)"
)


BASELINE_TEXTS = 120  # the corpus's first texts (about 6.5M tokens) that plain SentencePiece encodes


def sentencepiece_rate(texts: list[str], tokenizer_path: str) -> float:
    """Tokens/s of plain SentencePiece in one process, one thread, in the job's batches of 32 texts (one call
    over a whole corpus would hold every id as a Python int at once: slower than the job's batches)."""
    plain = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    start = time.perf_counter()
    tokens = sum(len(ids) for i in range(0, len(texts), 32) for ids in plain.encode(texts[i:i + 32], num_threads=1))
    return tokens / (time.perf_counter() - start)


def efficiency(workdir: pathlib.Path, corpus: pathlib.Path, tokenizer_path: str, workers: int, src: str) -> dict:
    """The job (``src``'s code) in its own process: tokens/s per core against plain SentencePiece, CPU
    seconds of the runner and of its workers, peak RSS.

    The baseline is the mean of a pass over the corpus's first texts right before the job and one right
    after (after a discarded warm-up pass: a process's first pass ran up to 30% slower): on this shared
    VM SentencePiece's speed drifts by up to 20% within minutes, and bracketing the job cancels a drift."""
    with open(corpus) as lines:
        texts = [json.loads(line)["text"] for line, _ in zip(lines, range(BASELINE_TEXTS))]
    sentencepiece_rate(texts[:BASELINE_TEXTS // 4], tokenizer_path)
    before = sentencepiece_rate(texts, tokenizer_path)
    args = ["data", "books", "--input", str(corpus), "--output", str(workdir / "out"), "--tokenizer", tokenizer_path,
            "--seq-len", "32768", "--overwrite"]
    if workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _JOB_WITH_USAGE, *args], env={**os.environ, "PYTHONPATH": src},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    after = sentencepiece_rate(texts, tokenizer_path)
    baseline = (before + after) / 2
    peak_kib, _, _, own_cpu, workers_cpu = done.stderr.rsplit("VmHWM:", 1)[1].split()[:5]
    result = manifest.read(str(workdir / "out" / "seq32768"), verify_hashes=False)
    pipeline = result.tokens / seconds / workers
    job_seconds = float(re.search(r"done in ([\d.]+)s", done.stdout).group(1))
    job_cpu = float(own_cpu) + float(workers_cpu)
    counted = re.search(r"tokenize_cpu_ms (\d+)", done.stdout)  # absent from a --src older than the counter
    tokenize_cpu = int(counted.group(1)) / 1000 if counted else float("nan")
    return {
        "corpus_tokens": result.tokens,
        "sentencepiece_tokens_per_s_per_core": round(baseline),
        "sentencepiece_before_after": [round(before), round(after)],
        "pipeline_tokens_per_s_per_core": round(pipeline),
        "pipeline_seconds": round(seconds, 1),
        "workers": workers,
        "efficiency": round(pipeline / baseline, 3),
        "job_seconds": job_seconds,
        "efficiency_job_only": round(result.tokens / job_seconds / workers / baseline, 3),
        # SentencePiece's CPU seconds for the corpus over all the job's CPU seconds: the efficiency the job
        # would reach with its cores to itself (on a shared machine wall time also counts others' work).
        "cpu_efficiency": round(result.tokens / baseline / job_cpu, 3),
        # The same two figures against the SentencePiece speed of the job's own workers (its tokenize_cpu_ms
        # counter) instead of the separate baseline: what the job's own work costs, whatever the machine's
        # speed in that minute (plain SentencePiece varies by 20% between passes on a shared VM).
        "tokenize_cpu_s": round(tokenize_cpu, 1),
        "cpu_share_tokenizing": round(tokenize_cpu / job_cpu, 3),
        "efficiency_at_job_tokenizer_speed": round(pipeline * tokenize_cpu / result.tokens, 3),
        "runner_cpu_s": round(float(own_cpu), 1),  # the job's main process (with 1 worker: everything)
        "workers_cpu_s": round(float(workers_cpu), 1),  # its worker processes (multi_processing)
        "load_average_1min": os.getloadavg()[0],
        "peak_rss_mb": round(int(peak_kib) / 1024),  # the job's main process (the runner, and with 1 worker everything)
        "bytes_per_token_on_disk": round(sum(s.bytes for s in result.shards) / (result.tokens + result.pad_tokens), 3),
    }


def shuffle_bytes(corpus: pathlib.Path, tokenizer_path: str, seq_len: int = 32768, groups: int = 16) -> dict:
    """Bytes per input token through each shuffle of the books job, encoded with the coders Beam uses there.

    Untyped elements go through Beam's ``FastPrimitivesCoder`` (pickling objects).
    "before" is the job as it was: whole documents through the dedupe shuffle, pickled
    segments through the packing shuffle, pickled records through a second shuffle to
    their shards. "after": (id, path, index) through the dedupe shuffle, segments as
    bytes (:func:`~pipelines.kit.packing.segment_to_bytes`) through the packing shuffle, and
    no records shuffle (each pack group writes its own shards); not counted: the
    leftovers' shuffle, at most one sequence per group (16 × 64 KiB here).
    """
    pickled = coders.registry.get_coder(typing.Any)
    grouped = coders.registry.get_coder(dataset._GROUPED_SEGMENT)
    tokenizer = TextTokenizer(tokenizer_path)
    with open(corpus, "rb") as stream:
        documents = list(raw.iter_documents(stream, str(corpus)))
    moved = dict.fromkeys(["dedupe_before", "dedupe_after", "pack_before", "pack_after", "shards_before"], 0)
    tokens = 0
    per_group: dict[int, list[packing.Segment]] = {}
    for document in documents:
        moved["dedupe_before"] += len(pickled.encode((document.id, document)))
        moved["dedupe_after"] += len(pickled.encode(sources._position(document)))
        framed = tokenizer.frame(tokenizer.encode(document.text), SpecialTokens())
        tokens += len(framed)
        for piece in packing.cut(packing.text_segment(document.id, framed), seq_len):
            keyed = dataset._hash_to_group((seq_len, piece), groups)  # what the job sends through its shuffle
            moved["pack_before"] += len(pickled.encode((keyed[0], piece)))
            moved["pack_after"] += len(grouped.encode(keyed))
            per_group.setdefault(keyed[0][1], []).append(piece)
    for group, segments in per_group.items():
        for index, sequence in enumerate(packing.pack(segments, seq_len)):
            data = packed.encode(**packing.to_example(sequence, seq_len))
            record = (seq_len, group, index, data, sum(map(len, sequence)), {"text": 0})  # the former PackedRecord
            moved["shards_before"] += len(pickled.encode(((seq_len, 0, 1), record)))
    before = moved["dedupe_before"] + moved["pack_before"] + moved["shards_before"]
    after = moved["dedupe_after"] + moved["pack_after"]
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


def utilization(kind: str, hash_groups: int = 16, seed: int = 0) -> dict:
    """Packing utilization of one mix as the pipeline packs it (``packing.pack_hash_groups``: groups packed
    alone where the bucket is large, their least full sequences repacked together), beside ``hash_groups``
    groups each packed alone (the first writer) and everything packed as one group (the ceiling)."""
    count, seq_len = MIXES[kind]
    segments = _segments(kind, count, random.Random(seed))
    tokens = sum(len(s) for s in segments)
    groups: dict[int, list[packing.Segment]] = {}
    for segment in segments:
        groups.setdefault(packing.hash_group(segment, hash_groups), []).append(segment)
    sequences = {
        "pipeline": len(packing.pack_hash_groups(groups, seq_len, hash_groups)),
        "groups_alone": sum(len(packing.pack(group, seq_len)) for group in groups.values()),
        "one_group": len(packing.pack(segments, seq_len)),
        "one_example_per_sequence": len(segments),
    }
    return {"mix": kind, "examples": count, "seq_len": seq_len, "tokens": tokens, "hash_groups": hash_groups,
            **{f"utilization_{label}": round(tokens / (n * seq_len), 4) for label, n in sequences.items()}}


def memory_slope(runs: list[dict]) -> dict:
    """Peak RSS per added input token over the corpus sizes (runs of one worker count): the least-squares
    slope (with two sizes, the slope between them) and the intercept, the memory before any token."""
    tokens = np.array([r["corpus_tokens"] for r in runs], float)
    peaks = np.array([r["peak_rss_mb"] for r in runs], float) * 2**20
    slope, intercept = np.polyfit(tokens, peaks, 1)
    return {"workers": runs[0]["workers"], "tokens": tokens.astype(int).tolist(),
            "peak_rss_mb": [r["peak_rss_mb"] for r in runs], "peak_rss_bytes_per_added_token": round(slope, 1),
            "intercept_mb": round(intercept / 2**20)}


def size_fit(runs: list[dict], goal: float = 0.8) -> dict:
    """The job's wall time over the corpus sizes (runs of one worker count) as fixed seconds + k × its ideal
    time (least squares), the ideal being the corpus's tokenizing time spread over the workers: at each run's
    plain SentencePiece baseline, and at the job's own SentencePiece speed (its ``tokenize_cpu_ms``, which
    the machine's drift does not move). 1/k is the efficiency a large corpus tends to; also the corpus size
    at which the efficiency, ideal / (fixed + k × ideal), reaches ``goal``."""
    workers = runs[0]["workers"]
    seconds = np.array([r["pipeline_seconds"] for r in runs])
    tokens = np.array([r["corpus_tokens"] for r in runs], float)
    fit = {"workers": workers, "tokens": tokens.astype(int).tolist(), "seconds": seconds.tolist()}
    ideals = {"": tokens / workers / np.array([r["sentencepiece_tokens_per_s_per_core"] for r in runs]),
              "_at_job_tokenizer_speed": np.array([r["tokenize_cpu_s"] for r in runs]) / workers}
    for label, ideal in ideals.items():
        if np.isnan(ideal).any():  # a --src older than the tokenize_cpu_ms counter
            continue
        k, fixed = np.polyfit(ideal, seconds, 1)
        tokens_per_ideal_second = float(np.mean(tokens / ideal))
        fit[f"fixed_seconds{label}"] = round(fixed, 1)
        fit[f"efficiency_limit{label}"] = round(1 / k, 3)
        fit[f"tokens_for_efficiency_{goal}{label}"] = (
            round(goal * fixed / (1 - goal * k) * tokens_per_ideal_second) if 1 / k > goal else None)
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, nargs="+", default=[40],
                        help="corpus sizes in books (about 54K tokens each); two or more also give the memory slope "
                             "and the fixed and per-token parts of the job's time")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="worker counts; more than 1 runs --direct_running_mode=multi_processing")
    parser.add_argument("--src", default=str(pathlib.Path(__file__).resolve().parents[1]),
                        help="the project checkout whose job is measured (e.g. an older commit, for before/after)")
    parser.add_argument("--skip-utilization", action="store_true", help="skip the packing-utilization mixes")
    parser.add_argument("--skip-shuffle", action="store_true", help="skip the bytes-shuffled estimate")
    args = parser.parse_args()
    print(json.dumps({"cpu_count": os.cpu_count(), "src": args.src}))
    if not args.skip_utilization:
        for kind in MIXES:
            print(json.dumps(utilization(kind)))
    with tempfile.TemporaryDirectory() as workdir:
        workdir = pathlib.Path(workdir)
        runs: dict[int, list[dict]] = {w: [] for w in args.workers}
        tokenizer_path = ""
        for books in sorted(args.books):
            corpus = _corpus(workdir, books)
            tokenizer_path = tokenizer_path or _tokenizer(workdir, corpus)  # trained on the smallest corpus
            if not args.skip_shuffle and books == min(args.books):
                print(json.dumps(shuffle_bytes(corpus, tokenizer_path)))
            for workers in args.workers:
                runs[workers].append(efficiency(workdir, corpus, tokenizer_path, workers, args.src))
                print(json.dumps(runs[workers][-1]))
            corpus.unlink()
        if len(args.books) > 1:
            for workers_runs in runs.values():
                print(json.dumps(memory_slope(workers_runs)))
                print(json.dumps(size_fit(workers_runs)))


if __name__ == "__main__":
    main()
