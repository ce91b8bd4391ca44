"""The haystack sweep that the retrieval tasks share: prompts of an exact token length, scoring, the grid.

The registered tasks (:mod:`trainer.evaluation`) are thin over it: ``needle``,
``multi-needle`` and ``variable-tracking`` each take :class:`NeedleConfig` with
their own defaults (:func:`sweep_task`).

Needle (the LWM paper's retrieval test): filler text (the haystack) of sentences from any text,
with "The special magic {city} number is: {7 digits}." inserted at a sentence boundary
at the requested depth; LWM's chat template asks "What is the special magic {city}
number?"; the greedy answer is correct iff the number appears in it. Multi-needle:
``needles`` needles in the haystack (the first at the requested depth, the others at
seeded depths), the question asks for ``ask`` of them (all must appear).

Variable tracking (RULER): a chain "VAR ABCDE = 12345." then "VAR FGHIJ = ABCDE." …
(``hops`` assignments after the first) starts at the requested depth and continues at
seeded later boundaries; ``needles - 1`` more chains with other values are distractors.
The question asks which variables hold the first chain's value; correct iff every name
of that chain appears in the answer.

Prompt layout, every part tokenized on its own (BOS added explicitly)::

    BOS | "You are a helpful assistant. USER:" | haystack with needles | "{question} ASSISTANT:"

Its length in tokens is exactly the requested length: the haystack is a window of
whole sentences that starts inside a sentence (a fragment, as if opened at a random
place in a book), so every insertion point is a real sentence boundary. Trials are
seeded by (seed, task, length, depth, round), so a sweep is deterministic.

Construction and scoring are pure; :func:`run` drives a ``trainer.inference.sampler.Sampler``
over the grid and writes ``results.jsonl``, a table and ``heatmap.png`` (drawn on its own
``matplotlib.figure.Figure``: the process's pyplot backend is left alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
import typing
from typing import Callable, Literal, Sequence

import numpy as np

from pipelines.tokens.prompts import OPENING, needle_question, needle_sentence, question_closing, variable_question
from schemas import flags, raw, storage
from trainer.evaluation import Target, Task, synthetic_books

Kind = Literal["needle", "variable-tracking"]  # what a sweep inserts and asks about
KINDS = typing.get_args(Kind)
# The eval's cities; generators of training data must use others (TRAIN_CITIES).
EVAL_CITIES = ("Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle",
               "Lagos", "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia",
               "Victoria", "Tashkent", "Mumbai", "Barcelona", "Havana", "Helsinki", "Kampala", "Lima")
TRAIN_CITIES = ("Oslo", "Lisbon", "Nairobi", "Quito", "Hanoi", "Tunis", "Riga", "Accra", "Bogota", "Manila",
                "Vienna", "Dublin", "Montreal", "Osaka", "Perth", "Porto", "Santiago", "Tbilisi", "Zagreb",
                "Muscat", "Dhaka", "Lusaka", "Valencia", "Geneva", "Caracas")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
RESULTS = "results.jsonl"  # one line per trial, in every sweep's output directory


def check_depths(depths: Sequence[float]) -> None:
    """Refuse a sweep's depths unless there are some and each lies in [0, 1]."""
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    """One sweep: ``lengths`` × ``depths`` × ``rounds`` prompts, answered greedily in batches."""

    lengths: tuple[int, ...] = flags.field((1024, 2048, 4096), parse=flags.number_list(int), metavar="L,...")
    """Prompt lengths in tokens (whole prompts), comma-separated."""
    depths: tuple[float, ...] = flags.field((0.0, 0.25, 0.5, 0.75, 1.0), parse=flags.number_list(float), metavar="D,...")
    """Needle depths in [0, 1] (fractions of the haystack), comma-separated."""
    rounds: int = 3
    """Trials per (length, depth), each with new needles."""
    needles: int = 1
    """Needles inserted (variable tracking: chains, the others distractors)."""
    ask: int = 1
    """Needles asked for (all must be in the answer)."""
    task: Kind = "needle"
    """What to insert and ask."""
    hops: int = 4
    """Variable tracking: assignments after the first."""
    seed: int = 0
    """Seed of haystack windows, cities, numbers, names."""
    max_new_tokens: int = flags.field(48, flag="max-tokens")
    """Most answer tokens (greedy, stops at EOS)."""
    haystack: tuple[str, ...] = flags.field((), metavar="FILE")
    """Filler text files (.jsonl: each line's 'text'); none: synthetic books."""
    batch_size: int = 16
    """Prompts sampled together."""
    sp: int = 1
    """Devices of the ring prompts and caches are split over."""
    cities: tuple[str, ...] = flags.field(EVAL_CITIES, hidden=True)
    """Cities of the needles (the eval's; training exercises use others)."""
    digits: int = flags.field(7, hidden=True)
    """Digits of each needle's number (the eval's 7; training exercises vary it)."""

    def __post_init__(self):
        if self.task not in KINDS:
            raise ValueError(f"task must be one of {KINDS}, got {self.task!r}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        check_depths(self.depths)
        if self.rounds < 1 or self.hops < 1 or self.max_new_tokens < 1 or self.digits < 1:
            raise ValueError("rounds, hops, max_new_tokens and digits must be >= 1")
        if not 1 <= self.ask <= self.needles:
            raise ValueError(f"need 1 <= ask <= needles, got ask {self.ask}, needles {self.needles}")
        if self.task == "needle" and self.needles > len(self.cities):
            raise ValueError(f"{self.needles} needles need as many cities; {len(self.cities)} given")
        if self.task == "variable-tracking" and self.ask != 1:
            raise ValueError("variable tracking asks about one chain (ask 1); --needles adds distractor chains")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt of the sweep and what a correct answer must contain."""

    task: str
    length: int
    depth: float
    round: int
    prompt: tuple[int, ...]
    expected: tuple[str, ...]  # strings that must all appear in the answer
    reference: str  # an ideal answer (the asked needles' sentences; the chain's names)
    needle_offsets: tuple[int, ...]  # token offset in the prompt of each inserted sentence, in order


class Haystack:
    """Sentences of filler text, tokenized once. ``encode(text) -> ids`` adds no BOS/EOS."""

    def __init__(self, texts: Sequence[str], encode: Callable[[str], Sequence[int]]):
        sentences = [s.strip() for text in texts for s in _SENTENCE_END.split(text) if s.strip()]
        if len(sentences) < 2:
            raise ValueError("the haystack needs text of at least two sentences")
        self.sentences = [list(map(int, encode(s))) for s in sentences]
        self.sentences = [s for s in self.sentences if s]
        self.tokens = sum(len(s) for s in self.sentences)

    def window(self, budget: int, rng: random.Random) -> list[list[int]]:
        """Pieces of exactly ``budget`` tokens in all: a sentence's tail, then whole sentences, from a
        random place (wrapping around); every boundary between pieces is a sentence boundary."""
        start = rng.randrange(len(self.sentences))
        pieces: list[list[int]] = []
        total, i = 0, start
        while total < budget:
            pieces.append(self.sentences[i % len(self.sentences)])
            total += len(pieces[-1])
            i += 1
        extra = total - budget  # cut at the front: whole sentences, then the first one's head
        while extra >= len(pieces[0]):
            extra -= len(pieces.pop(0))
        pieces[0] = pieces[0][extra:]
        return pieces


def _boundary(pieces: Sequence[Sequence[int]], depth: float) -> int:
    """Index of the piece boundary (0 = before all, len = after all) whose token offset is closest to
    ``depth`` of the haystack; whole-sentence boundaries only (never inside the leading fragment)."""
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    target = depth * offsets[-1]
    candidates = [0] + list(range(1, len(pieces) + 1))
    return min(candidates, key=lambda b: (abs(offsets[b] - target), b))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _statements(config: NeedleConfig, rng: random.Random) -> tuple[list[str], list[str], str, str]:
    """The sentences to insert (asked one first), the strings a correct answer contains, the question
    and an ideal answer."""
    if config.task == "needle":
        cities = rng.sample(list(config.cities), config.needles)
        numbers = [_number(rng, config.digits) for _ in cities]
        sentences = [needle_sentence(c, n) for c, n in zip(cities, numbers)]
        question = " ".join(needle_question(c) for c in cities[:config.ask])
        return sentences, numbers[:config.ask], question, " ".join(sentences[:config.ask])
    values = rng.sample(range(10000, 100000), config.needles)
    chains = []
    for value in values:
        names = [_name(rng) for _ in range(config.hops + 1)]
        chains.append((names, [f"VAR {names[0]} = {value}."] +
                       [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]))
    names = chains[0][0]
    return [s for _, c in chains for s in c], names, variable_question(str(values[0])), ", ".join(names) + "."


def build_trial(haystack: Haystack, encode: Callable[[str], Sequence[int]], bos_id: int, config: NeedleConfig,
                length: int, depth: float, round_index: int) -> Trial:
    """The prompt of one (length, depth, round) cell: exactly ``length`` tokens (module docstring)."""
    rng = random.Random(f"{config.seed}/{config.task}/{length}/{depth}/{round_index}")
    sentences, expected, question, reference = _statements(config, rng)
    prefix = list(encode(OPENING))
    suffix = list(encode(question_closing(question)))
    inserts = [list(encode(s)) for s in sentences]
    needed = 1 + len(prefix) + len(suffix) + sum(map(len, inserts))
    if length <= needed:
        raise ValueError(f"length {length} is too short: the template, question and needles alone take {needed} tokens")
    body, offsets = _body(haystack, config, inserts, length - 1 - len(prefix) - len(suffix), depth, rng)
    prompt = [bos_id, *prefix, *body, *suffix]
    assert len(prompt) == length
    return Trial(config.task, length, depth, round_index, tuple(int(t) for t in prompt), tuple(expected),
                 reference, tuple(1 + len(prefix) + offset for offset in offsets))


def _body(haystack: Haystack, config: NeedleConfig, inserts: Sequence[list[int]], size: int, depth: float,
          rng: random.Random) -> tuple[list[int], list[int]]:
    """A haystack window with the encoded sentences ``inserts`` inserted, ``size`` tokens in all, and each
    inserted sentence's token offset in it (in order)."""
    budget = size - sum(map(len, inserts))
    if budget < 1:
        raise ValueError(f"{size} tokens leave no room for a haystack: the needles alone take {size - budget}")
    pieces = haystack.window(budget, rng)
    slots = _insertion_points(config, pieces, depth, len(inserts), rng)
    body: list[int] = []
    offsets = []
    for b in range(len(pieces) + 1):
        for index in [i for i, slot in enumerate(slots) if slot == b]:
            offsets.append((index, len(body)))
            body += inserts[index]
        if b < len(pieces):
            body += pieces[b]
    return body, [offset for _, offset in sorted(offsets)]


def _insertion_points(config: NeedleConfig, pieces, depth: float, count: int, rng: random.Random) -> list[int]:
    """Boundary index of each inserted sentence, in insertion order (ties keep that order)."""
    first = _boundary(pieces, depth)
    if config.task == "needle":
        return [first] + [_boundary(pieces, rng.random()) for _ in range(count - 1)]
    chain = config.hops + 1
    slots = []
    for c in range(count // chain):
        start = first if c == 0 else _boundary(pieces, rng.random())
        later = sorted(rng.randint(start, len(pieces)) for _ in range(chain - 1))
        slots += [start, *later]
    return slots


def score(answer: str, expected: Sequence[str]) -> bool:
    """True iff every expected string (a number, a variable name) appears in the answer as a whole token."""
    return all(re.search(rf"(?<![0-9A-Za-z]){re.escape(e)}(?![0-9A-Za-z])", answer) for e in expected)


def trials(haystack: Haystack, encode, bos_id: int, config: NeedleConfig) -> list[Trial]:
    """Every trial of the sweep: lengths × depths × rounds, in that order."""
    return [build_trial(haystack, encode, bos_id, config, length, depth, r)
            for length in config.lengths for depth in config.depths for r in range(config.rounds)]


def training_texts(haystack: Haystack, tokenizer, count: int, *, min_length: int = 64, max_length: int = 512,
                   digits: tuple[int, int] = (7, 7), seed: int = 1) -> list[str]:
    """``count`` haystacks with one needle each, as plain text, for retrieval training data: a window of
    ``min_length``..``max_length`` tokens (needle included; at least one token besides it) with the needle
    at a random depth, as the eval builds it, its number ``digits[0]``..``digits[1]`` digits long.
    ``lwm data chat-qa --generator needle`` turns each into the eval's prompt (template, question) and
    answer, loss on the answer only. Cities come from ``TRAIN_CITIES`` and numbers from a seed namespace
    of their own, so no eval needle is ever trained on.

    Short haystacks with short numbers are how the tiny demo model starts to retrieve at all (BENCHMARKS
    "Needle in a haystack"): attending to the one number in a few dozen tokens is learned first, then
    copying it digit by digit."""
    if not 1 <= min_length <= max_length or not 1 <= digits[0] <= digits[1]:
        raise ValueError(f"need 1 <= min_length <= max_length and 1 <= digits[0] <= digits[1], got lengths "
                         f"{min_length}..{max_length}, digits {digits[0]}..{digits[1]}")
    rng = random.Random(f"training/{seed}")
    texts = []
    for _ in range(count):
        config = NeedleConfig(cities=TRAIN_CITIES, digits=rng.randint(*digits))
        inserts = [list(tokenizer.encode(s)) for s in _statements(config, rng)[0]]
        size = max(rng.randint(min_length, max_length), sum(map(len, inserts)) + 1)
        body, _ = _body(haystack, config, inserts, size, rng.random(), rng)
        texts.append(tokenizer.decode(body))
    return texts


# ----------------------------------------------------------------------------- the sweep


def accuracy_grid(results: Sequence[dict], depths: Sequence[float], columns: Sequence[int],
                  key: str = "length") -> np.ndarray:
    """Mean correctness ``[depths, columns]`` of trials whose ``key`` is each column (NaN where no trial ran)."""
    grid = np.full((len(depths), len(columns)), np.nan)
    for i, depth in enumerate(depths):
        for j, column in enumerate(columns):
            cell = [r["correct"] for r in results if r["depth"] == depth and r[key] == column]
            if cell:
                grid[i, j] = float(np.mean(cell))
    return grid


def table(results: Sequence[dict], depths: Sequence[float], columns: Sequence[int], key: str = "length") -> str:
    """Accuracy (%) per depth (rows) and ``key`` (columns: context length, frames), with an overall row."""
    grid = accuracy_grid(results, depths, columns, key)
    width = max(7, *(len(str(n)) + 1 for n in columns))
    lines = [f"depth \\ {key}".ljust(15) + "".join(str(n).rjust(width) for n in columns)]
    for depth, row in zip(depths, grid):
        lines.append(f"{depth:<15g}" + "".join(f"{100 * v:{width}.0f}" for v in row))
    overall = [np.mean([r["correct"] for r in results if r[key] == n] or [np.nan]) for n in columns]
    lines.append("all".ljust(15) + "".join(f"{100 * v:{width}.0f}" for v in overall))
    return "\n".join(lines)


def heatmap(grid: np.ndarray, columns: Sequence, rows: Sequence, path: str, *, title: str, xlabel: str,
            ylabel: str = "depth") -> str:
    """``path``: a PNG of ``grid`` (accuracy in [0, 1], ``[rows, columns]``, NaN left blank) with each cell's
    percentage, drawn on a figure of its own (no pyplot, so a notebook's backend is untouched)."""
    from matplotlib.figure import Figure  # imported here: plotting is the sweep's last step, never a reader's

    fig = Figure(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.6 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), [f"{c:g}" if isinstance(c, float) else str(c) for c in columns])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run(sampler, tokenizer, haystack_texts: Sequence[str], config: NeedleConfig, out_dir: str, *,
        progress: Callable[[str], None] = print) -> list[dict]:
    """The sweep on a loaded ``trainer.inference.sampler.Sampler``: greedy answers, ``OUT/results.jsonl`` (one
    line per trial), ``OUT/table.txt`` and ``OUT/heatmap.png``. Every length is checked against the
    model's context and the device memory before the first trial runs. Returns the result records."""
    from trainer.inference.sampler import SampleSettings  # imported here: reading results needs no JAX

    batch_size = config.batch_size
    for length in config.lengths:
        sampler.check_fits(min(batch_size, len(config.depths) * config.rounds), length, config.max_new_tokens)
    haystack = Haystack(haystack_texts, tokenizer.encode)
    settings = SampleSettings(max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_id)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    with open(os.path.join(out_dir, RESULTS), "w") as out:
        for length in config.lengths:
            cell = [build_trial(haystack, tokenizer.encode, tokenizer.bos_id, config, length, d, r)
                    for d in config.depths for r in range(config.rounds)]
            for start in range(0, len(cell), batch_size):
                chunk = cell[start:start + batch_size]
                answers = sampler.generate([t.prompt for t in chunk], settings)
                for trial, answer_ids in zip(chunk, answers):
                    answer = tokenizer.decode(answer_ids)
                    record = {"task": trial.task, "length": trial.length, "depth": trial.depth, "round": trial.round,
                              "expected": ", ".join(trial.expected), "expected_values": list(trial.expected),
                              "reference": trial.reference,
                              "needle_offset": trial.needle_offsets[0], "needle_offsets": list(trial.needle_offsets),
                              "answer": answer, "correct": score(answer, trial.expected)}
                    out.write(json.dumps(record) + "\n")
                    results.append(record)
            out.flush()
            accuracy = np.mean([r["correct"] for r in results if r["length"] == length])
            progress(f"length {length}: {100 * accuracy:.0f}% of {len(cell)} trials correct")
    text = table(results, config.depths, config.lengths)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(text + "\n")
    heatmap(accuracy_grid(results, config.depths, config.lengths), config.lengths, config.depths,
            os.path.join(out_dir, "heatmap.png"),
            title=f"{config.task}: {config.needles} inserted, {config.ask} asked, {config.rounds} rounds",
            xlabel="context length (tokens)")
    return results


# ----------------------------------------------------------------------------- as registered tasks


def haystack_texts(paths: Sequence[str]) -> list[str]:
    """Text of the haystack files (``.jsonl``, optionally ``.gz``: each line's ``text``, read as the data jobs
    read books, so a bad line is an error naming it; any other file: its whole text), or, without files,
    synthetic books."""
    if not paths:
        return [synthetic_books.book(random.Random(10_000 + i), 200) for i in range(20)]
    texts = []
    for path in paths:
        if not path.endswith((".jsonl", ".jsonl.gz")):
            texts.append(storage.read_bytes(path).decode())
            continue
        with storage.open(path, "rb") as f:
            for record in raw.iter_documents(f, path):
                if isinstance(record, raw.DeadLetter):
                    raise ValueError(f"haystack {record.source or path}: {record.reason} ({record.detail})")
                texts.append(record.text)
    return texts


def accuracies(results: Sequence[dict], columns: Sequence[int], name: str, key: str = "length") -> dict[str, float]:
    """``{name}_accuracy/{column}``: the share of correct trials at each ``key`` (context length, frames)."""
    return {f"{name}_accuracy/{n}": float(np.mean([r["correct"] for r in results if r[key] == n]))
            for n in columns if any(r[key] == n for r in results)}


def sweep_task(name: str, config: type, *, help: str, description: str, examples: tuple[str, ...]) -> Task:
    """A registered task that runs the sweep with ``config`` (a :class:`NeedleConfig` with its own defaults)
    and measures ``{name}_accuracy/{length}`` per prompt length."""

    def run_task(config: NeedleConfig, target: Target, out: str) -> str:
        from trainer.inference.sampler import open_checked  # imported here: reading results needs no JAX

        texts = haystack_texts(config.haystack)  # bad input refused before the weights load
        tokenizer, sampler = open_checked(target.ckpt, target.tokenizer, step=target.step, sp=config.sp)
        run(sampler, tokenizer, texts, config, out)
        with open(os.path.join(out, "table.txt")) as f:
            table_text = f.read()
        return (f"\n{config.task} accuracy (%), depth × context length:\n{table_text}"
                f"results: {os.path.join(out, RESULTS)}\nheatmap: {os.path.join(out, 'heatmap.png')}")

    def metrics(config: NeedleConfig, out: str) -> dict[str, float]:
        lines = storage.read_bytes(storage.join(out, RESULTS)).decode().splitlines()
        return accuracies([json.loads(line) for line in lines if line.strip()], config.lengths, name)

    def metric_names(config: NeedleConfig) -> tuple[str, ...]:
        return tuple(f"{name}_accuracy/{n}" for n in config.lengths)

    return Task(name, config, run_task, metrics, metric_names, help=help, description=description,
                examples=examples)
