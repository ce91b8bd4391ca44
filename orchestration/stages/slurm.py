"""The ``slurm`` backend: an ``sbatch`` script running the plan on GPU nodes, one task per node.

``srun`` starts one ``lwm stages run PLAN --backend local`` per node; each trains
with all its node's GPUs as one JAX process, and ``jax.distributed.initialize()``
finds its peers from the SLURM variables. ``--signal=TERM@300`` gives the stage five
minutes to save before the time limit; resubmitting the script resumes the plan.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from orchestration.stages import remote
from orchestration.stages.plan import LaunchConfig, Plan


def script(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str]) -> str:
    name = remote.plan_name(plan)
    directives = [
        f"--job-name={name}", f"--nodes={launch.hosts}", "--ntasks-per-node=1",
        f"--gpus-per-node={launch.gpus_per_node}", f"--time={launch.time_limit}", "--signal=TERM@300",
        f"--output={name}-%j.out",
    ]
    if launch.partition:
        directives.append(f"--partition={launch.partition}")
    if launch.account:
        directives.append(f"--account={launch.account}")
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             f"# {plan.path}: {len(plan.stages)} stage(s); one JAX process per node, found through SLURM's variables.",
             "set -euo pipefail"]
    if launch.setup:
        lines.append(launch.setup)
    lines.append("srun --kill-on-bad-exit=1 " + shlex.join(remote.host_command(plan.path, stage_args)))
    return "\n".join(lines) + "\n"


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool) -> int:
    path = f"{remote.plan_name(plan)}.sbatch"
    text = script(plan, config, stage_args)
    print(f"# {path}\n{text}", end="", flush=True)
    if not dry_run:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return remote.execute([["sbatch", path]], dry_run)
