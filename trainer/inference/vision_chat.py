"""Chat about an image or a video, as LWM's vision chat feeds its models: one call, or a session of many turns.

Use from Python::

    from trainer.inference.vision_chat import chat, open_session
    chat("runs/vision/checkpoints", "tokenizer.model", "What happens?", video="clip.mp4", vqgan="vqgan/")
    session = open_session("runs/vision/checkpoints", "tokenizer.model", vqgan="vqgan/", sp=4)
    session.ask("What is in the video?", video="hour.mp4")   # the expensive turn: ring prefill over sp
    session.ask("And at the end?")                           # feeds only this turn through the cache

A first turn with a video, in order:

1. **Count and choose frames** (``pipelines.tokens.media``, the video-text job's code):
   n = the frames the video holds at its own rate; all of them when n <= ``max_frames``,
   else the ones at ``sample_frame_indices(n, max_frames)`` (LWM's rule). An image is one frame.
2. **Check it fits** before decoding anything: the prompt (text + 257 tokens a frame) and
   the answer budget against the checkpoint's ``max_position_embeddings`` and (by estimate)
   the devices' memory at ``sp``; too long is refused naming the frame count that fits.
3. **Decode** only the chosen frames (short side 256, centre crop 256×256, as the image-text
   and video-text jobs) and **encode** them with the VQGAN (``VQGAN.preprocess`` + ``encode``).
4. **Lay out** the prompt with ``pipelines.tokens.vision_layout.conversation``: BOS,
   ``You are a helpful assistant. USER: {question}\\n``, ``<vision>``, each frame's 256 codes
   then ``<eof>`` (the last ``<eov>``), ``</vision>``, `` ASSISTANT:``; the vision mask exactly on
   codes and markers; one BOS.
5. **Prefill** it with ring attention over ``sp`` (the cache stays sharded along the sequence)
   and **sample** the answer. A later turn appends `` USER: {question} ASSISTANT:`` after the
   answer and its EOS (an answer cut at the token budget is kept as it is) and feeds only
   those tokens through the conversation's cache (``Sampler.extend``).

Every bad input is a ``ValueError`` of one line (the CLI's exit 2): a missing, unreadable, empty
or stream-less file, a checkpoint without a vision head, a video too long.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from pipelines.tokens import media
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import FRAME_TOKENS, Markers, Turn, conversation
from schemas import vocab
from trainer.inference.sampler import Context, Sampler, SampleSettings, open_checked
from trainer.model import ModelConfig

DEFAULT_MAX_FRAMES = 8  # LWM's vision chat's max_n_frames
MAX_VIDEO_SECONDS = 24 * 3600.0  # chat reads hour-long videos; the data jobs' 10-minute cap is theirs


@dataclasses.dataclass(frozen=True)
class VisionInput:
    """An image or video as the model reads it: ``codes [F, 16, 16]``, which of the source's ``total``
    frames they are (``indices``), and a name for messages."""

    codes: np.ndarray
    indices: tuple[int, ...]
    total: int
    name: str


def check_vision_head(config: ModelConfig) -> None:
    """ValueError unless the checkpoint can read vision ids: codes and the ``<eof>``/``<eov>`` markers."""
    if config.vision_vocab_size <= vocab.EOV_ID:
        raise ValueError(f"this checkpoint has no vision head (vision_vocab_size {config.vision_vocab_size}; "
                         f"vision input needs at least {vocab.EOV_ID + 1} ids: 8192 codes, <eof>, <eov>)")


def frames_that_fit(config: ModelConfig, text_tokens: int, new_tokens: int, sp: int,
                    fits: Callable[[int], bool] | None = None) -> int:
    """The most frames whose prompt (``text_tokens`` + 257 a frame) and answer fit the context and,
    when ``fits(prompt_len)`` is given (a memory check), the devices."""
    most = max(0, (config.max_position_embeddings - text_tokens - new_tokens) // FRAME_TOKENS)
    if fits is None or most == 0 or fits(text_tokens + most * FRAME_TOKENS):
        return most
    low, high = 0, most  # low fits (0 frames always "fits": nothing to refuse then), high does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(text_tokens + mid * FRAME_TOKENS) else (low, mid)
    return low


def read_vision(*, image: str | None = None, video: str | None = None, frames: np.ndarray | None = None,
                max_frames: int = DEFAULT_MAX_FRAMES, vqgan=None,
                check: Callable[[int], None] = lambda frames: None) -> VisionInput:
    """An image file, a video file or uint8 frames ``[N, H, W, 3]`` as codes, through the data jobs' own
    decoding and the VQGAN. ``check(frames)`` runs once the frame count is known, before any decoding."""
    if sum(x is not None for x in (image, video, frames)) != 1:
        raise ValueError("give one of an image, a video or frames")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if vqgan is None:
        raise ValueError("vision input needs a VQGAN (--vqgan DIR: the one the checkpoint was trained with)")
    try:
        if image is not None:
            check(1)
            pixels, indices, total = media.decode_image(_read(image))[None], (0,), 1
        elif video is not None:
            config = media.VideoConfig(native=True, max_frames=max_frames, max_duration_s=MAX_VIDEO_SECONDS)
            total = media.count_frames(check_media_path(video), config)
            indices = tuple(int(i) for i in media.sample_frame_indices(total, max_frames))
            check(len(indices))
            pixels = media.decode_video(check_media_path(video), config)
            if len(pixels) != len(indices):  # the container's count and the decoder's disagree: keep what decoded
                indices = tuple(range(len(pixels))) if len(pixels) < len(indices) else indices
                pixels = pixels[:len(indices)]
        else:
            frames = np.asarray(frames)
            total = len(frames)
            indices = tuple(int(i) for i in media.sample_frame_indices(total, max_frames))
            check(len(indices))
            pixels = media.square_frames(frames[list(indices)])
    except media.MediaError as error:
        raise ValueError(f"{image or video or 'frames'}: {' '.join(str(error).split())}") from None  # one line
    codes = vqgan.encode(vqgan.preprocess(pixels))
    if codes.shape[1] * codes.shape[2] != vocab.TOKENS_PER_FRAME:
        raise ValueError(f"the VQGAN gives {codes.shape[1]}x{codes.shape[2]} codes a frame; LWM's layout needs 16x16")
    return VisionInput(codes, indices, total, image or video or "frames")


def check_media_path(path: str) -> str:
    """``path`` if it is a readable file, else a one-line ValueError saying what is wrong with it."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a video file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable (check its permissions)")
    return path


def _read(path: str) -> bytes:
    with open(check_media_path(path), "rb") as f:
        return f.read()


@dataclasses.dataclass(frozen=True)
class TurnPrompt:
    """One turn laid out, not yet run: its question, the ids and vision mask it adds, its image or video."""

    question: str
    tokens: np.ndarray
    vision_mask: np.ndarray
    vision: VisionInput | None


class ChatSession:
    """A conversation with a loaded checkpoint: each :meth:`ask` is one turn, the first may carry an image
    or a video, every later one reuses the key/value cache of the conversation so far."""

    def __init__(self, sampler: Sampler, tokenizer: TextTokenizer, vqgan=None, *,
                 settings: SampleSettings = SampleSettings(), max_frames: int = DEFAULT_MAX_FRAMES):
        self.sampler, self.tokenizer, self.vqgan = sampler, tokenizer, vqgan
        self.settings = dataclasses.replace(settings, eos_id=tokenizer.eos_id)
        self.max_frames = max_frames
        self.markers = Markers.from_tokenizer(tokenizer, SpecialTokens())
        self.turns: list[Turn] = []
        self.vision: VisionInput | None = None
        self.prompt: tuple[np.ndarray, np.ndarray] | None = None  # the first turn's (tokens, vision_mask), once run
        self.context: Context | None = None

    def layout(self, question: str, *, image=None, video=None, frames=None) -> "TurnPrompt":
        """The tokens and vision mask the next turn adds (the whole prompt on the first turn), media read,
        checked and encoded; nothing runs until :meth:`answer`."""
        carries = any(x is not None for x in (image, video, frames))
        if carries and self.vision is not None:
            raise ValueError("a conversation carries one image or video; start a new session for another")
        vision = None
        if carries:
            check_vision_head(self.sampler.config)
            text = len(self._turn(question, np.zeros((1, 16, 16), np.int32))[0]) - FRAME_TOKENS
            vision = read_vision(image=image, video=video, frames=frames, max_frames=self.max_frames,
                                 vqgan=self.vqgan, check=lambda f: self._check_frames(text, f))
        tokens, mask = self._turn(question, vision.codes if vision is not None else None)
        return TurnPrompt(question, tokens, mask, vision)

    def answer(self, turn: "TurnPrompt", on_text: Callable[[str], None] | None = None) -> str:
        """Run a turn :meth:`layout` prepared: prefill (first turn) or extend the cache, then sample."""
        if self.context is None:
            self.context = self.sampler.prefill(turn.tokens, turn.vision_mask, reserve=self.settings.max_new_tokens)
            self.prompt = (turn.tokens, turn.vision_mask)
        else:
            self.context = self.sampler.extend(self.context, turn.tokens, turn.vision_mask)
        if turn.vision is not None:
            self.vision = turn.vision
        self.turns.append(Turn("user", turn.question, vision=turn.vision is not None))
        answer = self.sampler.sample(self.context, self.settings, on_token=_Stream(self.tokenizer, on_text))
        self.context = answer.context
        self.turns.append(Turn("assistant", tuple(answer.tokens), ended=answer.ended))
        return self.tokenizer.decode(answer.tokens)

    def ask(self, question: str, *, image=None, video=None, frames=None,
            on_text: Callable[[str], None] | None = None) -> str:
        """The answer to one more turn (streamed to ``on_text`` as it grows, if given)."""
        return self.answer(self.layout(question, image=image, video=video, frames=frames), on_text)

    def conversation(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token of the conversation so far (the last answer's EOS included), laid out afresh:
        what the cache holds."""
        codes = self.vision.codes if self.vision is not None else None
        return conversation(self.turns, codes, self.tokenizer.encode, self.markers)

    def _turn(self, question: str, codes) -> tuple[np.ndarray, np.ndarray]:
        turn = Turn("user", question, vision=codes is not None)
        if not self.turns:
            return conversation([turn], codes, self.tokenizer.encode, self.markers)
        return conversation([turn], codes, self.tokenizer.encode, self.markers, bos=False)

    def _check_frames(self, text_tokens: int, frames: int) -> None:
        """ValueError naming the frames that would fit, if ``frames`` do not (context or memory)."""
        start = self.context.total if self.context is not None else 0
        new = self.settings.max_new_tokens

        def fits(prompt_len: int) -> bool:
            try:
                self.sampler.check_fits(1, start + prompt_len, new)
                return True
            except ValueError:
                return False

        if fits(text_tokens + frames * FRAME_TOKENS):
            return
        config = self.sampler.config
        most = frames_that_fit(config, start + text_tokens, new, self.sampler.sp, lambda n: fits(n - start))
        memory_bound = most < frames_that_fit(config, start + text_tokens, new, self.sampler.sp)
        why = (f"the devices' memory at sp={self.sampler.sp}" if memory_bound else
               f"the checkpoint's max_position_embeddings {config.max_position_embeddings}")
        raise ValueError(f"{frames} frames take {text_tokens + frames * FRAME_TOKENS} prompt tokens, which with "
                         f"{new} answer tokens exceed {why}; at most {most} frames fit: use --max-frames {most}"
                         + (" or a larger --sp" if memory_bound else ""))


class _Stream:
    """``on_token`` for the sampler that passes the answer's new text to ``on_text`` as it grows."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text, self.ids, self.text = tokenizer, on_text, [], ""

    def __call__(self, token: int) -> None:
        if self.on_text is None:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        self.on_text(text[len(self.text):])
        self.text = text


def open_session(ckpt: str, tokenizer: str, *, vqgan: str | None = None, sp: int = 1, step: int | None = None,
                 settings: SampleSettings = SampleSettings(), max_frames: int = DEFAULT_MAX_FRAMES) -> ChatSession:
    """A :class:`ChatSession` on a checkpoint (or run) directory, its tokenizer and (for vision) VQGAN directory."""
    vq = None
    if vqgan is not None:
        from pipelines.tokens.vqgan import VQGAN

        vq = VQGAN.load(vqgan)
    text_tokenizer, sampler = open_checked(ckpt, tokenizer, step=step, sp=sp)
    return ChatSession(sampler, text_tokenizer, vq, settings=settings, max_frames=max_frames)


def chat(ckpt: str, tokenizer: str, question: str, *, image: str | None = None, video: str | None = None,
         frames: np.ndarray | None = None, vqgan: str | None = None, sp: int = 1,
         settings: SampleSettings = SampleSettings(), max_frames: int = DEFAULT_MAX_FRAMES) -> str:
    """One answer about an image, a video (a file, or uint8 frames ``[N, H, W, 3]``) or nothing."""
    session = open_session(ckpt, tokenizer, vqgan=vqgan, sp=sp, settings=settings, max_frames=max_frames)
    return session.ask(question, image=image, video=video, frames=frames)


def prompt_document(tokens: Sequence[int], vision_mask: Sequence[bool]) -> dict:
    """``{"tokens": [...], "vision_mask": [...]}`` (ints and booleans): a prompt as ``--dump-prompt`` writes it."""
    return {"tokens": [int(t) for t in tokens], "vision_mask": [bool(m) for m in vision_mask]}
