"""What the cluster backends share: the command every host runs, and running or printing commands.

Every host of a cluster launch runs ``lwm stages run PLAN --backend local``: one JAX
process per host, joined by ``jax.distributed`` (TPU pod, JobSet, SLURM detection),
each running the same stage loop. ``run_root`` and the datasets must be storage all
hosts share (a bucket mounted with gcsfuse, NFS, Lustre), so a relaunch after a
preemption sees the checkpoints and resumes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Sequence

from orchestration.stages.plan import LaunchConfig, Plan


def plan_name(plan: Plan) -> str:
    """A DNS-safe name for the plan's jobs: the file's stem, prefixed ``lwm-`` unless it starts so."""
    stem = os.path.splitext(os.path.basename(plan.path))[0].lower()
    name = "".join(c if c.isalnum() else "-" for c in stem).strip("-")
    return name if name.startswith("lwm-") else f"lwm-{name}"


def host_command(plan_path: str, stage_args: Sequence[str]) -> list[str]:
    """What each host runs (``stage_args`` carry ``--only``/``--from`` and the cluster's ``--devices``)."""
    return ["lwm", "stages", "run", plan_path, "--backend", "local", *stage_args]


def require(launch: LaunchConfig, *names: str) -> None:
    missing = [n for n in names if not getattr(launch, n)]
    if missing:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in missing)
        raise ValueError(f"backend {launch.backend} needs {flags} (or launch.{missing[0]} in the plan)")


def execute(commands: Sequence[Sequence[str]], dry_run: bool) -> int:
    """Prints each command; without ``dry_run`` also runs it, stopping at the first failure."""
    for command in commands:
        print("$ " + shlex.join(command), flush=True)
        if not dry_run:
            code = subprocess.run(list(command)).returncode
            if code:
                print(f"lwm stages: {command[0]} exited {code}", flush=True)
                return code
    return 0
