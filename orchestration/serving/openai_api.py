"""The OpenAI API's wire format, as ``lwm serve`` speaks it: request bodies in, response bodies and chunks out.

Pure functions over dicts, no HTTP. A request body becomes a :class:`Sampling`
(the parameters every endpoint shares) plus the endpoint's own input (chat
messages, or a raw prompt); anything malformed is an :class:`ApiError` with the
status and the error JSON the API uses (``{"error": {"message", "type", "param",
"code"}}``). Defaults where the API leaves room: ``temperature`` and ``top_p`` 1.0,
``max_tokens`` 256, one choice (``n`` other than 1 is refused), no seed = a fresh one.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error response: ``status``, the API's error JSON, and extra headers (``Retry-After``)."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The parameters both endpoints take."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is a required property", param=name)
        return default
    value = body[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    return value


def sampling(body: dict) -> Sampling:
    """The shared parameters of a request body; ApiError 400 for a bad one."""
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    max_tokens = _field(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    seed = _field(body, "seed", (int,), None)
    n = _field(body, "n", (int,), 1)
    stop = _field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    options = _field(body, "stream_options", (dict,), {})
    checks = [
        (max_tokens >= 1, "max_tokens", "must be at least 1"),
        (0 <= temperature <= 2, "temperature", "must lie in [0, 2]"),
        (0 < top_p <= 1, "top_p", "must lie in (0, 1]"),
        (n == 1, "n", "must be 1 (this server returns one choice)"),
        (len(stop) <= MAX_STOP_SEQUENCES and all(isinstance(s, str) and s for s in stop), "stop",
         f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them"),
    ]
    for ok, name, why in checks:
        if not ok:
            raise ApiError(400, f"'{name}' {why}", param=name)
    return Sampling(max_tokens, temperature, top_p, secrets.randbits(31) if seed is None else seed % 2**63, stop,
                    bool(_field(body, "stream", (bool,), False)), bool(options.get("include_usage", False)))


def check_model(body: dict, served_name: str) -> None:
    """ApiError 400 without a model, 404 for another model than the one served."""
    model = _field(body, "model", (str,), required=True)
    if model != served_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served_name}'.",
                       param="model", code="model_not_found")


def completion_prompt(body: dict) -> str | list[int]:
    """The ``prompt`` of a completions body: a string or a list of token ids (one prompt)."""
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not (prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)):
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of one of those",
                           param="prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    """The ``messages`` of a chat body, each a dict with a role; their contents are read by the layout."""
    messages = _field(body, "messages", (list,), required=True)
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of objects with a 'role'", param="messages")
    return messages


# ----------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(request_id: str, obj: str, model: str, choices: list, extra: dict | None = None) -> dict:
    body = {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    return {**body, **(extra or {})}


def chat_response(request_id: str, model: str, text: str, finish: str, used: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
    return _envelope(request_id, "chat.completion", model, [choice], {"usage": used})


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return _envelope(request_id, "chat.completion.chunk", model, [choice])


def completion_response(request_id: str, model: str, text: str, finish: str, used: dict) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return _envelope(request_id, "text_completion", model, [choice], {"usage": used})


def completion_chunk(request_id: str, model: str, text: str, finish: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return _envelope(request_id, "text_completion", model, [choice])


def usage_chunk(request_id: str, model: str, obj: str, used: dict) -> dict:
    return _envelope(request_id, obj, model, [], {"usage": used})


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lwm"}]}
