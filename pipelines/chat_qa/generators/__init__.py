"""Chat-QA generators, by the scheme of their ``--generator`` spec: the one list of them.

A spec is ``SCHEME`` or ``SCHEME:REST``:

* ``extractive``: offline and deterministic, no model. "What comes after:
  '<sentence>'?" → the next sentence of the chunk (:mod:`.extractive`);
* ``needle``: offline retrieval pairs about the needle sentences in a chunk, in
  the needle evaluation's words (:mod:`.needle_questions`);
* ``openai:MODEL@URL``: any OpenAI-compatible chat-completions server
  (:mod:`.openai_server`), with the versioned prompt of :mod:`.interface` and its
  strict parser;
* ``lwm:CKPT``: a checkpoint of this project through the sampler, as a Beam
  RunInference model handler (:mod:`.lwm_checkpoint`), same prompt and parser.

A generator is one module here plus one line in :data:`GENERATORS`. The module
defines ``identity(config)`` (what determines its pairs, see
:class:`~pipelines.chat_qa.generators.interface.Identity`) and either
``build(config)`` (an object with ``generate(requests)`` and ``close()``) or
``model_handler(config, tokenizer_path)`` (a RunInference handler); optionally
``check(config)``, run before the job touches any output. The registry names
modules as strings and imports only the one a spec uses, as :data:`pipelines.JOBS`
does: the openai and lwm generators bring in an HTTP client or JAX and Beam's
RunInference, which the others never need.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from types import ModuleType
from typing import Any, NamedTuple

from pipelines.chat_qa.generators.interface import Identity, QAGenerator
from schemas import flags


class Generator(NamedTuple):
    module: str
    usage: str  # the spec's form, as errors name it
    pattern: str  # what a whole spec of this scheme matches


GENERATORS = {
    "extractive": Generator("pipelines.chat_qa.generators.extractive", "extractive", r"extractive"),
    "needle": Generator("pipelines.chat_qa.generators.needle_questions", "needle", r"needle"),
    "openai": Generator("pipelines.chat_qa.generators.openai_server", "openai:MODEL@http(s)://HOST[:PORT]/PATH",
                        r"openai:[^@]+@https?://.+"),
    "lwm": Generator("pipelines.chat_qa.generators.lwm_checkpoint", "lwm:CHECKPOINT_DIR", r"lwm:.+"),
}
SHORT_FORMS = {"openai": "openai:MODEL@URL", "lwm": "lwm:CKPT"}  # how the list of generators names them


def _entry(spec: str) -> Generator:
    """The registry entry of ``spec``'s scheme; ValueError naming every generator if there is none, or the
    scheme's form if ``spec`` does not have it."""
    entry = GENERATORS.get(spec.partition(":")[0])
    if entry is None:
        forms = [SHORT_FORMS.get(name, name) for name in GENERATORS]
        raise ValueError(f"unknown generator {spec!r}; expected {', '.join(forms[:-1])} or {forms[-1]}")
    if not re.fullmatch(entry.pattern, spec, re.S):
        raise ValueError(f"generator {spec!r}: expected {entry.usage}")
    return entry


def module(spec: str) -> ModuleType:
    """The module of the generator ``spec`` names, imported now."""
    return importlib.import_module(_entry(spec).module)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Which generator and how it is called; everything but the API key itself, which stays in the environment."""

    spec: str = flags.field("extractive", flag="generator", metavar="SPEC")
    """extractive (offline, deterministic: "What comes after: '<sentence>'?"), needle (offline: the
    needle-in-a-haystack question about each needle sentence in a chunk), openai:MODEL@URL (any
    OpenAI-compatible chat-completions server; URL = its base, e.g. http://host:8000/v1) or lwm:CKPT
    (a checkpoint directory of this project, its newest step, through the sampler)."""
    api_key_env: str | None = flags.field(None, record=False, metavar="NAME")
    """Environment variable holding the openai: server's API key (read on each worker; never logged or stored)."""
    temperature: float = 0.0
    """Sampling temperature of a model generator."""
    max_reply_tokens: int = 256
    """Most tokens a model may reply with."""
    concurrency: int = flags.field(32, record=False)
    """Requests kept in flight per worker."""
    timeout_s: float = flags.field(120.0, flag="request-timeout", record=False)
    """Limit of one request, in seconds."""
    max_retries: int = flags.field(5, record=False)
    """Retries of a request after 429, 5xx or a timeout, with exponential backoff."""
    backoff_s: float = flags.field(1.0, flag="backoff", record=False)
    """First backoff in seconds, doubled after each retry (a 429's longer Retry-After wins)."""
    batch: int = flags.field(256, flag="generator-batch", record=False)
    """Chunks per generator call (keep it a multiple of --concurrency)."""

    def __post_init__(self):
        _entry(self.spec)
        for name in ("concurrency", "max_reply_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator {name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("generator timeout must be positive, retries and backoff not negative")


def check(config: GeneratorConfig) -> None:
    """Fail before the job starts if the generator cannot work: its API key variable unset, or what its
    module's ``check`` finds (an unreachable server, no checkpoint)."""
    if config.api_key_env and not os.environ.get(config.api_key_env):
        raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is not set or empty")
    generator = module(config.spec)
    if hasattr(generator, "check"):
        generator.check(config)


def identity(config: GeneratorConfig) -> Identity:
    """The identity of the generator ``config`` names, without building it (``lwm:``: its newest step)."""
    return module(config.spec).identity(config)


def build(config: GeneratorConfig) -> QAGenerator:
    """The generator ``config.spec`` names, checked (:func:`check`) and ready to call (an ``openai:`` key is
    read from the environment now)."""
    check(config)
    generator = module(config.spec)
    if not hasattr(generator, "build"):
        raise ValueError(f"generator {config.spec}: runs as a RunInference model handler (model_handler)")
    return generator.build(config)


def model_handler(config: GeneratorConfig, tokenizer_path: str) -> Any | None:
    """The RunInference model handler of a generator that runs as one (``lwm:``), else None."""
    generator = module(config.spec)
    return generator.model_handler(config, tokenizer_path) if hasattr(generator, "model_handler") else None
