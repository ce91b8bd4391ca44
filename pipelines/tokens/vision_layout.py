"""LWM's layout of one vision-language example as one packed segment (LWM_FACTS "Vision tokens",
"Sequence construction").

An example (caption + the VQGAN codes of its F frames) goes one of two ways, chosen
per example id by a stable hash so every run makes the same choice:

* generation (text → vision):    ``BOS caption <vision> f1 … fF </vision> EOS``
* understanding (vision → text): ``BOS <vision> f1 … fF </vision> caption EOS``

where each frame ``f`` is its 256 codes followed by eof (vision id 8192), except the
last, followed by eov (8193). ``<vision>`` / ``</vision>`` are ordinary text, tokenized
by the text tokenizer; BOS/EOS are added here, explicitly. ``vision_mask`` is 1 exactly
on codes, eof and eov.

With ``template="chat"`` the text is LWM's chat format instead:

* generation:    ``BOS You are a helpful assistant. USER: Generate an image of {caption} ASSISTANT: <vision> … </vision> EOS``
* understanding: ``BOS You are a helpful assistant. USER: Describe the image.\\n <vision> … </vision> ASSISTANT: {caption} EOS``

("a video of" / "the video" for videos). Each example is split into conditioning parts
(the caption in generation, the vision span in understanding, the chat prompt) and
target parts (the rest, EOS included). Loss weights: ``vision_weight`` on vision ids,
``text_weight`` on text ids, 0 on the conditioning parts if ``condition_loss`` is off,
and 0 on the first token (it has no context). The released loss (mean vision loss and
mean text loss averaged) is the trainer's business: it has ``vision_mask`` to split them.

Everything here is pure (numpy in, :class:`~pipelines.packing.Segment` out); the
text tokenizer comes in as ids, so Beam, tests and notebooks share it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np

from pipelines import flags
from pipelines.naming import stable_hash
from pipelines.packing import Segment
from schemas import vocab

GENERATION = "generation"
UNDERSTANDING = "understanding"
TEMPLATES = ("plain", "chat")
MODALITIES = ("image", "video")
FRAME_TOKENS = vocab.TOKENS_PER_FRAME + 1  # 256 codes + eof/eov
VISION = None  # marks the vision span in a list of parts
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How examples are laid out; recorded in every manifest.

    ``generation_fraction`` of the examples (by a stable hash of ``salt`` and the id)
    are generation, the rest understanding. ``condition_loss=False`` puts no loss on the
    conditioning side (e.g. only the caption is learnt in understanding examples).
    """

    generation_fraction: float = 0.5
    """Share of examples laid out caption → vision (generation); the rest vision → caption, chosen by id."""
    text_weight: float = 1.0
    """Loss weight of text tokens baked into the records."""
    vision_weight: float = 1.0
    """Loss weight of vision tokens baked into the records."""
    condition_loss: bool = True
    """Loss on the conditioning side too (the caption in generation, the vision in understanding)."""
    template: Literal["plain", "chat"] = "plain"
    """plain: caption and <vision>…</vision> only; chat: LWM's USER/ASSISTANT format."""
    salt: str = flags.field("", flag="layout-salt")
    """Changes which examples get which direction."""

    def __post_init__(self):
        if not 0.0 <= self.generation_fraction <= 1.0:
            raise ValueError(f"generation_fraction must be in [0, 1], got {self.generation_fraction}")
        if self.text_weight < 0 or self.vision_weight < 0:
            raise ValueError(f"loss weights must be non-negative, got text {self.text_weight}, vision {self.vision_weight}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")


@dataclasses.dataclass(frozen=True)
class Markers:
    """Text ids the layout adds: BOS/EOS (None = left out) and the tokenized ``<vision>`` tags."""

    bos: int | None
    eos: int | None
    vision_open: tuple[int, ...]
    vision_close: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, special) -> "Markers":
        """From a :class:`~pipelines.text_tokenizer.TextTokenizer` and a ``SpecialTokens`` policy."""
        return cls(
            tokenizer.bos_id if special.bos else None,
            tokenizer.eos_id if special.eos else None,
            tuple(int(i) for i in tokenizer.encode(vocab.VISION_OPEN)),
            tuple(int(i) for i in tokenizer.encode(vocab.VISION_CLOSE)),
        )


Part = tuple[np.ndarray | None, bool]  # (text ids, or VISION for the vision span; is a target)


def direction(example_id: str, config: LayoutConfig) -> str:
    """GENERATION or UNDERSTANDING for this example: the same in every run and worker."""
    draw = stable_hash(f"{config.salt}\0{example_id}") / 2.0**64
    return GENERATION if draw < config.generation_fraction else UNDERSTANDING


def template_parts(kind: str, caption: str, modality: str, template: str) -> tuple[tuple[str | None, bool], ...]:
    """The example's text around the vision span, as (text or VISION, is a target) parts in order."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    article = "an" if modality == "image" else "a"
    if (kind, template) == (GENERATION, "plain"):
        return ((caption, False), (VISION, True))
    if (kind, template) == (UNDERSTANDING, "plain"):
        return ((VISION, False), (caption, True))
    if (kind, template) == (GENERATION, "chat"):
        return ((f"{SYSTEM_PROMPT} USER: Generate {article} {modality} of {caption} ASSISTANT:", False), (VISION, True))
    if (kind, template) == (UNDERSTANDING, "chat"):
        return (
            (f"{SYSTEM_PROMPT} USER: Describe the {modality}.\n", False),
            (VISION, False),
            ("ASSISTANT:", False),
            (caption, True),
        )
    raise ValueError(f"unknown direction {kind!r} or template {template!r}")


def example_parts(example_id: str, caption: str, modality: str, config: LayoutConfig,
                  encode: Callable[[str], np.ndarray]) -> list[Part]:
    """The example's parts in its direction, text tokenized with ``encode`` (no BOS/EOS)."""
    kind = direction(example_id, config)
    return [
        (VISION if text is VISION else np.asarray(encode(text), np.int32), target)
        for text, target in template_parts(kind, caption, modality, config.template)
    ]


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


def uniform_frames(num_frames: int, keep: int) -> np.ndarray:
    """Indices of ``keep`` frames spread evenly over ``num_frames`` (the centre of each of ``keep`` equal spans)."""
    if not 1 <= keep <= num_frames:
        raise ValueError(f"cannot keep {keep} of {num_frames} frames")
    return ((np.arange(keep) + 0.5) * num_frames / keep).astype(np.int64)


def assemble(key: tuple[str, int], parts: Sequence[Part], codes_Fx16x16: np.ndarray, markers: Markers,
             config: LayoutConfig) -> Segment:
    """The segment of one example: ``parts`` (see :func:`template_parts`, text tokenized) around its frames."""
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
    learnt = np.concatenate([np.full(len(ids), target or config.condition_loss) for ids, _, target in pieces])
    weights = np.where(vision_mask, config.vision_weight, config.text_weight).astype(np.float32) * learnt
    weights[:1] = 0.0
    return Segment(key, tokens, vision_mask, weights.astype(np.float32))
