"""The `lwm` command line: one entry point, one module per command group.

Each module in ``orchestration/commands/`` exposes ``register(subparsers)``, which
adds its sub-command(s) with ``set_defaults(func=...)``; the function parses
nothing itself and calls one library function.

Every user error ends in one line on stderr, ``lwm: error: ...``, and exit status
2: a ``ValueError`` from library code (bad input or config), a file that is
missing, unreadable or not writable (``OSError``, named with what to do) and a
YAML file that does not parse.
Ctrl-C outside training (which saves and exits 130 itself) exits 130 in one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from importlib import metadata

import yaml

# Command groups, in the order `lwm --help` lists them.
COMMAND_MODULES = (
    "tokenizer",
    "data",
    "train",
    "stages",
    "convert",
    "generate",
    "chat",
    "eval",
    "demo",
)
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def version() -> str:
    try:
        return metadata.version("lwm-workflow")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command group, or of ``command``'s alone: a command imports only
    its own libraries (a data job need not load JAX or torch before it starts)."""
    parser = argparse.ArgumentParser(
        prog="lwm",
        description="Large World Model workflow: data jobs (Beam), training (JAX, RingAttention) and the tools "
        "around them. `lwm COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"lwm {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        if command in (None, name):
            importlib.import_module(f"orchestration.commands.{name}").register(subparsers)
    return parser


def command_group(argv: list[str]) -> str | None:
    """The command group ``argv`` names (its first word, when it is one), else None."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in COMMAND_MODULES else None


def os_error_message(error: OSError) -> str:
    """One line naming the file and what to do about it."""
    name = error.filename if error.filename is not None else "a file"
    hints = {
        errno.ENOENT: "check the path (relative paths start from the current directory)",
        errno.EACCES: "check its permissions, or choose a path you can read and write",
        errno.EPERM: "check its permissions, or choose a path you can read and write",
        errno.EISDIR: "give a file, not a directory",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.ENOSPC: "free space on that disk or choose another",
        errno.EROFS: "the file system is read-only: choose another path",
    }
    hint = hints.get(error.errno, "check the path")
    return f"{name}: {error.strerror or error}: {hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_group(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra) or 0)
    except ValueError as error:  # bad input or config: a clear message, no traceback
        print(f"lwm: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as error:
        print(f"lwm: error: {os_error_message(error)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a YAML file"
        print(f"lwm: error: {where}: not valid YAML ({getattr(error, 'problem', None) or error}): fix its syntax",
              file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("lwm: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
