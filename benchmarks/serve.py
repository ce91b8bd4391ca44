"""`lwm serve` figures: decode throughput by concurrency, the prefix cache's time to first token, a soak, and
the sampler's single-stream decode speed beside transformers'.

1. ``throughput``: tokens/s with 1, 4 and 16 concurrent streaming chat requests on the demo model (the
   ``tiny`` preset), against ``lwm serve --max-batch 16`` in its own process (goal: 16 ≥ 6 × 1).
2. ``ttft``: time to first token of a second chat turn after a 4K-token first turn, with the prefix
   cache ÷ without (``--prefix-cache 0``); each measured on a second conversation of the same lengths,
   so compilation is not timed (goal ≤ 0.2).
3. ``soak``: 200 requests at concurrency 32: mixed lengths, every 10th malformed, every 7th stream
   closed after its first chunk; every well-formed one must be answered (none lost), and the server's
   resident memory after the load is compared with before it.
4. ``transformers``: single-stream greedy decode tokens/s of ``Sampler.generate`` ÷ transformers'
   ``generate`` (KV cache on) on the same random Llama weights (fp32, CPU), converted with
   ``trainer/convert/hf_llama.py`` (goal ≥ 1).

    .venv/bin/python benchmarks/serve.py [throughput|ttft|soak|transformers|all]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(work: pathlib.Path, context: int) -> tuple[str, str, list[str]]:
    """A random tiny checkpoint of ``context`` positions, a 512-piece tokenizer and book texts."""
    import jax

    from pipelines.tokens import text_tokenizer
    from schemas import raw
    from trainer import checkpoint
    from trainer.evaluation.synthetic_books import write_books
    from trainer.model import PRESETS, init_params

    books = write_books(work / "books.jsonl", 40)
    with open(books, "rb") as stream:
        texts = [d.text for d in raw.iter_documents(stream, str(books))]
    tokenizer = text_tokenizer.train(texts, 512, str(work / "tok.model"))
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=context)
    ckpt = work / "run" / "checkpoints"
    checkpoint.save_params(ckpt, init_params(config, jax.random.key(0)), config)
    return str(ckpt), tokenizer, texts


class Server:
    """``lwm serve`` in its own process."""

    def __init__(self, ckpt: str, tokenizer: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestration.cli", "serve", "--ckpt", ckpt, "--tokenizer", tokenizer,
             "--port", str(self.port), "--served-name", NAME, *flags], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def stream_chat(url: str, messages: list, max_tokens: int, close_after: int | None = None) -> tuple[float, int, str]:
    """(seconds to the first content chunk, completion tokens, finish reason) of one streaming chat request."""
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first, tokens, finish = None, 0, ""
    with httpx.Client(timeout=600) as client:  # made before the clock starts: its SSL context takes ~50 ms
        start = time.perf_counter()
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for count, line in enumerate(response.iter_lines()):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter() - start
                    finish = choice.get("finish_reason") or finish
                if close_after is not None and count >= close_after:
                    return first or 0.0, 0, "closed"
        return (first if first is not None else time.perf_counter() - start), tokens, finish


def throughput(work: pathlib.Path) -> None:
    ckpt, tokenizer, texts = setup(work, 2048)
    server = Server(ckpt, tokenizer, "--max-batch", "16", "--max-context", "512")
    try:
        def ask(i: int):  # prompts of one length: one prefill program, compiled before timing
            return stream_chat(server.url, [{"role": "user", "content": f"Tell me about item {i:04d}."}], 128)

        ask(0)  # compile
        results = {}
        for streams in (1, 4, 16):
            with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                list(pool.map(ask, range(streams)))  # warm the prompt lengths
                start = time.perf_counter()
                done = list(pool.map(ask, range(streams, 3 * streams)))
                elapsed = time.perf_counter() - start
            results[streams] = sum(t for _, t, _ in done) / elapsed
            print(f"{streams:2d} streams: {results[streams]:7.1f} tokens/s "
                  f"({sum(t for _, t, _ in done)} tokens in {elapsed:.1f} s)", flush=True)
        print(f"16 streams / 1 stream = {results[16] / results[1]:.2f} (goal >= 6)")
    finally:
        server.close()


def ttft(work: pathlib.Path) -> None:
    ckpt, tokenizer_path, texts = setup(work, 8192)
    from pipelines.tokens.text_tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path)
    long = sorted(texts, key=len)[-2:]

    def first_turn(text: str) -> str:  # about 4K tokens
        ids = tokenizer.encode(text)[:4000]
        return tokenizer.decode(ids)

    figures = {}
    for cache in ("16", "0"):
        server = Server(ckpt, tokenizer_path, "--max-batch", "4", "--max-context", "4608", "--prefix-cache", cache)
        try:
            for book in long:  # the first conversation compiles; the second is measured
                messages = [{"role": "user", "content": first_turn(book) + " What happened?"}]
                _, _, _ = stream_chat(server.url, messages, 24)
                answer = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
                    "model": NAME, "messages": messages, "max_tokens": 24, "temperature": 0}).json()
                messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "And then?"}]
                seconds, _, _ = stream_chat(server.url, messages, 8)
            figures[cache] = seconds
            print(f"prefix cache {cache:>2}: second turn's time to first token {seconds * 1000:.0f} ms", flush=True)
        finally:
            server.close()
    print(f"cached / uncached = {figures['16'] / figures['0']:.3f} (goal <= 0.2)")


def soak(work: pathlib.Path) -> None:
    ckpt, tokenizer, texts = setup(work, 2048)
    server = Server(ckpt, tokenizer, "--max-batch", "16", "--max-queue", "64", "--max-context", "1024")
    try:
        def one(i: int):
            if i % 10 == 3:
                r = httpx.post(server.url + "/v1/chat/completions", content=b"{broken", timeout=60)
                return "malformed", r.status_code
            messages = [{"role": "user", "content": texts[i % len(texts)][: 50 + (i * 97) % 1500]}]
            if i % 7 == 5:
                return "cancelled", stream_chat(server.url, messages, 200, close_after=2)[2]
            return "answered", stream_chat(server.url, messages, 8 + (i * 13) % 120)[2]

        stream_chat(server.url, [{"role": "user", "content": "warm up"}], 8)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(40)))  # warm: the prompt lengths compile
            before = server.rss_mb()
            start = time.perf_counter()
            outcomes = list(pool.map(one, range(40, 240)))
            elapsed = time.perf_counter() - start
        time.sleep(2)
        after = server.rss_mb()
        answered = [o for kind, o in outcomes if kind == "answered"]
        print(f"{len(outcomes)} requests in {elapsed:.1f} s: {len(answered)} well-formed, "
              f"{sum(o in ('stop', 'length') for o in answered)} answered with a finish_reason; "
              f"{sum(kind == 'malformed' and o == 400 for kind, o in outcomes)} malformed -> 400; "
              f"{sum(kind == 'cancelled' for kind, _ in outcomes)} cancelled; busy after: "
              f"{httpx.get(server.url + '/health').json()['busy']}")
        print(f"server RSS before the load {before:.0f} MB, after {after:.0f} MB ({after - before:+.0f} MB)")
    finally:
        server.close()


def versus_transformers(work: pathlib.Path, new_tokens: int = 128) -> None:
    import numpy as np
    import torch
    import transformers

    from trainer.convert.hf_llama import import_hf
    from trainer.inference.sampler import SampleSettings, Sampler
    from trainer.model import ModelConfig

    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).eval()
    model.save_pretrained(work / "hf", safe_serialization=True)
    base = dataclasses.replace(ModelConfig(), vocab_size=32000, d_model=512, mlp_dim=1376, num_layers=8, num_heads=8,
                               num_kv_heads=8, vision_vocab_size=0, dtype="float32", param_dtype="float32",
                               max_position_embeddings=1024)
    import_hf(work / "hf", work / "lwm", base=base)
    sampler = Sampler(work / "lwm")
    prompt = list(np.random.default_rng(0).integers(3, 32000, 16))
    settings = SampleSettings(max_new_tokens=new_tokens, eos_id=None)

    def ours() -> list[int]:
        return sampler.generate([prompt], settings)[0]

    def theirs() -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    timings = {}
    for name, fn in (("lwm sampler", ours), ("transformers", theirs)):
        fn()  # warm up (compilation)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            tokens = fn()
            runs.append(time.perf_counter() - start)
        timings[name] = new_tokens / min(runs)
        print(f"{name}: {timings[name]:.1f} tokens/s (best of 3, {new_tokens} tokens)", flush=True)
    agree = ours()[:16] == theirs()[:16]
    print(f"sampler / transformers = {timings['lwm sampler'] / timings['transformers']:.2f} (goal >= 1); "
          f"first 16 greedy tokens agree: {agree}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", nargs="?", default="all", choices=["throughput", "ttft", "soak", "transformers", "all"])
    args = parser.parse_args()
    figures = {"throughput": throughput, "ttft": ttft, "soak": soak, "transformers": versus_transformers}
    for name, fn in figures.items():
        if args.figure in (name, "all"):
            print(f"== {name}", flush=True)
            with tempfile.TemporaryDirectory() as work:
                fn(pathlib.Path(work))


if __name__ == "__main__":
    main()
