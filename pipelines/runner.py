"""Beam options and output preparation shared by every data job.

Local runs default to Beam's ``FnApiRunner``: it runs offline (``DirectRunner``
first tries Prism, a binary it downloads) and honours
``--direct_running_mode=multi_processing``, which runs every DoFn in separate
processes, pickled as on Dataflow. ``--runner DataflowRunner`` ships this project
to the workers as a package built from its ``pyproject.toml`` unless
``--setup_file`` says otherwise.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

log = logging.getLogger(__name__)
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Options from pass-through Beam arguments, with this project's defaults filled in."""
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    if "dataflow" in standard.runner.lower():
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = str(PROJECT_ROOT / "pyproject.toml")
    return options


def check_inputs(patterns: Sequence[str]) -> None:
    """Fail before launching if a pattern matches no file."""
    if not patterns:
        raise ValueError("no --input given")
    for pattern in patterns:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise ValueError(f"--input {pattern!r} matches no file")


def prepare_output(directories: Sequence[str], overwrite: bool) -> None:
    """Refuse to mix with earlier output; with ``overwrite``, delete it first (manifest first, so a
    half-deleted dataset can never look complete)."""
    for directory in directories:
        existing = sorted(m.path for m in FileSystems.match([FileSystems.join(directory, "**")])[0].metadata_list)
        if not existing:
            continue
        if not overwrite:
            raise ValueError(f"{directory} already holds files; pass --overwrite to replace them")
        manifest = FileSystems.join(directory, "manifest.json")
        if manifest in existing:
            FileSystems.delete([manifest])
            existing.remove(manifest)
        FileSystems.delete(existing)  # files, not the folder: object stores have no folders
        log.info("deleted %d earlier output files in %s", len(existing), directory)
