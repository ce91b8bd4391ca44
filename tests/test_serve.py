"""`lwm serve` through the official `openai` client: the sampler's tokens, streaming, batching, errors, vision, drain."""

import base64
import dataclasses
import io
import json
import os
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

import uvicorn  # noqa: E402

from orchestration.serving import conversation  # noqa: E402
from orchestration.serving.http_app import create_app  # noqa: E402
from orchestration.serving.openai_api import ApiError  # noqa: E402
from orchestration.serving.server import ServeConfig, build_service, default_name  # noqa: E402
from pipelines.tokens import prompts  # noqa: E402
from pipelines.tokens.text_tokenizer import TextTokenizer  # noqa: E402
from schemas import vocab  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.inference import sampler as sampling  # noqa: E402
from trainer.model import PRESETS, init_params  # noqa: E402

# A wide init so that greedy choices are not near-ties; a short context keeps the cache small.
CONFIG = dataclasses.replace(PRESETS["tiny"], init_std=0.2, max_position_embeddings=512)
NAME = "tiny-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "run" / "checkpoints"
    checkpoint.save_params(path, init_params(CONFIG, jax.random.key(0)), CONFIG)
    return path


@pytest.fixture(scope="module")
def server(ckpt, tokenizer_path, vqgan_dir, tmp_path_factory):
    """The app of `lwm serve` on a free port, in this process (uvicorn in a thread)."""
    media = tmp_path_factory.mktemp("media")
    config = ServeConfig(str(ckpt), tokenizer_path, vqgan=str(vqgan_dir), port=free_port(), max_batch=4,
                         max_queue=8, prefix_cache=4, served_name=NAME, media_dir=str(media), max_body_mb=1)
    service = build_service(config)
    runner = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not runner.started and time.time() < deadline:
        time.sleep(0.05)
    service.url = f"http://127.0.0.1:{config.port}/v1"
    service.media = media
    yield service
    runner.should_exit = True
    thread.join(10)
    service.engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sampler(server):
    return server.engine.sampler


def greedy(sampler, ids, max_tokens):
    settings = sampling.SampleSettings(max_new_tokens=max_tokens, temperature=0.0, eos_id=2)
    return sampler.generate([ids], settings)[0]


def chat(client, question, max_tokens=12, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, **kwargs)


# ----------------------------------------------------------------------------- answers


def test_models_health_and_the_default_name(server, client, ckpt):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["status"] == "ok"
    assert default_name(str(ckpt)) == "run" and default_name("/x/a@b:c") == "a-b-c"


def test_greedy_chat_equals_the_sampler_token_for_token(client, server, sampler):
    tokenizer = server.tokenizer
    for question in ("Who wrote the book?", "Tell me about the sea and the old sailor."):
        want = greedy(sampler, sampling.encode_prompt(tokenizer, question, chat=True), 12)
        got = chat(client, question)
        assert got.choices[0].message.content == tokenizer.decode(want)
        assert got.usage.completion_tokens == len(want)
        assert got.usage.prompt_tokens == len(sampling.encode_prompt(tokenizer, question, chat=True))
        assert got.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")


def test_greedy_completion_equals_the_sampler_and_streams_the_same_text(client, server, sampler):
    prompt = "Once upon a time"
    want = server.tokenizer.decode(greedy(sampler, sampling.encode_prompt(server.tokenizer, prompt), 10))
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert got.choices[0].text == want and got.usage.total_tokens == got.usage.prompt_tokens + 10
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client):
    whole = chat(client, "Where did they sail?", max_tokens=16)
    chunks = list(chat(client, "Where did they sail?", max_tokens=16, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequences_cut_the_text(client):
    text = chat(client, "Say something.", max_tokens=20).choices[0].message.content
    stop = text.strip()[3:6]
    assert stop
    cut = chat(client, "Say something.", max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "Say something.", max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]


def test_concurrent_requests_each_get_the_tokens_they_get_alone(client):
    questions = [f"Question number {i} about the {w}?" for i, w in enumerate(["sea", "ship", "storm", "bay", "sun"] * 2)]
    alone = {q: chat(client, q, max_tokens=8 + i % 5).choices[0].message.content for i, q in enumerate(questions[:3])}
    results = {}

    def ask(i, q):
        results[q] = chat(client, q, max_tokens=8 + i % 5).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(set(questions))
    assert all(results[q] == a for q, a in alone.items())


def test_a_seed_makes_sampling_repeatable_and_equal_to_the_sampler(client, server, sampler):
    ids = sampling.encode_prompt(server.tokenizer, "Hello", chat=True)
    settings = sampling.SampleSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, eos_id=2)
    want = server.tokenizer.decode(sampler.generate([ids], settings)[0])
    got = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=10,
                                          top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert got == [want, want]


def test_the_next_turn_reuses_the_cached_prefix_and_answers_the_same(client, server, sampler):
    tokenizer = server.tokenizer
    first = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "What is the name of the ship in the story?"}]
    answer = client.chat.completions.create(model=NAME, messages=first, max_tokens=12, temperature=0)
    turns = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": "And its captain?"}]
    ids, _ = conversation.layout(tokenizer, turns, server.policy)
    opening = tokenizer.encode("You answer briefly. USER: What is the name of the ship in the story? ASSISTANT:")
    assert ids[:len(opening) + 1].tolist() == [tokenizer.bos_id, *opening]
    assert 2 in ids.tolist()  # EOS closes the earlier answer
    reused = server.engine.reused_tokens
    second = client.chat.completions.create(model=NAME, messages=turns, max_tokens=12, temperature=0)
    assert server.engine.reused_tokens > reused + len(opening)
    assert second.choices[0].message.content == tokenizer.decode(greedy(sampler, ids.tolist(), 12))


# ----------------------------------------------------------------------------- vision


def png(size=32, color=(200, 30, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url, text="What is in the image?"):
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def test_an_image_part_is_laid_out_as_lwm_chat_does_and_answered(client, server, sampler, tmp_path):
    tokenizer = server.tokenizer
    ids, mask = conversation.layout(tokenizer, image_message(png()), server.policy)
    text = tokenizer.encode(f"{prompts.OPENING} What is in the image?\n")
    opening, closing = tokenizer.encode(vocab.VISION_OPEN), tokenizer.encode(vocab.VISION_CLOSE)
    head = [tokenizer.bos_id, *text, *opening]
    assert ids[:len(head)].tolist() == head and not mask[:len(head)].any()
    span = ids[len(head):len(head) + 257]
    assert mask[len(head):len(head) + 257].all() and span[-1] == vocab.EOV_ID and span[:-1].max() < 8192
    assert ids[len(head) + 257:].tolist() == [*closing, *tokenizer.encode(prompts.ASSISTANT)]
    assert not mask[len(head) + 257:].any()
    got = client.chat.completions.create(model=NAME, messages=image_message(png()), max_tokens=6, temperature=0)
    assert got.usage.prompt_tokens == len(ids)
    tokens, flags, want = ids.tolist(), mask.tolist(), []  # greedy decoding by the sampler's teacher forcing
    for _ in range(6):
        logits = sampler.teacher_forced_logits(np.array([tokens]), len(ids), np.array([flags]))
        if (token := int(np.argmax(logits[0, -1]))) == tokenizer.eos_id:
            break
        want.append(token)
        tokens.append(token)
        flags.append(False)
    content = got.choices[0].message.content
    assert content == tokenizer.decode(want)
    # the same image as a file under --media-dir
    (server.media / "red.png").write_bytes(base64.b64decode(png().split(",")[1]))
    assert client.chat.completions.create(model=NAME, messages=image_message("red.png"), max_tokens=6,
                                          temperature=0).choices[0].message.content == content


@pytest.mark.parametrize("case, needle", [
    ("two images", "one image or video per conversation"),
    ("undecodable", "cannot be decoded"),
    ("escape", "outside --media-dir"),
    ("remote", "only data: URLs"),
    ("no vision head", "no vision head"),
])
def test_bad_vision_input_is_a_400(client, server, monkeypatch, case, needle):
    messages = image_message(png())
    if case == "two images":
        messages[0]["content"].append({"type": "image_url", "image_url": {"url": png()}})
    elif case == "undecodable":
        messages = image_message("data:image/png;base64," + base64.b64encode(b"not an image").decode())
    elif case == "escape":
        messages = image_message("../../etc/passwd")
    elif case == "remote":
        messages = image_message("https://example.com/cat.png")
    else:
        monkeypatch.setattr(server, "policy", dataclasses.replace(server.policy, vision_head=False))
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=4)


def test_without_media_dir_only_data_urls_are_read():
    with pytest.raises(ApiError, match="data: URLs"):
        conversation.media_bytes("/tmp/x.png", None)
    assert conversation.media_bytes("data:,hello%20there", None) == b"hello there"


# ----------------------------------------------------------------------------- errors


def post(server, path, body: bytes, headers=None):
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=60)


def test_every_bad_input_is_an_api_error_and_the_server_goes_on(client, server):
    assert post(server, "/chat/completions", b"{not json").status_code == 400
    assert post(server, "/chat/completions", b"[1, 2]").status_code == 400
    response = post(server, "/chat/completions", json.dumps({"model": NAME}).encode())
    assert response.status_code == 400 and "'messages' is a required property" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'temperature'"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="taking turns"):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}])
    long = " ".join(["word"] * 600)
    with pytest.raises(openai.BadRequestError, match=r"context is 512 tokens, but the request needs \d+ \(\d+ in the prompt"):
        client.completions.create(model=NAME, prompt=long, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"\(\d+ in the prompt \+ 600 max_tokens\)"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=600)
    big = json.dumps({"model": NAME, "prompt": "x" * (2 * 2**20)}).encode()
    assert post(server, "/completions", big).status_code == 413
    assert chat(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_the_api_key_is_required_under_v1_and_not_for_health(client, server, monkeypatch):
    monkeypatch.setattr(server, "api_key", "sesame")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(server.url + "/models").status_code == 401
    keyed = openai.OpenAI(base_url=server.url, api_key="sesame", max_retries=0)
    assert [m.id for m in keyed.models.list().data] == [NAME]
    assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(client, server, monkeypatch):
    from trainer.inference.engine import Job

    class Endless:  # keeps its row until cancelled (slowly: the rows stay taken while the client connects)
        def token(self, token):
            time.sleep(0.02)
            return True

        def finish(self, reason, error=None):
            pass

    monkeypatch.setattr(server.engine, "config", dataclasses.replace(server.engine.config, max_queue=0))
    settings = sampling.SampleSettings(max_new_tokens=400, eos_id=None)
    jobs = [server.engine.submit(Job(np.array([1, 5, 6, 7], np.int32), np.zeros(4, bool), settings, Endless()))
            for _ in range(server.engine.config.max_batch)]
    try:
        with pytest.raises(openai.RateLimitError) as raised:
            chat(client, "one more")
        assert raised.value.response.headers["retry-after"] == "1"
    finally:
        for job in jobs:
            job.cancel()
    deadline = time.time() + 30
    while server.engine.busy() and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.busy() == 0  # cancelled jobs freed their rows
    assert chat(client, "now there is room", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 30
    while server.engine.busy() and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.busy() == 0


# ----------------------------------------------------------------------------- the chat-QA loop


@pytest.fixture(scope="module")
def book(sample_books, tmp_path_factory):
    """One sample book of a few chunks."""
    line = next(line for line in sample_books.read_text().splitlines() if 1500 < len(json.loads(line)["text"]) < 3000)
    path = tmp_path_factory.mktemp("serve_book") / "book.jsonl"
    path.write_text(line + "\n")
    return path


def test_chat_qa_through_the_server_writes_the_pairs_of_the_checkpoint(server, ckpt, book, tokenizer_path, tmp_path,
                                                                         monkeypatch):
    from pipelines.chat_qa import pipeline as chat_qa
    from pipelines.chat_qa.generators import GeneratorConfig, interface, lwm_checkpoint, openai_server
    from pipelines.kit.buckets import Bucket
    from pipelines.kit.output import OutputConfig

    def whole_reply(reply):  # an untrained model's replies, taken whole: every chunk gets a pair to compare
        return interface.QAPair(" ".join(reply.split()) or "-", reply.strip()[::-1] or "-")

    monkeypatch.setattr(openai_server, "parse_reply", whole_reply)
    monkeypatch.setattr(lwm_checkpoint, "parse_reply", whole_reply)
    pairs = {}
    for spec in (f"lwm:{ckpt}", f"openai:{NAME}@{server.url}"):
        output = tmp_path / spec[:3]
        generator = GeneratorConfig(spec=spec, max_reply_tokens=8, temperature=0.0, batch=8, concurrency=4)
        config = chat_qa.ChatQAConfig(inputs=(str(book),), tokenizer=tokenizer_path, generator=generator,
                                      chunk_tokens=160, output=OutputConfig(str(output), (Bucket(1024),), num_shards=1))
        counters = chat_qa.run(config).counters
        assert counters["qa_generated"] == counters["chunks"] > 1
        entries = [json.loads(p.read_text()) for p in (output / "qa_cache").rglob("*.json")]
        pairs[spec[:3]] = sorted(tuple(sorted((k, str(v)) for k, v in e.items() if k != "generator")) for e in entries)
    assert pairs["lwm"] == pairs["ope"] and len(pairs["lwm"]) > 1


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_refuses_new_requests_finishes_those_in_flight_and_exits_0(ckpt, tokenizer_path, tmp_path):
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(os.getcwd()), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--ckpt", str(ckpt), "--tokenizer",
                                tokenizer_path, "--port", str(port), "--max-batch", "2", "--served-name", NAME],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        question = next(q for q in (f"Tell a long story number {i}." for i in range(8))
                        if chat(client, q, max_tokens=300).choices[0].finish_reason == "length")
        stream = chat(client, question, max_tokens=300, stream=True)
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        deadline = time.time() + 30  # until the signal is handled, a request may still be served
        while (refused := httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 1},
                                     timeout=10)).status_code == 200:
            assert time.time() < deadline, "SIGTERM was not handled"
            time.sleep(0.05)
        chunks += list(stream)
        assert refused.status_code == 503 and refused.json()["error"]["message"] == "the server is shutting down"
        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
