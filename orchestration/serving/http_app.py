"""The HTTP side of ``lwm serve``: a FastAPI app over the engine, non-streaming answers and server-sent events.

Per request: the middleware answers 503 while the server drains (SIGTERM), 401 for a
missing or wrong key under ``/v1`` (when a key is set; compared in constant time,
never logged) and 413 for a body over the limit; the handler parses the body
(:mod:`~orchestration.serving.openai_api`), lays out the prompt
(:mod:`~orchestration.serving.conversation`, in a worker thread: media decoding
takes a while), checks it fits, and queues a :class:`~trainer.inference.engine.Job`
(429 with ``Retry-After`` when the queue is full). Tokens come back from the
engine's thread through a :class:`TokenStream`, which turns them into text, holds
back what could still become a stop sequence and cuts the text at one. A client
that disconnects cancels its job; the engine frees the row at its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from orchestration.serving import conversation, openai_api
from orchestration.serving.openai_api import ApiError
from trainer.inference.engine import Engine, Job, QueueFull
from trainer.inference.sampler import SampleSettings, encode_prompt

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


@dataclasses.dataclass
class Service:
    """What the app serves: the tokenizer, the engine and the server's rules."""

    tokenizer: Any
    engine: Engine
    served_name: str
    policy: conversation.MediaPolicy
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    draining: bool = False
    in_flight: int = 0  # requests the app holds that the engine does not hold yet

    def idle(self) -> bool:
        return self.in_flight == 0 and self.engine.busy() == 0
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class TokenStream:
    """The engine's :class:`~trainer.inference.engine.Stream` for one request: tokens → text pieces on an asyncio
    queue, as ``("text", piece)`` and finally ``("end", reason, error)``."""

    def __init__(self, tokenizer, stop: tuple[str, ...], loop: asyncio.AbstractEventLoop):
        self.tokenizer, self.stop, self.loop = tokenizer, stop, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already put on the queue
        self.stopped = False

    def _put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def token(self, token: int) -> bool:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s, max(self.sent - len(s) + 1, 0)) for s in self.stop) if i >= 0]
        if cuts:
            self._emit(text, min(cuts))
            self.stopped = True
            return False
        self._emit(text, held_back(text, self.stop))
        return True

    def _emit(self, text: str, end: int) -> None:
        if end > self.sent:
            self._put("text", text[self.sent:end])
            self.sent = end

    def finish(self, reason: str, error: str | None = None) -> None:
        if not self.stopped and self.ids:
            text = self.tokenizer.decode(self.ids)
            self._emit(text, len(text))
        self._put("end", reason, error)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Where the text that is safe to send ends: before an unfinished character (byte fallback) and before an
    ending that could grow into a stop sequence."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return end


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="lwm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.middleware("http")
    async def gate(request: Request, call_next):
        if service.draining:
            return _error(ApiError(503, "the server is shutting down", headers={"Retry-After": "5"}))
        if service.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
                return _error(ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                                       code="invalid_api_key"))
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > service.max_body_bytes:
            return _error(_too_large(service))
        service.in_flight += 1  # until the answer starts; its job, if any, is in the engine by then
        try:
            return await call_next(request)
        finally:
            service.in_flight -= 1

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("request failed")
        return _error(ApiError(500, f"internal error: {type(error).__name__}"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": service.engine.busy(), "prefix_cache": service.engine.prefix.stats()}

    @app.get("/v1/models")
    async def models():
        return openai_api.models_list(service.served_name, service.created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_json(request, service)
        openai_api.check_model(body, service.served_name)
        params = openai_api.sampling(body)
        messages = openai_api.chat_messages(body)
        ids, mask = await run_in_threadpool(conversation.layout, service.tokenizer, messages, service.policy)
        return await _respond(request, service, ids, mask, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, service)
        openai_api.check_model(body, service.served_name)
        params = openai_api.sampling(body)
        prompt = openai_api.completion_prompt(body)
        ids = np.asarray(encode_prompt(service.tokenizer, prompt) if isinstance(prompt, str) else prompt, np.int32)
        if ids.min() < 0 or ids.max() >= service.engine.sampler.config.vocab_size:
            raise ApiError(400, f"prompt token ids must lie in [0, {service.engine.sampler.config.vocab_size})",
                           param="prompt")
        return await _respond(request, service, ids, np.zeros(len(ids), bool), params, chat=False)

    return app


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _too_large(service: Service) -> ApiError:
    return ApiError(413, f"the request body is over {service.max_body_bytes / 2**20:g} MB (--max-body-mb)")


async def _read_json(request: Request, service: Service) -> dict:
    body = await request.body()
    if len(body) > service.max_body_bytes:
        raise _too_large(service)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the body must be a JSON object")
    return parsed


async def _respond(request: Request, service: Service, ids: np.ndarray, mask: np.ndarray,
                   params: openai_api.Sampling, *, chat: bool):
    try:
        service.engine.check_request(len(ids), params.max_tokens)
    except ValueError as error:
        raise ApiError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
    settings = SampleSettings(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                              seed=params.seed, eos_id=service.tokenizer.eos_id)
    stream = TokenStream(service.tokenizer, params.stop, asyncio.get_running_loop())
    job = Job(ids, mask, settings, stream)
    try:
        service.engine.submit(job)
    except QueueFull as error:
        raise ApiError(429, f"too many requests queued: {error}; retry later",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    request_id = openai_api.new_id("chatcmpl" if chat else "cmpl")
    if params.stream:
        events = _sse(stream, job, service, request_id, len(ids), params, chat)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    pieces, reason, error = [], None, None
    while reason is None:
        try:
            event = await asyncio.wait_for(stream.queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "the client closed the request") from None
            continue
        if event[0] == "text":
            pieces.append(event[1])
        else:
            reason, error = event[1], event[2]
    if reason in ("error", "cancelled"):
        raise ApiError(500, f"generation failed: {error or reason}")
    used = openai_api.usage(len(ids), len(stream.ids))
    make = openai_api.chat_response if chat else openai_api.completion_response
    return make(request_id, service.served_name, "".join(pieces), reason, used)


async def _sse(stream: TokenStream, job: Job, service: Service, request_id: str, prompt_tokens: int,
               params: openai_api.Sampling, chat: bool) -> AsyncIterator[str]:
    name = service.served_name

    def chunk(text: str | None, finish: str | None = None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            body = openai_api.chat_chunk(request_id, name, delta, finish)
        else:
            body = openai_api.completion_chunk(request_id, name, text or "", finish)
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None)
        while True:
            event = await stream.queue.get()
            if event[0] == "text":
                yield chunk(event[1])
                continue
            reason, error = event[1], event[2]
            if reason in ("error", "cancelled"):
                failure = ApiError(500, f"generation failed: {error or reason}").body()
                yield f"data: {json.dumps(failure)}\n\n"
            else:
                yield chunk("", reason)
                if params.include_usage:
                    used = openai_api.usage(prompt_tokens, len(stream.ids))
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield f"data: {json.dumps(openai_api.usage_chunk(request_id, name, obj, used))}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:  # also when the client disconnects: the engine frees the row
        job.cancel()
