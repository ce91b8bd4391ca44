"""Progress lines for long data jobs: documents read, tokens, elapsed time and an ETA.

Beam's local runner reports metrics only when a job ends, so the job's DoFns report
here as they work: every :data:`INTERVAL_S` seconds one line through the
``pipelines.kit.progress`` logger, e.g.::

    progress: 2/5 files (41% of input bytes), 12,345 documents, 3,456,789 tokens, 0:01:02 elapsed, ETA 0:01:29

The ETA extrapolates from the input bytes of the files read so far. The switch and
the job's start and input size travel in environment variables, so worker processes
(``--direct_running_mode=multi_processing``) report too, each its own share.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import time

log = logging.getLogger(__name__)
INTERVAL_S = 10.0
_ON, _START, _BYTES, _FILES = "LWM_PROGRESS", "LWM_PROGRESS_START", "LWM_PROGRESS_BYTES", "LWM_PROGRESS_FILES"


def enable(on: bool) -> None:
    """Turn progress lines on or off for this process and the workers it starts."""
    os.environ[_ON] = "1" if on else "0"


def start(input_bytes: int, input_files: int) -> None:
    """Mark a job's start and the size of its input (for the ETA)."""
    os.environ.update({_START: str(time.time()), _BYTES: str(input_bytes), _FILES: str(input_files)})
    _REPORTER.reset()


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def line(counts: collections.Counter, elapsed: float, total_bytes: int, total_files: int) -> str:
    """One progress line from counts of ``files``, ``input_bytes``, ``documents``, ``tokens``."""
    parts = []
    if total_files:
        share = counts["input_bytes"] / total_bytes if total_bytes else 0.0
        parts.append(f"{counts['files']}/{total_files} files ({share:.0%} of input bytes)")
    parts += [f"{counts['documents']:,} documents", f"{counts['tokens']:,} tokens", f"{_duration(elapsed)} elapsed"]
    if total_bytes and 0 < counts["input_bytes"] < total_bytes:
        parts.append(f"ETA {_duration(elapsed * (total_bytes - counts['input_bytes']) / counts['input_bytes'])}")
    return "progress: " + ", ".join(parts)


class _Reporter:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.last = time.monotonic()

    def add(self, **counts: int) -> None:
        self.counts.update(counts)
        now = time.monotonic()
        if now - self.last < INTERVAL_S or os.environ.get(_ON) != "1":
            return
        self.last = now
        elapsed = time.time() - float(os.environ.get(_START, time.time()))
        log.info(line(self.counts, elapsed, int(os.environ.get(_BYTES, 0)), int(os.environ.get(_FILES, 0))))


_REPORTER = _Reporter()


def add(**counts: int) -> None:
    """Count work done in this process (``files``, ``input_bytes``, ``documents``, ``tokens``); prints a
    line when one is due."""
    _REPORTER.add(**counts)
