"""`lwm data chat-qa --generator lwm:CKPT`: a checkpoint of this project through the sampler, as RunInference."""

import json

import jax
import pytest

from pipelines.chat_qa import pipeline as chat_qa
from pipelines.kit.buckets import Bucket
from pipelines.kit.output import OutputConfig
from pipelines.chat_qa.generators import GeneratorConfig

from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import manifest
from trainer import checkpoint
from trainer.model import PRESETS, init_params

sample = pytest.importorskip("trainer.inference.sampler", reason="the sampler (trainer/inference/sampler.py) is not merged yet")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_lwm") / "ckpt"
    checkpoint.save_params(path, init_params(PRESETS["tiny"], jax.random.key(0)), PRESETS["tiny"])
    return path


@pytest.fixture(scope="module")
def book(sample_books, tmp_path_factory):
    """One sample book of a few chunks."""
    line = next(line for line in sample_books.read_text().splitlines() if 1500 < len(json.loads(line)["text"]) < 3000)
    path = tmp_path_factory.mktemp("chat_lwm_book") / "book.jsonl"
    path.write_text(line + "\n")
    return path


def _run(book, output, tokenizer_path, ckpt):
    generator = GeneratorConfig(spec=f"lwm:{ckpt}", max_reply_tokens=8, batch=8)
    config = chat_qa.ChatQAConfig(inputs=(str(book),), tokenizer=tokenizer_path, generator=generator, chunk_tokens=160,
                                  output=OutputConfig(str(output), (Bucket(1024),), num_shards=1))
    return chat_qa.run(config).counters


def _letters(output):
    return [json.loads(line) for line in (output / "seq1024" / "dead_letter" / "dead_letter.jsonl").open()]


@pytest.mark.slow
def test_replies_of_an_untrained_model_are_sampled_twice_then_dead_lettered_raw(book, tokenizer_path, ckpt, tmp_path):
    counters = _run(book, tmp_path, tokenizer_path, ckpt)
    letters = _letters(tmp_path)
    assert counters["chunks"] == counters["qa_failed"] == counters["qa_retried"] == len(letters) > 1
    assert {d["reason"] for d in letters} == {"qa_unparseable_reply"} and all(d["detail"] for d in letters)
    result = manifest.read(str(tmp_path / "seq1024"))
    assert result.config["generator_id"] == f"lwm:{ckpt}@0" and result.records == 0


def test_parsed_replies_become_cached_pairs(book, tokenizer_path, ckpt, tmp_path, monkeypatch):
    tokenizer = TextTokenizer(tokenizer_path)
    reply = list(tokenizer.encode("Question: Who was there?\nAnswer: The old sailor."))
    monkeypatch.setattr(sample.Sampler, "generate", lambda self, prompts, settings: [reply for _ in prompts])
    counters = _run(book, tmp_path, tokenizer_path, ckpt)
    assert counters["qa_generated"] == counters["chunks"] > 1 and "qa_failed" not in counters
    entries = [json.loads(p.read_text()) for p in (tmp_path / "qa_cache").rglob("*.json")]
    assert len(entries) == counters["chunks"]
    assert {(e["question"], e["answer"], e["generator"]) for e in entries} == {
        ("Who was there?", "The old sailor.", f"lwm:{ckpt}@0")}
    assert manifest.read(str(tmp_path / "seq1024")).records == 1
