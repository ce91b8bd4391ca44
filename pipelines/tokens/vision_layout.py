"""LWM's layout of a vision span and of the text around it: the part of it that prompts and data share.

A span of F frames is each frame's 256 VQGAN codes followed by eof (vision id
8192), except the last, followed by eov (8193), wrapped in the text ``<vision>`` /
``</vision>`` (ordinary text tokens of the text tokenizer). ``vision_mask`` is 1
exactly on the codes, eof and eov. BOS and EOS are explicit ids, never added by
the tokenizer.

Around the span, an example is a list of parts (text or :data:`VISION`, each
marked as a target or not) in one of two directions:

* generation (text → vision):    ``BOS caption <vision> f1 … fF </vision> EOS``
* understanding (vision → text): ``BOS <vision> f1 … fF </vision> caption EOS``

or, with ``template="chat"``, LWM's chat format (:mod:`pipelines.tokens.prompts`):

* generation:    ``BOS You are a helpful assistant. USER: Generate an image of {caption} ASSISTANT: <vision> … </vision> EOS``
* understanding: ``BOS You are a helpful assistant. USER: Describe the image.\\n <vision> … </vision> ASSISTANT: {caption} EOS``

("a video of" / "the video" for videos). :func:`lay_out` turns parts and codes
into ids, mask and target flags; the vision data jobs add loss weights
(:mod:`pipelines.vision.examples`) and the sampler feeds the same ids. The chat
understanding example is, up to its caption, exactly the prompt of LWM's vision chat
(:func:`conversation` with one user turn): the text pieces
``You are a helpful assistant. USER: {question}\\n``, ``<vision>``, ``</vision>`` and
`` ASSISTANT:`` each tokenized on their own, one BOS.

:func:`conversation` lays out a whole chat (system prompt, user and assistant turns, one
image or video after a user turn's text) as the model is fed it: the vision chat
(``trainer.inference.vision_chat``) and any server build their prompts with it. Pure numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pipelines.tokens import prompts
from schemas import vocab

GENERATION = "generation"
UNDERSTANDING = "understanding"
TEMPLATES = ("plain", "chat")
MODALITIES = ("image", "video")
FRAME_TOKENS = vocab.TOKENS_PER_FRAME + 1  # 256 codes + eof/eov
VISION = None  # marks the vision span in a list of parts


@dataclasses.dataclass(frozen=True)
class Markers:
    """Text ids the layout adds: BOS/EOS (None = left out) and the tokenized ``<vision>`` tags."""

    bos: int | None
    eos: int | None
    vision_open: tuple[int, ...]
    vision_close: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, special) -> "Markers":
        """From a :class:`~pipelines.tokens.text_tokenizer.TextTokenizer` and a ``SpecialTokens`` policy."""
        return cls(
            tokenizer.bos_id if special.bos else None,
            tokenizer.eos_id if special.eos else None,
            tuple(int(i) for i in tokenizer.encode(vocab.VISION_OPEN)),
            tuple(int(i) for i in tokenizer.encode(vocab.VISION_CLOSE)),
        )


Part = tuple[np.ndarray | None, bool]  # (text ids, or VISION for the vision span; is a target)


def template_parts(kind: str, caption: str, modality: str, template: str) -> tuple[tuple[str | None, bool], ...]:
    """The example's text around the vision span, as (text or VISION, is a target) parts in order."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if (kind, template) == (GENERATION, "plain"):
        return ((caption, False), (VISION, True))
    if (kind, template) == (UNDERSTANDING, "plain"):
        return ((VISION, False), (caption, True))
    if (kind, template) == (GENERATION, "chat"):
        return ((prompts.chat_prompt(prompts.generation_request(modality, caption)), False), (VISION, True))
    if (kind, template) == (UNDERSTANDING, "chat"):
        return (
            (prompts.user_turn(prompts.description_request(modality), first=True, vision=True), False),
            (VISION, False),
            (prompts.ASSISTANT_CUE, False),
            (caption, True),
        )
    raise ValueError(f"unknown direction {kind!r} or template {template!r}")


def vision_tokens(codes_Fx16x16: np.ndarray) -> np.ndarray:
    """Frames' codes in order, each frame closed by eof, the last by eov: int32[F * 257]."""
    codes = np.asarray(codes_Fx16x16)
    if codes.ndim != 3 or codes.shape[0] == 0 or codes.shape[1] * codes.shape[2] != vocab.TOKENS_PER_FRAME:
        raise ValueError(f"expected codes [F >= 1, 16, 16], got shape {codes.shape}")
    if codes.min() < 0 or codes.max() >= vocab.VISION_CODEBOOK_SIZE:
        raise ValueError(f"codes must be in [0, {vocab.VISION_CODEBOOK_SIZE}), got [{codes.min()}, {codes.max()}]")
    frames = codes.reshape(codes.shape[0], vocab.TOKENS_PER_FRAME).astype(np.int32)
    closers = np.full((codes.shape[0], 1), vocab.EOF_ID, np.int32)
    closers[-1] = vocab.EOV_ID
    return np.concatenate([frames, closers], axis=1).reshape(-1)


def text_length(parts: Sequence[Part], markers: Markers) -> int:
    """Tokens of an example that are not frame tokens: BOS/EOS, text parts, ``<vision>`` tags."""
    count = (markers.bos is not None) + (markers.eos is not None)
    for ids, _ in parts:
        count += len(markers.vision_open) + len(markers.vision_close) if ids is VISION else len(ids)
    return count


def frames_that_fit(parts: Sequence[Part], markers: Markers, num_frames: int, limit: int) -> int:
    """The most frames (at most ``num_frames``) whose example is at most ``limit`` tokens; 0 if none."""
    room = limit - text_length(parts, markers)
    return max(0, min(num_frames, room // FRAME_TOKENS))


def lay_out(parts: Sequence[Part], codes_Fx16x16: np.ndarray, markers: Markers
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``parts`` (text ids, or :data:`VISION` for the frames) as one sequence framed by the markers' BOS/EOS:
    (tokens int32[T], vision_mask bool[T], is_target bool[T]); EOS is a target, BOS is not."""
    pieces: list[tuple[np.ndarray, bool, bool]] = []  # (ids, is vision, is target)
    if markers.bos is not None:
        pieces.append((np.array([markers.bos], np.int32), False, False))
    for ids, target in parts:
        if ids is VISION:
            pieces.append((np.asarray(markers.vision_open, np.int32), False, target))
            pieces.append((vision_tokens(codes_Fx16x16), True, target))
            pieces.append((np.asarray(markers.vision_close, np.int32), False, target))
        else:
            pieces.append((np.asarray(ids, np.int32), False, target))
    if markers.eos is not None:
        pieces.append((np.array([markers.eos], np.int32), False, True))
    tokens = np.concatenate([ids for ids, _, _ in pieces])
    vision_mask = np.concatenate([np.full(len(ids), vision) for ids, vision, _ in pieces]).astype(bool)
    target = np.concatenate([np.full(len(ids), target) for ids, _, target in pieces]).astype(bool)
    return tokens, vision_mask, target


# ----------------------------------------------------------------------------- conversations


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of a chat. ``role`` is "user" or "assistant".

    A user turn's ``text`` is its question; ``vision`` says the conversation's image or video
    follows that text. An assistant turn's ``text`` is its answer, as text or as the token ids
    the model generated (fed back as they are, never re-tokenized); ``ended`` says it closed
    with EOS (False: cut at the token budget, kept as it is).
    """

    role: str
    text: str | Sequence[int]
    vision: bool = False
    ended: bool = True

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise ValueError(f"a turn's role is 'user' or 'assistant', got {self.role!r}")
        if self.vision and self.role != "user":
            raise ValueError("only a user turn carries the image or video")


EOS = object()  # marks where turn_pieces puts the EOS id (an id, never text)


def turn_pieces(turn: Turn, *, first: bool, system: str = prompts.SYSTEM_PROMPT
                ) -> list[tuple[str | Sequence[int] | None, bool]]:
    """A turn as pieces in order: (text, False), (VISION, True) for the frames, (ids, False) for a generated
    answer; a user turn ends with the answer cue (``ASSISTANT:``), an ended answer with EOS (the piece
    ``(EOS, False)``, :data:`EOS`). ``first``: the conversation's first turn (it opens with the system prompt)."""
    if turn.role == "assistant":
        pieces = [(turn.text, False)]
        return pieces + [(EOS, False)] if turn.ended else pieces
    if not turn.vision:
        return [(prompts.user_turn(turn.text, first=first, system=system), False)]
    return [(prompts.user_turn(turn.text, first=first, vision=True, system=system), False), (VISION, True),
            (prompts.ASSISTANT_CUE, False)]


def conversation(turns: Sequence[Turn], codes_Fx16x16: np.ndarray | None, encode, markers: Markers,
                 *, bos: bool = True, system: str = prompts.SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """The prompt of a chat as the model is fed it: ``(tokens int32[T], vision_mask bool[T])``.

    ``BOS You are a helpful assistant. USER: {q1}\\n <vision> frames </vision> ASSISTANT: {a1} EOS
    USER: {q2} ASSISTANT: …`` with every text piece tokenized on its own by ``encode`` (no BOS/EOS),
    one BOS (``bos=False`` leaves it out: a later part of a conversation already under way), EOS
    (``markers.eos``) after each ended answer, and the vision mask exactly on the frames' codes
    and ``<eof>``/``<eov>``; ``system`` replaces the system prompt. At most one turn carries vision (``codes_Fx16x16``, LWM's one image or
    video per chat); a conversation ending with a user turn ends with ``ASSISTANT:``, ready for its answer.
    """
    if sum(t.vision for t in turns) > (0 if codes_Fx16x16 is None else 1):
        raise ValueError("a conversation carries one image or video, after one user turn's text, and needs its codes")
    pieces: list[tuple[np.ndarray, bool]] = []
    if bos:
        pieces.append((np.array([markers.bos], np.int32), False))
    for index, turn in enumerate(turns):
        for piece, is_vision in turn_pieces(turn, first=index == 0 and bos, system=system):
            if is_vision:
                pieces += [(np.asarray(markers.vision_open, np.int32), False),
                           (vision_tokens(codes_Fx16x16), True),
                           (np.asarray(markers.vision_close, np.int32), False)]
            elif piece is EOS:
                pieces.append((np.array([markers.eos], np.int32), False))
            elif isinstance(piece, str):
                pieces.append((np.asarray(encode(piece), np.int32).reshape(-1), False))
            else:
                pieces.append((np.asarray(piece, np.int32).reshape(-1), False))
    tokens = np.concatenate([ids for ids, _ in pieces]) if pieces else np.zeros(0, np.int32)
    mask = np.concatenate([np.full(len(ids), v) for ids, v in pieces]) if pieces else np.zeros(0, bool)
    return tokens.astype(np.int32), mask.astype(bool)
