"""LWM's chat template and the wording of the retrieval tasks: the one owner of these strings.

LWM's chat models were trained on ``You are a helpful assistant. USER: {question}
ASSISTANT: {answer}``; its vision chat puts the vision span after the question
(``USER: {question}\\n<vision>…</vision> ASSISTANT:``, the pieces
``You are a helpful assistant. USER: {question}\\n``, ``<vision>``, the frames,
``</vision>`` and `` ASSISTANT:`` each tokenized on its own) and its generation prompt
is ``USER: Generate an image of {caption} ASSISTANT:`` ("a video of" for videos). A
later turn of a conversation follows the previous answer and its EOS with
`` USER: {question} ASSISTANT:`` (:func:`user_turn`; the layout of a whole
conversation with its image or video is ``pipelines.tokens.vision_layout.conversation``).
Every prompt this project builds (sampler, vision data jobs, chat-QA contexts,
needle evaluation) takes its strings from here, so training data and prompts agree
token for token. The tokenizer adds nothing: BOS and EOS are always explicit ids.

The needle wording follows the LWM paper's needle-in-a-haystack test: "The special
magic {city} number is: {7 digits}." and "What is the special magic {city}
number?"; variable tracking follows RULER.
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are a helpful assistant."
USER = "USER:"
ASSISTANT = "ASSISTANT:"
OPENING = f"{SYSTEM_PROMPT} {USER}"  # what a conversation starts with, before its first question
ASSISTANT_CUE = f" {ASSISTANT}"  # after a vision span, tokenized on its own, as LWM's vision chat does


def user_turn(question: str, *, first: bool, vision: bool = False, system: str = SYSTEM_PROMPT) -> str:
    """The text of a user turn up to where its answer starts, or (``vision``) up to its image or video.

    First turn: ``You are a helpful assistant. USER: {q} ASSISTANT:``; a later one, after the
    previous answer: `` USER: {q} ASSISTANT:``. With ``vision`` the text stops after ``{q}\\n``;
    the vision span and :data:`ASSISTANT_CUE` follow as pieces of their own. ``system`` replaces the
    system prompt of the first turn (a chat API's system message).
    """
    opening = f"{system} {USER}" if first else f" {USER}"
    return f"{opening} {question}\n" if vision else f"{opening} {question} {ASSISTANT}"


def chat_prompt(question: str) -> str:
    """One question in the template, up to the answer: ``You are a helpful assistant. USER: {q} ASSISTANT:``."""
    return user_turn(question, first=True)


def question_closing(question: str) -> str:
    """The end of a user turn whose opening came before (a haystack, a vision span): ``{q} ASSISTANT:``."""
    return f"{question} {ASSISTANT}"


def generation_request(modality: str, caption: str) -> str:
    """LWM's request for an image or a video of a caption."""
    article = "an" if modality == "image" else "a"
    return f"Generate {article} {modality} of {caption}"


def description_request(modality: str) -> str:
    """The question of an understanding example: describe the image or video."""
    return f"Describe the {modality}."


def needle_sentence(city: str, number: str) -> str:
    return f"The special magic {city} number is: {number}."


def needle_question(city: str) -> str:
    return f"What is the special magic {city} number?"


def variable_question(value: str) -> str:
    return f"Find all variables that are assigned the value {value} in the text above."


VIDEO_NEEDLE_LETTERS = "ABCDEFGH"


def video_needle_question(options) -> str:
    """The video needle's question (after LongVA's V-NIAH: a question about the needle image with lettered
    options), answered with a letter."""
    listed = " ".join(f"({letter}) {option}" for letter, option in zip(VIDEO_NEEDLE_LETTERS, options))
    return (f"One frame of the video shows something different from the others. What is it? {listed} "
            f"Answer with the option's letter.")


def check_video_needle_counts(frames, options: int) -> None:
    """Refuse video-needle prompts that cannot be made: fewer than 2 frames (a haystack frame and the
    needle), or a number of options the question cannot letter (2 to 8)."""
    if not frames or min(frames) < 2:
        raise ValueError(f"frames must be counts of at least 2 (a haystack frame and the needle), got {frames}")
    if not 2 <= options <= len(VIDEO_NEEDLE_LETTERS):
        raise ValueError(f"options must lie in [2, {len(VIDEO_NEEDLE_LETTERS)}] (one letter each), got {options}")


def video_needle_answer(letter: str, option: str) -> str:
    """The answer the video needle's training exercises teach: the option as the question lists it."""
    return f"({letter}) {option}"
