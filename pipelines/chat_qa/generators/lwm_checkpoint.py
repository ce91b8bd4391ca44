"""The ``lwm:CKPT`` generator: a checkpoint of this project, through the sampler, as a Beam RunInference model.

:class:`SamplerHandler` is a RunInference ``ModelHandler``: each worker loads the
checkpoint once (:class:`trainer.inference.sampler.Sampler`, shared by the worker's threads)
and answers batches of requests with the versioned prompt of
:mod:`pipelines.chat_qa.generators.interface` in LWM's chat template. A reply the strict parser
rejects is sampled once more (next seed), then dead-lettered with the raw reply.
The generator's identity names the checkpoint's absolute path and step, resolved
when the job is built, so every worker loads the same step and a newer
checkpoint never reuses an older one's cached pairs.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from apache_beam.ml.inference.base import ModelHandler

from pipelines.chat_qa.generators.interface import (
    PROMPT_VERSION,
    UNPARSEABLE,
    Identity,
    QAOutcome,
    QARequest,
    parse_reply,
    prompt,
)
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import storage
from trainer import checkpoint
from trainer.inference.sampler import Sampler, SampleSettings, encode_prompt

DETAIL_CHARS = 2000


def resolve(config) -> tuple[str, int]:
    """(absolute checkpoint directory, newest step) of an ``lwm:CKPT`` spec; ValueError if there is none."""
    directory = storage.absolute(config.spec[len("lwm:"):])
    try:
        return directory, checkpoint.latest_step(directory)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--generator {config.spec}: no checkpoint there ({error})") from None


def check(config) -> None:
    resolve(config)


def identity(config) -> Identity:
    """The checkpoint's absolute path and newest step, and the sampling settings."""
    return _identity(config, *resolve(config))


def model_handler(config, tokenizer_path: str) -> "SamplerHandler":
    return SamplerHandler(config, tokenizer_path)


def _identity(config, directory: str, step: int) -> Identity:
    settings = {"temperature": config.temperature, "max_tokens": config.max_reply_tokens}
    return Identity(f"lwm:{directory}@{step}", PROMPT_VERSION, tuple(sorted(settings.items())))


class LWMSampler:
    """Pairs from step ``step`` of the checkpoint in ``directory``, one batched ``Sampler.generate`` per
    attempt (a QA generator, see :mod:`pipelines.chat_qa.generators.interface`)."""

    def __init__(self, config, tokenizer_path: str, directory: str, step: int):
        self.identity = _identity(config, directory, step)
        self.tokenizer = TextTokenizer(tokenizer_path)
        self.sampler = Sampler(directory, step=step)
        self.config = config

    def _sample(self, requests: Sequence[QARequest], seed: int) -> list[str]:
        prompts = [encode_prompt(self.tokenizer, prompt(r), chat=True) for r in requests]
        settings = SampleSettings(max_new_tokens=self.config.max_reply_tokens, temperature=self.config.temperature,
                                  seed=seed, eos_id=self.tokenizer.eos_id)
        return [self.tokenizer.decode(ids) for ids in self.sampler.generate(prompts, settings)]

    def generate(self, requests: Sequence[QARequest]) -> Iterator[QAOutcome]:
        pending = list(requests)
        for attempt in range(2):
            if not pending:
                return
            rejected = []
            for request, reply in zip(pending, self._sample(pending, seed=attempt)):
                try:
                    yield QAOutcome(request, parse_reply(reply), retries=attempt)
                except ValueError:
                    if attempt:
                        yield QAOutcome(request, None, UNPARSEABLE, reply[:DETAIL_CHARS], retries=attempt)
                    else:
                        rejected.append(request)
            pending = rejected

    def close(self) -> None:
        pass


class SamplerHandler(ModelHandler[QARequest, QAOutcome, LWMSampler]):
    """RunInference over :class:`LWMSampler`: the checkpoint step resolved at launch loads once per worker;
    batches of ``config.batch`` requests."""

    def __init__(self, config, tokenizer_path: str):
        super().__init__()
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.directory, self.step = resolve(config)

    @property
    def identity(self) -> Identity:
        return _identity(self.config, self.directory, self.step)

    def load_model(self) -> LWMSampler:
        return LWMSampler(self.config, self.tokenizer_path, self.directory, self.step)

    def run_inference(self, batch: Sequence[QARequest], model: LWMSampler, inference_args: dict[str, Any] | None = None
                      ) -> Iterable[QAOutcome]:
        return list(model.generate(batch))

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self.config.batch}
