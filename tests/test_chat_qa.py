"""`lwm data chat-qa`: chunking, chat examples, generators (a local chat-completions server), the pair cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orchestration import cli
from pipelines.chat_qa import pipeline as chat_qa
from pipelines.kit import inspection
from pipelines.chat_qa import generators
from pipelines.chat_qa.generators import interface
from pipelines.chat_qa.generators.extractive import Extractive
from pipelines.chat_qa.generators.needle_questions import Needle
from pipelines.kit.buckets import Bucket
from pipelines.chat_qa.contexts import ChatTemplate, Chunk, QATokens, assemble, chunk_book, split_sentences
from pipelines.chat_qa.generators import GeneratorConfig
from pipelines.chat_qa.generators.interface import QARequest, parse_reply
from pipelines.kit.output import OutputConfig
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import manifest, raw

SEQ_LEN = 1024
CHUNK_TOKENS = 160
API_KEY = "sk-test-5f1c9e0d7a2b4c68"


# --- a local OpenAI-compatible server ------------------------------------------------------------------

def passage_of(prompt: str) -> str:
    return prompt.split("Passage:\n", 1)[1]


def flaky(passage: str) -> int:
    """Which misbehaviour the flaky server shows for a passage (stable across runs)."""
    return int(hashlib.sha256(passage.encode()).hexdigest(), 16) % 8


def good_reply(passage: str) -> str:
    return f"Question: How does the passage begin?\nAnswer: {' '.join(passage.split()[:5])}"


class Listener(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 would drop connects of a 32-request window (SYN retried after 1 s)


class ChatServer:
    """Chat completions on 127.0.0.1; ``behave(passage, attempt)`` → (status, body, delay s), None: a good reply."""

    def __init__(self, behave=lambda passage, attempt: None, latency: float = 0.0):
        self.behave, self.latency = behave, latency
        self.requests: list[str] = []  # passages, in arrival order
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._send(401, b'{"error": "bad key"}')
                passage = passage_of(body["messages"][0]["content"])
                with server.lock:
                    attempt = server.requests.count(passage)
                    server.requests.append(passage)
                planned = server.behave(passage, attempt)
                status, data, delay = planned or (200, None, 0.0)
                time.sleep(server.latency + delay)
                if data is None:
                    message = {"role": "assistant", "content": good_reply(passage)}
                    data = json.dumps({"choices": [{"message": message}]}).encode()
                self._send(status, data)

            def _send(self, status, data):
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

        self.httpd = Listener(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(*args, **kwargs):
        servers.append(ChatServer(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai(url: str, **overrides) -> GeneratorConfig:
    fields = dict(spec=f"openai:tiny-chat@{url}", api_key_env="LWM_TEST_KEY", timeout_s=2.0, backoff_s=0.01,
                  max_retries=2)
    return GeneratorConfig(**{**fields, **overrides})


# --- inputs and job runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def books(sample_books, tmp_path_factory):
    """Eight sample books of a few hundred to a few thousand tokens."""
    lines = [line for line in sample_books.read_text().splitlines() if 2000 < len(json.loads(line)["text"]) < 12000][:8]
    path = tmp_path_factory.mktemp("chat_books") / "books.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_books(path) -> list[raw.Document]:
    with open(path, "rb") as stream:
        return list(raw.iter_documents(stream, str(path)))


def all_chunks(path, tokenizer) -> dict[str, list[Chunk]]:
    return {d.id: chunk_book(d.id, d.text, tokenizer.encode_batch, CHUNK_TOKENS) for d in read_books(path)}


def run_job(inputs, output, tokenizer_path, generator=GeneratorConfig(), **fields):
    config = chat_qa.ChatQAConfig(
        inputs=(str(inputs),), tokenizer=tokenizer_path, generator=generator, chunk_tokens=CHUNK_TOKENS,
        output=OutputConfig(str(output), (Bucket(SEQ_LEN),), num_shards=2, overwrite=True), **fields,
    )
    return chat_qa.run(config).counters


@pytest.fixture(scope="module")
def extractive_job(books, tokenizer_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("chat_extractive")
    return output, run_job(books, output, tokenizer_path)


# --- chunks and the chat record ------------------------------------------------------------------------

def test_sentences_split_at_sentence_ends_only():
    text = 'He said "Go." Then she left!\n\nWas it 3.5 m? Yes.  Mr. Smith'
    assert split_sentences(text) == ['He said "Go."', "Then she left!", "Was it 3.5 m?", "Yes.", "Mr.", "Smith"]


def test_chunks_are_whole_sentences_in_order_within_budget(books, tokenizer):
    for document in read_books(books):
        chunks = chunk_book(document.id, document.text, tokenizer.encode_batch, CHUNK_TOKENS)
        assert [s for c in chunks for s in c.sentences] == split_sentences(document.text)
        for chunk in chunks:
            assert chunk.text == " ".join(chunk.sentences)
            assert np.array_equal(chunk.tokens, tokenizer.encode(chunk.text))
            assert len(chunk) <= CHUNK_TOKENS
        assert all(len(a) + len(tokenizer.encode(b.sentences[0])) > CHUNK_TOKENS for a, b in zip(chunks, chunks[1:]))


def test_a_sentence_longer_than_a_chunk_is_cut_at_spaces(tokenizer):
    text = " ".join(["word"] * 300) + ". Short one."
    chunks = chunk_book("b", text, tokenizer.encode_batch, 64)
    assert all(len(c) <= 64 for c in chunks) and len(chunks) > 4
    assert " ".join(c.text for c in chunks).split() == text.split()


FAKE_TEMPLATE = ChatTemplate(bos=1, eos=2, system_user=np.array([3, 4, 5]), user=np.array([5]), assistant=np.array([6]))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    pairs=st.lists(st.tuples(st.integers(0, 11), st.integers(1, 5), st.integers(1, 5)), max_size=15),
    seq_len=st.integers(20, 120),
)
def test_contexts_are_adjacent_chunks_with_their_pairs_within_seq_len(lengths, pairs, seq_len):
    chunks = [np.full(n, 100 + i, np.int32) for i, n in enumerate(lengths)]
    qa = [QATokens(c % len(lengths), np.full(q, 7, np.int32), np.full(a, 8, np.int32)) for c, q, a in pairs]
    examples, too_long, without_qa = assemble("b", chunks, qa, FAKE_TEMPLATE, seq_len)
    placed = [i for e in examples for i in e.chunks]
    assert sorted(placed + too_long + [i for c in without_qa for i in c]) == list(range(len(lengths)))
    for example in examples:
        assert list(example.chunks) == list(range(example.chunks[0], example.chunks[-1] + 1))
        assert len(example) <= seq_len and example.key == ("b", example.chunks[0])
        tokens, mask = example.tokens, example.loss_mask
        assert np.array_equal(tokens[mask], np.concatenate([t.completion for t in example.turns]))
        assert set(tokens[mask].tolist()) <= {8, 2} and (tokens[~mask] != 8).all()
        context = tokens[4 : 4 + sum(lengths[i] for i in example.chunks)]
        assert np.array_equal(context, np.concatenate([chunks[i] for i in example.chunks]))
        assert len(example.turns) == sum(1 for p in qa if p.chunk in example.chunks)
        segment = example.segment(0.5)
        assert segment.loss_weights[0] == 0 and set(segment.loss_weights[mask]) == {0.5}
    for index in too_long:
        alone = [p for p in qa if p.chunk == index]
        assert 3 + lengths[index] + sum(len(p.question) + len(p.answer) + 3 for p in alone) > seq_len


# --- generators -----------------------------------------------------------------------------------------

def test_reply_parser_is_strict():
    assert parse_reply("Question: Who left?\nAnswer: She did.\n") == interface.QAPair("Who left?", "She did.")
    spread = parse_reply("  Question: Who?\n  Answer: the old\n sailor ")
    assert spread == interface.QAPair("Who?", "the old sailor")
    assert parse_reply("Question: Who? Answer: Nobody.") == interface.QAPair("Who?", "Nobody.")  # newline lost
    for bad in ("", "  ", "Who left? She did.", "Question: Who left?", "Answer: x\nQuestion: y",
                "Question: a\nAnswer:  ", "Question: \nAnswer: x", "Question: a\nAnswer: b\nQuestion: c\nAnswer: d",
                "Sure! Question: a\nAnswer: b", "Question: a Answer: b Answer: c"):
        with pytest.raises(ValueError):
            parse_reply(bad)


def test_extractive_asks_for_next_sentences_then_completions_deterministically():
    chunk = Chunk("b", 0, "A one. B two. C three.", np.zeros(3, np.int32), ("A one.", "B two.", "C three."))
    requests = [QARequest(chunk, n, 7) for n in range(7)]
    outcomes = list(Extractive().generate(requests))
    assert outcomes == list(Extractive().generate(requests))
    asked = [(o.pair.question, o.pair.answer) for o in outcomes[:5]]
    assert set(asked[:2]) == {("What comes after: 'A one.'?", "B two."), ("What comes after: 'B two.'?", "C three.")}
    completions = {("Complete: 'A ...'", "one."), ("Complete: 'B ...'", "two."), ("Complete: 'C ...'", "three.")}
    assert set(asked[2:5]) == completions
    assert outcomes[5].pair is None and outcomes[5].reason == interface.NO_QUESTION
    lone = Chunk("b", 1, "Just one sentence here.", np.zeros(1, np.int32), ("Just one sentence here.",))
    (only,) = Extractive().generate([QARequest(lone, 0, 1)])
    assert only.pair == interface.QAPair("Complete: 'Just one ...'", "sentence here.")


def test_needle_generator_asks_the_eval_question_about_each_needle_in_order():
    text = ("A walk began. The special magic Mexico City number is: 1234567. Rain fell. "
            "The special magic Oslo number is: 7654321. It ended.")
    chunk = Chunk("b", 0, text, np.zeros(3, np.int32), tuple(split_sentences(text)))
    outcomes = list(Needle().generate([QARequest(chunk, n, 3) for n in range(3)]))
    assert [(o.pair.question, o.pair.answer) for o in outcomes[:2]] == [
        ("What is the special magic Mexico City number?", "The special magic Mexico City number is: 1234567."),
        ("What is the special magic Oslo number?", "The special magic Oslo number is: 7654321.")]
    assert outcomes[2].pair is None and outcomes[2].reason == interface.NO_QUESTION
    assert generators.identity(GeneratorConfig(spec="needle")).id == "needle"


def test_generator_specs_are_checked():
    for bad in ("gpt", "openai:model", "openai:@http://x", "openai:m@ftp://x", "extractive:x", "lwm:"):
        with pytest.raises(ValueError):
            GeneratorConfig(spec=bad)
    with pytest.raises(ValueError, match="LWM_MISSING_KEY"):
        generators.build(GeneratorConfig(spec="openai:m@http://127.0.0.1:9/v1", api_key_env="LWM_MISSING_KEY"))


def test_openai_client_keeps_its_concurrency_window_full(server, monkeypatch):
    monkeypatch.setenv("LWM_TEST_KEY", API_KEY)
    chat = server(latency=0.2)
    generator = generators.build(openai(chat.url, concurrency=8))
    chunks = [Chunk("b", i, f"Sentence number {i} is here.", np.zeros(1, np.int32), ()) for i in range(16)]
    start = time.perf_counter()
    outcomes = list(generator.generate([QARequest(c, 0, 1) for c in chunks]))
    elapsed = time.perf_counter() - start
    generator.close()
    assert sorted(o.request.chunk.index for o in outcomes) == list(range(16))
    assert all(o.pair.answer == " ".join(o.request.chunk.text.split()[:5]) for o in outcomes)
    assert elapsed < 16 * 0.2 / 2  # far below serial time: requests overlap (2 rounds of 8 ≈ 0.4 s)


def test_fatal_status_stops_with_a_clear_error(server, monkeypatch):
    monkeypatch.setenv("LWM_TEST_KEY", "wrong-key")
    generator = generators.build(openai(server().url))
    chunk = Chunk("b", 0, "One. Two.", np.zeros(1, np.int32), ())
    with pytest.raises(ValueError, match="HTTP 401"):
        list(generator.generate([QARequest(chunk, 0, 1)]))
    generator.close()


# --- the job on decoded records -------------------------------------------------------------------------

def _find_context(tokens, chunks_by_book, start):
    """(book id, chunk indices) whose tokens follow each other in ``tokens`` from ``start``."""
    for book_id, chunks in chunks_by_book.items():
        for first, chunk in enumerate(chunks):
            if np.array_equal(tokens[start : start + len(chunk)], chunk.tokens):
                found, at = [first], start + len(chunk)
                for later in chunks[first + 1 :]:
                    if not np.array_equal(tokens[at : at + len(later)], later.tokens):
                        break
                    found.append(later.index)
                    at += len(later)
                return book_id, found, at
    raise AssertionError("segment does not start with a chunk of any book")


def test_records_hold_adjacent_chunks_and_questions_about_them(extractive_job, books, tokenizer):
    output, _ = extractive_job
    chunks_by_book = all_chunks(books, tokenizer)
    template = ChatTemplate.from_encoder(tokenizer.encode_batch, tokenizer.bos_id, tokenizer.eos_id)
    opening = 1 + len(template.system_user)
    seen = set()
    for record in inspection.records(str(output / f"seq{SEQ_LEN}")):
        assert len(record["tokens"]) == SEQ_LEN
        for segment in range(1, record["segment_ids"].max() + 1):
            where = record["segment_ids"] == segment
            tokens, weights = record["tokens"][where], record["loss_weights"][where]
            assert tokens[0] == tokenizer.bos_id
            book_id, indices, end = _find_context(tokens, chunks_by_book, opening)
            seen.update((book_id, i) for i in indices)
            sentences = [s for i in indices for s in chunks_by_book[book_id][i].sentences]
            # Loss exactly on the answers and their EOS; each answer is in the context, where the question says.
            runs = np.split(np.flatnonzero(weights > 0), np.flatnonzero(np.diff(np.flatnonzero(weights > 0)) > 1) + 1)
            assert len(runs) >= 1 and runs[-1][-1] == len(tokens) - 1
            for number, run in enumerate(runs):
                assert tokens[run[-1]] == tokenizer.eos_id and tokenizer.eos_id not in tokens[run[:-1]]
                answer = tokenizer.decode(tokens[run[:-1]])
                prompt_tokens = tokens[(end if number == 0 else runs[number - 1][-1] + 1) : run[0]]
                question = tokenizer.decode(prompt_tokens).removeprefix("USER:").removesuffix("ASSISTANT:").strip()
                if question.startswith("Complete: '"):
                    assert question.removeprefix("Complete: '").removesuffix(" ...'") + " " + answer in sentences
                else:
                    quoted = question.removeprefix("What comes after: '").removesuffix("'?")
                    assert (quoted, answer) in zip(sentences, sentences[1:])
    expected = {(b, c.index) for b, chunks in chunks_by_book.items() for c in chunks}
    assert seen == expected  # every chunk of every book is in some context


def test_manifest_records_generator_and_counts(extractive_job, books, tokenizer):
    output, metrics = extractive_job
    result = manifest.read(str(output / f"seq{SEQ_LEN}"))
    assert result.job == "chat-qa"
    assert result.config["generator_id"] == "extractive" and result.config["prompt_version"] == "extractive-2"
    chunks = sum(len(c) for c in all_chunks(books, tokenizer).values())
    assert metrics["qa_generated"] == chunks and "qa_failed" not in metrics and "qa_reused" not in metrics
    assert result.counts["documents"] == 8
    assert {k: result.counts[k] for k in ("qa_generated", "qa_reused", "qa_retried", "qa_failed")} == {
        "qa_generated": chunks, "qa_reused": 0, "qa_retried": 0, "qa_failed": 0}


# --- openai generator in the job: failures, retries, secrecy --------------------------------------------

def misbehave(passage: str, attempt: int):
    kind = flaky(passage)
    if kind == 0:
        return 500, b'{"error": "overloaded"}', 0.0  # always: dead letter once retries run out
    if kind == 1:
        return 200, b'{"choices": [{"message": ', 0.0  # malformed JSON, always: dead letter with the raw body
    if kind == 2 and attempt == 0:
        return 429, b'{"error": "slow down"}', 0.0
    if kind == 3 and attempt == 0:
        return 200, None, 3.0  # slower than the client's 2 s timeout
    if kind == 4 and attempt == 0:
        return 200, json.dumps({"choices": [{"message": {"content": "I cannot."}}]}).encode(), 0.0
    return None


def test_flaky_server_retries_then_dead_letters_and_never_leaks_the_key(
    server, books, tokenizer, tokenizer_path, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("LWM_TEST_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)
    chat = server(misbehave)
    metrics = run_job(books, tmp_path, tokenizer_path, openai(chat.url, timeout_s=2.0))
    texts = [c.text for chunks in all_chunks(books, tokenizer).values() for c in chunks]
    kinds = [flaky(t) for t in texts]
    assert {0, 1, 2, 3, 4} <= set(kinds)
    letters = [json.loads(line) for line in (tmp_path / f"seq{SEQ_LEN}" / "dead_letter" / "dead_letter.jsonl").open()]
    by_reason = {r: sum(1 for d in letters if d["reason"] == r) for r in {d["reason"] for d in letters}}
    assert by_reason == {"qa_generator_unavailable": kinds.count(0), "qa_unparseable_reply": kinds.count(1)}
    assert all(d["detail"] == '{"choices": [{"message": ' for d in letters if d["reason"] == "qa_unparseable_reply")
    assert metrics["qa_generated"] == len(texts) - kinds.count(0) - kinds.count(1)
    assert metrics["qa_retried"] == 2 * kinds.count(0) + sum(kinds.count(k) for k in (1, 2, 3, 4))
    assert chat.requests.count(texts[kinds.index(0)]) == 3  # 1 + max_retries
    assert manifest.read(str(tmp_path / f"seq{SEQ_LEN}")).records > 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("qa_cache" in str(p) for p in files)
    assert not [p for p in files if API_KEY.encode() in p.read_bytes()]
    assert API_KEY not in caplog.text


# --- the cache ------------------------------------------------------------------------------------------

def _shards(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.array_record-*"))}


def test_rerun_reuses_every_pair_and_a_changed_book_regenerates_only_its_chunks(
    server, books, tokenizer, tokenizer_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("LWM_TEST_KEY", API_KEY)
    chat = server()
    cache = str(tmp_path / "cache")
    run_job(books, tmp_path / "first", tokenizer_path, openai(chat.url), cache=cache)
    chunks = all_chunks(books, tokenizer)
    assert len(chat.requests) == sum(len(c) for c in chunks.values())

    chat.requests.clear()
    metrics = run_job(books, tmp_path / "second", tokenizer_path, openai(chat.url), cache=cache)
    assert chat.requests == [] and metrics.get("qa_generated", 0) == 0
    assert _shards(tmp_path / "second" / f"seq{SEQ_LEN}") == _shards(tmp_path / "first" / f"seq{SEQ_LEN}")
    counts = manifest.read(str(tmp_path / "second" / f"seq{SEQ_LEN}")).counts
    assert counts["qa_generated"] == 0 and counts["qa_reused"] == sum(len(c) for c in chunks.values()) > 0

    lines = books.read_text().splitlines()
    changed = json.loads(lines[3])
    changed["text"] = changed["text"].replace(". ", ". Nobody expected the storm. ", 1)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines[:3] + [json.dumps(changed)] + lines[4:]) + "\n")
    new_chunks = all_chunks(edited, tokenizer)[changed["id"]]
    old_texts = {c.text for c in chunks[changed["id"]]}
    run_job(edited, tmp_path / "third", tokenizer_path, openai(chat.url), cache=cache)
    assert sorted(chat.requests) == sorted(c.text for c in new_chunks if c.text not in old_texts)
    assert 0 < len(chat.requests) < len(new_chunks) + 1


KILLED_JOB = """
import sys
from orchestration import cli
inputs, output, tokenizer, url = sys.argv[1:]
sys.exit(cli.main(["data", "chat-qa", "--input", inputs, "--output", output, "--tokenizer", tokenizer,
                   "--seq-len", "%d", "--chunk-tokens", "%d", "--generator", f"openai:tiny-chat@{url}",
                   "--api-key-env", "LWM_TEST_KEY", "--concurrency", "2"]))
""" % (SEQ_LEN, CHUNK_TOKENS)


def test_a_killed_run_loses_no_pair_and_the_rerun_asks_only_for_the_rest(
    server, books, tokenizer, tokenizer_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("LWM_TEST_KEY", API_KEY)
    chat = server(latency=0.05)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(books), str(tmp_path), tokenizer_path, chat.url],
                             env=env, start_new_session=True)
    deadline = time.time() + 120
    while len(chat.requests) < 12 and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / f"seq{SEQ_LEN}" / "manifest.json").exists()
    cached = list((tmp_path / "qa_cache").rglob("*.json"))
    total = sum(len(c) for c in all_chunks(books, tokenizer).values())
    assert 5 <= len(cached) < total
    answered = {json.loads(p.read_text())["chunk_sha256"] for p in cached}

    chat.requests.clear()
    run_job(books, tmp_path, tokenizer_path, openai(chat.url))
    assert len(chat.requests) == total - len(cached)
    assert not answered & {hashlib.sha256(p.encode()).hexdigest() for p in chat.requests}
    assert manifest.read(str(tmp_path / f"seq{SEQ_LEN}")).records > 0


# --- the command line -----------------------------------------------------------------------------------

def _cli(books, output, tokenizer_path, *extra):
    return cli.main(["data", "chat-qa", "--input", str(books), "--output", str(output), "--tokenizer", tokenizer_path,
                     "--seq-len", str(SEQ_LEN), "--chunk-tokens", str(CHUNK_TOKENS), "--num-shards", "2", "-q", *extra])


def test_overwrite_keeps_the_cache_and_regenerate_ignores_it(
    server, books, tokenizer_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("LWM_TEST_KEY", API_KEY)
    chat = server()
    served = ("--generator", f"openai:tiny-chat@{chat.url}", "--api-key-env", "LWM_TEST_KEY")
    assert _cli(books, tmp_path, tokenizer_path, *served) == 0
    asked = len(chat.requests)
    assert asked and len(list((tmp_path / "qa_cache").rglob("*.json"))) == asked
    assert _cli(books, tmp_path, tokenizer_path, *served) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(books, tmp_path, tokenizer_path, *served, "--overwrite") == 0
    assert len(chat.requests) == asked  # every pair came from the kept cache
    assert manifest.read(str(tmp_path / f"seq{SEQ_LEN}")).config["generator_id"] == f"openai:tiny-chat@{chat.url}"
    assert _cli(books, tmp_path, tokenizer_path, *served, "--overwrite", "--regenerate") == 0
    assert len(chat.requests) == 2 * asked  # --regenerate ignores the cache


def test_bad_settings_are_one_line_errors_before_any_output(books, tokenizer_path, tmp_path, capsys):
    code = _cli(books, tmp_path, tokenizer_path, "--generator", "openai:m@http://127.0.0.1:9/v1",
                "--api-key-env", "LWM_UNSET_KEY")
    assert code == 2 and "LWM_UNSET_KEY" in capsys.readouterr().err
    assert _cli(books, tmp_path, tokenizer_path, "--generator", "openai:m@http://127.0.0.1:9/v1") == 2
    assert "cannot connect to 127.0.0.1:9" in capsys.readouterr().err
    assert _cli(books, tmp_path, tokenizer_path, "--chunk-tokens", str(SEQ_LEN)) == 2
    assert "leaves no room for QA turns" in capsys.readouterr().err
    assert _cli(books, tmp_path, tokenizer_path, "--generator", "gpt4") == 2
    assert "unknown generator 'gpt4'; expected extractive, needle, openai:MODEL@URL or lwm:CKPT" in (
        capsys.readouterr().err)
    assert _cli(books, tmp_path, tokenizer_path, "--generator", f"lwm:{tmp_path.parent / 'no_such_ckpt'}") == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
