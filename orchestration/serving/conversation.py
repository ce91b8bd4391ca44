"""Chat messages → the token ids and vision mask LWM reads: its chat template, further turns, one image or video.

The layout (strings from :mod:`pipelines.tokens.prompts`, BOS and EOS explicit ids)::

    BOS {system} USER: {question 1} ASSISTANT: {answer 1} EOS USER: {question 2} ASSISTANT:

* ``{system}`` is LWM's ``You are a helpful assistant.`` unless the conversation
  starts with a system message, which replaces it. The first turn is encoded as one
  string, exactly as ``lwm generate --chat`` and the ``lwm:CKPT`` generator encode it;
  later turns are `` USER: … ASSISTANT:`` after the answer and its EOS.
* A user message's vision part (``image_url`` or ``video_url`` with a ``data:`` URL, or
  a path under ``--media-dir``) goes where LWM's vision chat puts it, after that
  message's text: ``… USER: {question}\\n<vision> codes </vision> ASSISTANT:``.
  One image or video per conversation.

The layout itself is :func:`pipelines.tokens.vision_layout.conversation`, the one
``lwm chat`` uses, so the server and the command agree token for token.

Text parts of one message are joined with a newline. Anything the layout cannot
take is an :class:`~orchestration.serving.openai_api.ApiError` 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import urllib.parse

import numpy as np

from orchestration.serving.openai_api import ApiError
from pipelines.tokens import media, prompts
from pipelines.tokens.text_tokenizer import SpecialTokens
from pipelines.tokens.vision_layout import Markers, Turn, conversation

VISION_PARTS = {"image_url": "image", "video_url": "video"}


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What vision input the server takes: a VQGAN (None: none), whether the checkpoint has a vision head,
    the directory local paths may come from (None: ``data:`` URLs only), frames per video."""

    vqgan: object | None = None
    vision_head: bool = False
    media_dir: str | None = None
    max_frames: int = 8


@dataclasses.dataclass(frozen=True)
class _Message:
    role: str
    text: str
    vision: tuple[str, str] | None = None  # (image or video, url)


def _message(raw: dict, index: int) -> _Message:
    role = "system" if raw["role"] == "developer" else raw["role"]
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{index}]: role {raw['role']!r} is not one of system, user, assistant",
                       param="messages")
    content = raw.get("content")
    if isinstance(content, str):
        return _Message(role, content)
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"messages[{index}]: 'content' must be a string or a list of parts", param="messages")
    texts, vision = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in VISION_PARTS:
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"messages[{index}]: a {kind} part needs {{'url': ...}}", param="messages")
            vision.append((VISION_PARTS[kind], url))
        else:
            raise ApiError(400, f"messages[{index}]: unsupported content part {kind!r} (text, image_url, video_url)",
                           param="messages")
    if vision and role != "user":
        raise ApiError(400, f"messages[{index}]: only user messages may hold images or videos", param="messages")
    if len(vision) > 1:
        raise ApiError(400, "one image or video per conversation", param="messages")
    return _Message(role, "\n".join(texts), vision[0] if vision else None)


def parse(messages: list[dict]) -> tuple[str, list[_Message]]:
    """(system text, the user/assistant messages alternating from a user message to a user message)."""
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    system = prompts.SYSTEM_PROMPT
    if parsed and parsed[0].role == "system":
        system, parsed = parsed[0].text, parsed[1:]
    roles = [m.role for m in parsed]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ApiError(400, "messages must be an optional system message, then user and assistant messages "
                       "taking turns, starting and ending with a user message", param="messages")
    if sum(m.vision is not None for m in parsed) > 1:
        raise ApiError(400, "one image or video per conversation", param="messages")
    return system, parsed


def layout(tokenizer, messages: list[dict], policy: MediaPolicy) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids, bool vision mask) of a chat request, BOS first, ending with ``ASSISTANT:``: the one layout
    of a conversation (:func:`pipelines.tokens.vision_layout.conversation`, the same as ``lwm chat``)."""
    system, messages = parse(messages)
    turns, codes = [], None
    for message in messages:
        if message.vision is not None:
            codes = encode_media(*message.vision, policy)
        turns.append(Turn(message.role, message.text, vision=message.vision is not None))
    markers = Markers.from_tokenizer(tokenizer, SpecialTokens())
    return conversation(turns, codes, tokenizer.encode, markers, system=system)


# ----------------------------------------------------------------------------- media


def media_bytes(url: str, media_dir: str | None) -> bytes | str:
    """The bytes of a ``data:`` URL, or (with ``media_dir``) the path of a local file under it."""
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise ApiError(400, "a data: URL needs a ',' before its data", param="messages")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=True)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, f"the data: URL's base64 does not decode ({error})", param="messages") from None
    if media_dir is None:
        raise ApiError(400, "images and videos must come as data: URLs (start the server with --media-dir DIR "
                       "to allow local files under DIR)", param="messages")
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path:
        raise ApiError(400, f"only data: URLs and local paths under --media-dir are read, not {url[:60]!r}",
                       param="messages")
    root = os.path.realpath(media_dir)
    path = os.path.realpath(os.path.join(root, urllib.parse.unquote(path)))
    if os.path.commonpath([root, path]) != root:
        raise ApiError(400, "that path is outside --media-dir", param="messages")
    if not os.path.isfile(path):
        raise ApiError(400, "no such file under --media-dir", param="messages")
    return path


def encode_media(kind: str, url: str, policy: MediaPolicy) -> np.ndarray:
    """VQGAN codes ``[F, 16, 16]`` of an image (F = 1) or a video (at most ``policy.max_frames`` frames)."""
    if not policy.vision_head:
        raise ApiError(400, "this checkpoint has no vision head (vision_vocab_size 0): it takes no images or videos",
                       param="messages")
    if policy.vqgan is None:
        raise ApiError(400, "this server has no VQGAN: start it with --vqgan DIR to take images and videos",
                       param="messages")
    source = media_bytes(url, policy.media_dir)
    try:
        if kind == "image":
            data = source if isinstance(source, bytes) else open(source, "rb").read()
            frames = media.decode_image(data)[None]
        else:
            frames = media.decode_video(source, media.VideoConfig(fps=None, max_frames=policy.max_frames))
    except media.MediaError as error:
        raise ApiError(400, f"the {kind} cannot be decoded ({error.reason}: {error.detail[:200]})",
                       param="messages") from None
    except OSError as error:
        raise ApiError(400, f"the {kind} cannot be read ({error.strerror})", param="messages") from None
    vqgan = policy.vqgan
    return vqgan.encode(vqgan.preprocess(frames))
