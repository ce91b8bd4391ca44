"""Chat-QA job figures: extractive chunks/s per core, and the job's overhead over a model server's time.

1. ``extractive``: chunks/s of the whole job (local FnApiRunner, one worker = one
   core) on synthetic books, beside the pure per-chunk work alone (chunk + extractive
   pair + context assembly, no Beam).
2. ``openai:`` against a local chat-completions server (its own process) that answers
   every request after a fixed latency. With a 32-request window kept full the
   generator's time is ``requests × latency / 32``; the job's overhead is its wall
   time minus that, beside the same job with ``extractive`` (its non-generator work).

    .venv/bin/python benchmarks/chat_qa.py [--books 60] [--latency 0.25]
"""

from __future__ import annotations

import argparse
import http.server
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from trainer.evaluation import synthetic_books as sample_data
from pipelines.chat_qa import pipeline as chat_qa
from pipelines.chat_qa import generators
from pipelines.chat_qa.generators import interface
from pipelines.chat_qa.generators.extractive import Extractive
from pipelines.chat_qa.generators.needle_questions import Needle
from pipelines.tokens import text_tokenizer
from pipelines.kit.buckets import Bucket
from pipelines.chat_qa.contexts import ChatTemplate, QATokens, assemble, chunk_book
from pipelines.chat_qa.generators import GeneratorConfig
from pipelines.chat_qa.generators.interface import QARequest
from pipelines.kit.output import OutputConfig

SEQ_LEN = 4096
CHUNK_TOKENS = 1000


def serve(latency: float) -> None:
    """A chat-completions server answering every request after ``latency`` seconds (run as a child process)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            reply = {"choices": [{"message": {"content": "Question: What happens?\nAnswer: Something does."}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def _job(books, workdir: pathlib.Path, name: str, tokenizer: str, generator: GeneratorConfig) -> tuple[float, dict]:
    output = OutputConfig(str(workdir / name), (Bucket(SEQ_LEN),))
    config = chat_qa.ChatQAConfig(inputs=(str(books),), tokenizer=tokenizer, generator=generator, output=output,
                                  chunk_tokens=CHUNK_TOKENS)
    start = time.perf_counter()
    result = chat_qa.run(config)
    return time.perf_counter() - start, result.counters


def extractive(workdir: pathlib.Path, books: int) -> tuple[dict, pathlib.Path, str]:
    corpus = sample_data.write_books(workdir / "books.jsonl", books, min_sentences=300, max_sentences=3000, seed=2)
    texts = [json.loads(line) for line in corpus.read_text().splitlines()]
    tokenizer_path = text_tokenizer.train([t["text"] for t in texts], 2000, str(workdir / "tok.model"))
    tokenizer = text_tokenizer.TextTokenizer(tokenizer_path)
    template = ChatTemplate.from_encoder(tokenizer.encode_batch, tokenizer.bos_id, tokenizer.eos_id)
    generator = Extractive()
    start = time.perf_counter()
    chunks_total = 0
    for book in texts:
        chunks = chunk_book(book["id"], book["text"], tokenizer.encode_batch, CHUNK_TOKENS)
        outcomes = [o for o in generator.generate([QARequest(c, 0, 1) for c in chunks]) if o.pair]
        ids = tokenizer.encode_batch([t for o in outcomes for t in (o.pair.question, o.pair.answer)])
        pairs = [QATokens(o.request.chunk.index, ids[2 * i], ids[2 * i + 1]) for i, o in enumerate(outcomes)]
        assemble(book["id"], [c.tokens for c in chunks], pairs, template, SEQ_LEN)
        chunks_total += len(chunks)
    pure = chunks_total / (time.perf_counter() - start)
    seconds, counters = _job(corpus, workdir, "extractive", tokenizer_path, GeneratorConfig())
    return {
        "books": books,
        "chunks": counters["chunks"],
        "pure_chunks_per_s": round(pure),
        "job_seconds": round(seconds, 1),
        "job_chunks_per_s_per_core": round(counters["chunks"] / seconds),
    }, corpus, tokenizer_path


def generator_alone(corpus, tokenizer_path: str, config: GeneratorConfig) -> tuple[float, int]:
    """Seconds the generator takes for every chunk of ``corpus`` in the job's batches, without Beam."""
    tokenizer = text_tokenizer.TextTokenizer(tokenizer_path)
    requests = [QARequest(c, 0, 1) for line in corpus.read_text().splitlines()
                for c in chunk_book("b", json.loads(line)["text"], tokenizer.encode_batch, CHUNK_TOKENS)]
    generator = generators.build(config)
    start = time.perf_counter()
    for at in range(0, len(requests), config.batch):
        list(generator.generate(requests[at : at + config.batch]))
    seconds = time.perf_counter() - start
    generator.close()
    return seconds, len(requests)


def overhead(workdir: pathlib.Path, corpus, tokenizer_path: str, latency: float) -> dict:
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        config = GeneratorConfig(spec=f"openai:bench@http://127.0.0.1:{int(child.stdout.readline())}/v1")
        alone, requests = generator_alone(corpus, tokenizer_path, config)
        seconds, counters = _job(corpus, workdir, "served", tokenizer_path, config)
        base, _ = _job(corpus, workdir, "baseline", tokenizer_path, GeneratorConfig())
    finally:
        child.kill()
        child.wait()
    assert counters["qa_generated"] == requests
    ideal = requests * latency / config.concurrency
    return {
        "latency_s": latency,
        "requests": requests,
        "ideal_seconds (requests x latency / 32)": round(ideal, 2),
        "generator_alone_seconds": round(alone, 2),
        "job_seconds": round(seconds, 2),
        "job_overhead_over_generator_seconds": round(seconds - alone, 2),
        "same_job_with_extractive_seconds": round(base, 2),
        "job_seconds / ideal": round(seconds / ideal, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=int, default=60, help="synthetic books (300-3000 sentences) for both figures")
    parser.add_argument("--latency", type=float, default=0.25, help="the fixed-latency server's reply time (s)")
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = pathlib.Path(scratch)
        figures, corpus, tokenizer = extractive(workdir, args.books)
        print(json.dumps({"extractive": figures}, indent=2), flush=True)
        print(json.dumps({"fixed_latency_server": overhead(workdir, corpus, tokenizer, args.latency)}, indent=2))


if __name__ == "__main__":
    main()
