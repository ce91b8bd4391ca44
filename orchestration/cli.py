"""The `lwm` command line: one entry point, one module per command group.

Each module in ``orchestration/commands/`` exposes ``register(subparsers)``, which
adds its sub-command(s) with ``set_defaults(func=...)``; the function parses
nothing itself and calls one library function.

Every user error ends in one line on stderr, ``lwm: error: ...``, and exit status
2: a ``ValueError`` from library code (bad input or config), a file that is
missing, unreadable or not writable (``OSError``, named with what to do) and a
YAML file that does not parse.
Ctrl-C outside training (which saves and exits 130 itself) exits 130 in one line.

Every command takes ``-v`` (library logs: absl, Orbax, JAX, Beam, at INFO) and ``-q``
(no progress lines either); by default libraries log errors only. ``lwm --help``
lists the groups from ``COMMANDS`` without importing them, so it starts at once.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import warnings
from importlib import metadata

import yaml

# Command groups and their one-line summaries, in the order `lwm --help` lists them;
# each is the module orchestration/commands/NAME.py.
COMMANDS = {
    "env": "the versions, devices, tools and credentials this machine offers (for set-up checks and bug reports)",
    "tokenizer": "train text tokenizers",
    "data": "preprocessing jobs (Beam) and dataset inspection",
    "train": "train one stage from a YAML config (resumes from its newest checkpoint)",
    "stages": "run a stage plan (all stages, resumable), its data jobs, its status",
    "convert": "convert checkpoints to and from other formats",
    "generate": "sample text, an image or a video from a checkpoint",
    "chat": "chat with a checkpoint about an image or a video (one question, or several turns from stdin)",
    "serve": "serve a checkpoint over the OpenAI API (chat and completions, text, images and video; batched)",
    "eval": "evaluate a checkpoint: held-out loss, needle in a haystack and the other registered tasks",
    "demo": "run the whole workflow on embedded sample data, on CPU",
    "completion": "print a shell completion script (bash or zsh) for lwm",
}
COMMAND_MODULES = tuple(COMMANDS)
# Loggers of the libraries the commands run; quiet (errors only) unless -v.
LIBRARY_LOGGERS = ("jax", "jaxlib", "orbax", "flax", "grain", "apache_beam", "tensorboardX", "fsspec")
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
_running: list[int] = []  # one entry per main() call under way (`lwm demo` and `lwm stages data` call it again)


def version() -> str:
    try:
        return metadata.version("lwm-workflow")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class _Commands(argparse._SubParsersAction):
    """The top level's sub-parsers: a group's summary is always its ``COMMANDS`` line (the one ``lwm --help``
    shows without importing the group), whichever parser is built."""

    def add_parser(self, name, **kwargs):
        kwargs["help"] = COMMANDS[name]
        return super().add_parser(name, **kwargs)


def build_parser(command: str | None = None, *, every: bool | None = None) -> argparse.ArgumentParser:
    """The parser of every command group (``command`` None), or of ``command``'s alone: a command imports
    only its own libraries (a data job need not load JAX or torch before it starts). With ``every=False``
    the groups other than ``command`` are listed by name and summary only, nothing imported (``lwm --help``)."""
    every = command is None if every is None else every
    parser = argparse.ArgumentParser(
        prog="lwm",
        description="Large World Model workflow: data jobs (Beam), training (JAX, RingAttention) and the tools "
        "around them. `lwm COMMAND --help` describes each command and ends with examples.",
    )
    parser.register("action", "parsers", _Commands)
    parser.add_argument("--version", action="version", version=f"lwm {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        if every or command == name:
            importlib.import_module(f"orchestration.commands.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, add_help=False)
    for leaf in _leaves(subparsers):
        _add_verbosity(leaf)
    return parser


def _leaves(subparsers) -> list[argparse.ArgumentParser]:
    """The parsers that run something, under ``subparsers`` (placeholders of unloaded groups excluded)."""
    found = []
    for sub in dict.fromkeys(subparsers.choices.values()):  # aliases share a parser
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            found += _leaves(nested[0])
        elif sub.add_help:
            found.append(sub)
    return found


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q``, the same on every command."""
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="also show library logs (absl, Orbax, JAX, Beam); -vv: debug logs")
    group.add_argument("-q", "--quiet", action="count", default=0, help="no progress lines; warnings and errors only")


def configure_logging(verbosity: int) -> None:
    """Library loggers: errors only by default (their warnings say nothing a user can act on), INFO with -v,
    DEBUG with -vv; library Python warnings are shown only with -v."""
    import absl.logging  # before its logger is touched: absl gives "absl" its own Logger class

    name = "error" if verbosity <= 0 else "info" if verbosity == 1 else "debug"
    absl.logging.set_verbosity(name)  # Orbax logs through absl
    level = logging.getLevelName(name.upper())
    if verbosity > 0:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for logger in LIBRARY_LOGGERS:
        logging.getLogger(logger).setLevel(level)
    warnings.filterwarnings("default" if verbosity > 0 else "ignore",
                            module=r"(absl|jax|orbax|flax|grain|apache_beam|tensorboardX)(\.|$)")


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
    parser = build_parser(command_group(argv), every=False)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not _running:  # an inner call keeps the outer command's -v/-q
        configure_logging(args.verbose - args.quiet)
    _running.append(args.verbose - args.quiet)
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
    finally:
        _running.pop()


if __name__ == "__main__":
    sys.exit(main())
