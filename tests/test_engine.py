"""The serving engine without HTTP: a turn restored from the prefix cache answers as a prefill of the whole prompt."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from trainer import checkpoint
from trainer.inference import sampler as sampling
from trainer.inference.engine import Engine, EngineConfig, Job
from trainer.model import PRESETS, init_params

# A wide init so that greedy choices are not near-ties.
CONFIG = dataclasses.replace(PRESETS["tiny"], init_std=0.2, max_position_embeddings=768)


class Collect:
    def __init__(self):
        self.tokens, self.done = [], threading.Event()

    def token(self, token: int) -> bool:
        self.tokens.append(token)
        return True

    def finish(self, reason: str, error: str | None = None) -> None:
        self.reason = reason
        self.done.set()


def answer(engine: Engine, ids: list[int], max_tokens: int) -> list[int]:
    stream = Collect()
    settings = sampling.SampleSettings(max_new_tokens=max_tokens, eos_id=None)
    engine.submit(Job(np.asarray(ids, np.int32), np.zeros(len(ids), bool), settings, stream))
    assert stream.done.wait(300) and stream.reason == "length"
    return stream.tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "checkpoints"
    checkpoint.save_params(path, init_params(CONFIG, jax.random.key(0)), CONFIG)
    return path


@pytest.mark.parametrize("sp", [1, 2])
def test_turns_from_the_prefix_cache_answer_as_the_whole_prompt_prefilled(ckpt, sp):
    sampler = sampling.Sampler(ckpt, sp=sp)
    engine = Engine(sampler, EngineConfig(max_batch=2, context=CONFIG.max_position_embeddings, prefix_entries=4))
    rng = np.random.default_rng(sp)

    def new(n):
        return rng.integers(3, CONFIG.vocab_size, n).tolist()

    def greedy(ids, max_tokens):
        return sampler.generate([ids], sampling.SampleSettings(max_new_tokens=max_tokens, eos_id=None))[0]

    try:
        first = [1, *new(40)]
        turn = first + answer(engine, first, 10) + [2] + new(9)  # the rest: one chunk, a narrow ring
        reused = engine.reused_tokens
        assert answer(engine, turn, 10) == greedy(turn, 10)
        branch = turn[:-4] + new(3)  # a shared prefix that ends inside the stored row's ring
        assert answer(engine, branch, 6) == greedy(branch, 6)
        long = turn + new(300)  # prefilled: the shared prefix is shorter than the rest
        later = long + answer(engine, long, 6) + [2] + new(sampling.MAX_CHUNK + 40)  # several chunks: the full ring
        assert answer(engine, later, 6) == greedy(later, 6)
        assert engine.reused_tokens - reused == (len(first) + 9) + (len(turn) - 4) + (len(long) + 5)
    finally:
        engine.close()
