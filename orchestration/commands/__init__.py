"""`lwm` sub-command groups; each module exposes ``register(subparsers)``.

Also what several groups share: the ``examples:`` section that ends every
command's ``--help``, ``--json`` output, progress lines that ``-q`` silences, the
arguments naming a checkpoint, and a sampler opened from them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

EXAMPLES = "examples:"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, except an ``examples:`` section, whose lines stay as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith(EXAMPLES):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def add_examples(parser: argparse.ArgumentParser, *lines: str) -> None:
    """End ``parser``'s help with an ``examples:`` section: runnable ``lwm ...`` lines, each optionally
    followed by ``  # what it does``. ``tests/test_cli_conventions.py`` parses every line, so none goes stale."""
    section = "\n".join([EXAMPLES, *(f"  {line}" for line in lines)])
    if parser.epilog:  # an epilog of its own (e.g. `lwm train`'s config keys) is laid out as written
        parser.epilog = f"{parser.epilog}\n\n{section}"
    else:
        parser.epilog = section
        if parser.formatter_class is argparse.HelpFormatter:
            parser.formatter_class = HelpFormatter


def add_json_flag(parser: argparse.ArgumentParser, fields: str) -> None:
    """``--json``: one JSON document on stdout instead of the text (progress stays on stderr)."""
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON document on stdout instead (progress stays on stderr): {fields}")


def print_json(document) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


@contextlib.contextmanager
def progress_on_stdout(args):
    """Runs a library call whose progress goes to stdout (training's step lines, the demo's steps); ``-q``
    drops it."""
    if not getattr(args, "quiet", 0):
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def progress(args, text: str) -> None:
    """A progress line on stderr, unless ``-q``."""
    if not getattr(args, "quiet", 0):
        print(text, file=sys.stderr, flush=True)


def add_checkpoint_arguments(parser, *, tokenizer: bool = False) -> None:
    """``--ckpt`` and ``--step`` (and ``--tokenizer`` for commands that read or write text)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or a run directory holding checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    if tokenizer:
        parser.add_argument("--tokenizer", required=True, help="the SentencePiece model the checkpoint was trained with")


def add_sampling_arguments(parser, *, max_tokens_help: str) -> None:
    """How tokens are drawn (``lwm generate`` and ``lwm chat`` alike): budget, temperature, top-k, top-p,
    seed, and the ring the prompt and cache are split over; :func:`sample_settings` reads them."""
    parser.add_argument("--max-tokens", type=int, default=256, help=max_tokens_help)
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    parser.add_argument("--sp", type=int, default=1, help="devices of the ring the prompt and cache are split over")


def sample_settings(args, **overrides):
    """The ``SampleSettings`` of :func:`add_sampling_arguments`' flags (``overrides`` win)."""
    from trainer.inference.sampler import SampleSettings

    fields = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed)
    return SampleSettings(**{**fields, **overrides})


def open_sampler(args):
    """``(tokenizer, Sampler)`` from ``--tokenizer``, ``--ckpt``, ``--step`` and ``--sp``, checked together."""
    from trainer.inference.sampler import open_checked

    return open_checked(args.ckpt, args.tokenizer, step=args.step, sp=args.sp)
