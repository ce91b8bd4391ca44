"""Beam pipeline options of every data job: validated, with this project's defaults.

Local runs default to Beam's ``FnApiRunner``: it runs offline (``DirectRunner``
first tries Prism, a binary it downloads) and honours
``--direct_running_mode=multi_processing``, which runs every DoFn in separate
processes, pickled as on Dataflow. ``--runner DataflowRunner`` ships this project
to the workers as a package built from its ``pyproject.toml`` unless
``--setup_file`` says otherwise. An argument that neither the job nor Beam knows is
an error naming the closest valid option (Beam itself would only log "Discarding
unparseable args" and run with defaults).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import pathlib
from typing import Iterable, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

log = logging.getLogger(__name__)
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL_RUNNER = "FnApiRunner"


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@functools.cache
def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every option Beam's ``PipelineOptions`` subclasses define (as Beam builds it)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for cls in {c.__name__: c for c in _subclasses(PipelineOptions)}.values():
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:  # an option two subclasses both define
            continue
    return parser


def check_known(beam_args: Sequence[str], known: Iterable[str] = ()) -> None:
    """Refuse an argument that is no Beam option, naming the closest of Beam's and ``known`` (the job's flags)."""
    parser = _beam_parser()
    try:
        _, unknown = parser.parse_known_args(list(beam_args))
    except argparse.ArgumentError as error:
        raise ValueError(f"Beam option {error}") from None
    if not unknown:
        return
    word = unknown[0].split("=", 1)[0]
    if not word.startswith("-"):
        raise ValueError(f"unexpected argument {word!r}")
    valid = sorted({o for a in parser._actions for o in a.option_strings} | set(known))
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see --help"
    raise ValueError(f"unknown option {word}{hint}")


def pipeline_options(beam_args: Sequence[str], known: Iterable[str] = ()) -> PipelineOptions:
    """Options from pass-through Beam arguments, with this project's defaults filled in.

    ``known``: the job's own flags, offered as suggestions when an argument is unknown.
    """
    check_known(beam_args, known)
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    if "dataflow" in standard.runner.lower():
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = str(PROJECT_ROOT / "pyproject.toml")
    return options
