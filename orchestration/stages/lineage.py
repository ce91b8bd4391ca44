"""``RUN_DIR/lineage.json``: what a stage was made from and how it ended.

Every host of a multi-host launch runs the plan; only the first writes lineage.
Written when the stage starts (``state: running``), updated when it stops
(``interrupted`` after a SIGTERM, ``failed`` with the exit status) and completed when
it finishes (``finished``, ``finished_at``, ``final_metrics``; evaluation results
and the gate's verdict are added after). Keys: ``plan`` (path), ``plan_sha256``,
``stage``, ``config`` (the resolved ``lwm train`` config), ``parent`` (``run_dir``,
``checkpoint``, ``step``; null for a first stage), ``datasets`` (each ``path`` and
``manifest_sha256``), ``code_version``, ``processes``, ``devices``, ``started_at``,
``finished_at``, ``final_metrics``, ``state``, ``attempts`` (each start, end and
outcome, and the host and pid of the ``lwm stages run`` that made it, so a resumed
stage shows its interruptions and a runner killed outright is recognised).
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import socket
import subprocess
from typing import Any

from schemas import storage

LINEAGE_NAME = "lineage.json"
# Variables that number the hosts: trainer.distributed's, a TPU VM pod's, an indexed Kubernetes Job's, SLURM's.
HOST_INDEX_VARIABLES = ("LWM_PROCESS_ID", "TPU_WORKER_ID", "JOB_COMPLETION_INDEX", "SLURM_PROCID")


def is_first_host(env: dict[str, str] | None = None) -> bool:
    """True on the host that writes lineage: host 0 of a multi-host launch, or a single machine."""
    env = os.environ if env is None else env
    index = next((env[v] for v in HOST_INDEX_VARIABLES if env.get(v)), "0")
    return index == "0"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), else the installed version."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "lwm-workflow " + importlib.metadata.version("lwm-workflow")


def path(run_dir: str) -> str:
    return storage.join(run_dir, LINEAGE_NAME)


def read(run_dir: str) -> dict[str, Any] | None:
    """The stage's lineage, or None before it first started."""
    if not storage.exists(path(run_dir)):
        return None
    return json.loads(storage.read_bytes(path(run_dir)))


def write(run_dir: str, record: dict[str, Any]) -> None:
    """Writes ``record`` atomically (a reader never sees half a file); only the first host writes."""
    if not is_first_host():
        return
    storage.write_atomically(path(run_dir), (json.dumps(record, indent=2) + "\n").encode())


def start(run_dir: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Records a start (first or resumed): ``fields`` refresh the inputs; ``started_at`` stays the first one."""
    record = read(run_dir) or {"started_at": now(), "attempts": []}
    record.update(fields, state="running", finished_at=None, final_metrics=None)
    attempt = {"started_at": now(), "ended_at": None, "outcome": "running", "host": socket.gethostname(),
               "pid": os.getpid()}
    record["attempts"] = record.get("attempts", []) + [attempt]
    write(run_dir, record)
    return record


def end(run_dir: str, outcome: str, **fields: Any) -> dict[str, Any]:
    """Closes the current attempt with ``outcome`` (``finished``, ``interrupted``, ``failed``) and ``fields``."""
    record = read(run_dir) or {}
    record.update(fields, state=outcome)
    if outcome == "finished":
        record["finished_at"] = now()
    if record.get("attempts"):
        record["attempts"][-1].update(ended_at=now(), outcome=outcome)
    write(run_dir, record)
    return record


def update(run_dir: str, **fields: Any) -> dict[str, Any]:
    record = read(run_dir) or {}
    record.update(fields)
    write(run_dir, record)
    return record


def duration_s(record: dict[str, Any] | None) -> float:
    """Seconds spent in the stage's attempts (the running one up to now)."""
    total = 0.0
    for attempt in (record or {}).get("attempts", []):
        begin = datetime.datetime.fromisoformat(attempt["started_at"])
        end_at = attempt.get("ended_at")
        stop = datetime.datetime.fromisoformat(end_at) if end_at else datetime.datetime.now(datetime.timezone.utc)
        total += (stop - begin).total_seconds()
    return total


def runner_gone(record: dict[str, Any]) -> bool:
    """True when the record says ``running`` but its runner, on this host, no longer exists (killed outright)."""
    attempts = record.get("attempts") or [{}]
    last = attempts[-1]
    if record.get("state") != "running" or last.get("host") != socket.gethostname() or not last.get("pid"):
        return False
    try:
        os.kill(last["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
