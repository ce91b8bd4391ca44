"""The `lwm` command line: one entry point, one module per command group.

Each module in ``orchestration/commands/`` exposes ``register(subparsers)``, which
adds its sub-command(s) with ``set_defaults(func=...)``; the function parses
nothing itself and calls one library function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command groups, in the order `lwm --help` lists them.
COMMAND_MODULES = (
    "tokenizer",
    "data",
    "train",
    "convert",
    "generate",
    "eval",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwm",
        description="Large World Model workflow: data pipelines, training stages, conversion, evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"orchestration.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra) or 0)
    except ValueError as error:  # bad input or config: a clear message, no traceback
        print(f"lwm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
