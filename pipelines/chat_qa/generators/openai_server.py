"""The ``openai:MODEL@URL`` generator: any OpenAI-compatible chat-completions server (vLLM and the like).

Each worker keeps ``concurrency`` requests in flight (a thread pool over the
batch; outcomes come back as they complete). Per request:

* 200 with a reply the strict parser accepts → the pair;
* 200 with an empty or unparseable reply (or a body that is not chat-completions
  JSON) → asked once more, then dead-lettered ``qa_unparseable_reply`` with the raw reply;
* 429, 5xx, timeouts, refused connections → retried with exponential backoff
  (a longer ``Retry-After`` wins), dead-lettered ``qa_generator_unavailable`` when
  the retries run out;
* 401, 403, 404 → the job stops with a clear error (wrong key, model or URL: every
  request would fail the same way);
* any other 4xx → dead-lettered ``qa_rejected`` (e.g. a chunk too long for the model).

The API key comes from the environment variable named by ``api_key_env``, read on
the worker; it is sent only in the ``Authorization`` header and scrubbed from
every detail that could reach logs, dead letters, the cache or the manifest.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, Sequence

from pipelines.chat_qa.generators.interface import (
    PROMPT_VERSION,
    REJECTED,
    UNAVAILABLE,
    UNPARSEABLE,
    Identity,
    QAOutcome,
    QARequest,
    parse_reply,
    prompt,
)

log = logging.getLogger(__name__)
FATAL_STATUS = (401, 403, 404)
MAX_BACKOFF_S = 60.0
DETAIL_CHARS = 2000


def identity(config) -> Identity:
    """The server's model, URL and sampling settings (the server's weights are beyond our sight)."""
    settings = {"temperature": config.temperature, "max_tokens": config.max_reply_tokens}
    return Identity(config.spec, PROMPT_VERSION, tuple(sorted(settings.items())))


def check(config) -> None:
    """The server accepts connections: a wrong URL would otherwise cost every chunk its full round of retries."""
    url = urllib.parse.urlsplit(config.spec.partition("@")[2])
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=min(config.timeout_s, 10.0)).close()
    except OSError as error:
        where = f"{address[0]}:{address[1]}"
        raise ValueError(f"--generator {config.spec}: cannot connect to {where} ({error})") from None


def build(config) -> "OpenAIChat":
    return OpenAIChat.from_config(config)


class OpenAIChat:
    """Chat completions at ``URL/chat/completions``; see the module docstring."""

    def __init__(self, model: str, url: str, config, api_key: str | None):
        self.identity = identity(config)
        self._model = model
        self._endpoint = url.rstrip("/") + "/chat/completions"
        self._config = config
        self._key = api_key
        self._pool = concurrent.futures.ThreadPoolExecutor(config.concurrency, thread_name_prefix="qa-request")

    @classmethod
    def from_config(cls, config) -> "OpenAIChat":
        model, _, url = config.spec[len("openai:"):].partition("@")
        return cls(model, url, config, os.environ.get(config.api_key_env) if config.api_key_env else None)

    def generate(self, requests: Sequence[QARequest]) -> Iterator[QAOutcome]:
        futures = [self._pool.submit(self._request, r) for r in requests]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<api key>") if self._key else text

    def _post(self, body: bytes) -> tuple[int | None, bytes, str]:
        """(HTTP status or None, response body, error text); raises nothing for HTTP or network errors."""
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self._endpoint, body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._config.timeout_s) as response:
                return response.status, response.read(), ""
        except urllib.error.HTTPError as error:
            retry_after = error.headers.get("Retry-After", "") if error.headers else ""
            return error.code, error.read() or b"", retry_after
        except (OSError, http.client.HTTPException) as error:  # timeouts, refused or reset connections
            return None, b"", f"{type(error).__name__}: {error}"

    def _request(self, request: QARequest) -> QAOutcome:
        body = json.dumps({
            "model": self._model,
            "messages": [{"role": "user", "content": prompt(request)}],
            "temperature": self._config.temperature,
            "max_tokens": self._config.max_reply_tokens,
            "seed": request.number,
        }).encode()
        retries = transient = bad_replies = 0
        while True:
            status, data, extra = self._post(body)
            if status == 200:
                reply = _reply_text(data)
                try:
                    return QAOutcome(request, parse_reply(reply if reply is not None else ""), retries=retries)
                except ValueError:
                    bad_replies += 1
                    if bad_replies > 1:
                        raw = reply if reply is not None else data.decode("utf-8", "replace")
                        return QAOutcome(request, None, UNPARSEABLE, self._scrub(raw[:DETAIL_CHARS]), retries)
                    retries += 1
                    continue
            text = data.decode("utf-8", "replace")[:DETAIL_CHARS]
            if status in FATAL_STATUS:
                raise ValueError(f"{self.identity.id}: HTTP {status} ({self._scrub(text[:200])}); "
                                 "check the model name, URL and --api-key-env")
            if status is not None and status != 429 and status < 500:
                return QAOutcome(request, None, REJECTED, self._scrub(f"HTTP {status}: {text}"), retries)
            transient += 1
            error = extra if status is None else f"HTTP {status}: {text}"
            if transient > self._config.max_retries:
                detail = f"gave up after {transient} attempts; last: {error}"
                return QAOutcome(request, None, UNAVAILABLE, self._scrub(detail), retries)
            retries += 1
            delay = min(MAX_BACKOFF_S, self._config.backoff_s * 2 ** (transient - 1) * random.uniform(0.5, 1.5))
            if status == 429 and extra:
                delay = max(delay, min(MAX_BACKOFF_S, _seconds(extra)))
            log.info("%s: %s; retry %d in %.1fs", request.name, self._scrub(error[:200]), transient, delay)
            time.sleep(delay)


def _reply_text(data: bytes) -> str | None:
    """The first choice's message content of a chat-completions body, or None if the body is not one."""
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _seconds(retry_after: str) -> float:
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 0.0
