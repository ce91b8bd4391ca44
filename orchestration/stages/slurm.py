"""The ``slurm`` backend: an ``sbatch`` script running the plan on whole GPU nodes, one task per GPU.

``srun`` starts ``gpus_per_node`` tasks on each of ``hosts`` nodes, each running
``lwm stages run PLAN --backend local``: one JAX process per GPU. Every task sees all
of its node's GPUs (no per-task GPU binding), and ``jax.distributed.initialize()``
finds its peers from the SLURM variables and takes GPU ``SLURM_LOCALID`` of them, so
the processes together use every GPU the plan's meshes were checked against
(``hosts x gpus_per_node``). Only task 0 writes lineage.

Preemption and time limits need no one: the job takes whole nodes (``--exclusive``) and
is requeueable (``--requeue``, output appended across requeues), so SLURM requeues it
after a preemption or a node failure. Five minutes before the time limit the batch
shell alone gets USR1 (``--signal=B:USR1@300``). It then sends SIGTERM to the tasks
through ``scancel --signal=TERM`` (not to ``srun``, which would forward SIGTERM as
SIGKILL), the stages save and exit 143, and the shell requeues the job itself
(``scontrol requeue``); the next allocation resumes the plan from its checkpoints. A
SIGTERM to the batch shell (``scancel``, a preemption) is passed to the tasks the same
way, without the requeue. Sites can have preemption send the same USR1 first
(``PreemptParameters=send_user_signal``), so that a preempted job saves too. Other exit
statuses end the job (``orchestration.stages.stage_runner``: 2 bad input, 3 failed gate,
4 non-finite loss).
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from orchestration.stages import local, remote
from orchestration.stages.plan import LaunchConfig, Plan

SAVE_BEFORE_LIMIT_S = 300

# The batch shell: srun in the background, so that its traps run while the step works.
_SUPERVISE = """\
stop_tasks() {{ scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true; }}
on_limit() {{
  echo "lwm-slurm: the time limit is {seconds} s away: the stages save, then the job requeues itself"
  requeue=1
  stop_tasks
}}
on_term() {{
  echo "lwm-slurm: SIGTERM (scancel or preemption): the stages save"
  stop_tasks
}}
requeue=0
trap on_limit USR1
trap on_term TERM
{srun} &
step=$!
while :; do
  status=0
  wait "$step" || status=$?
  kill -0 "$step" 2>/dev/null || break
done
if [ "$status" -eq {preempted} ] && [ "$requeue" -eq 1 ]; then
  scontrol requeue "$SLURM_JOB_ID" || true
fi
exit "$status"
"""


def directives(plan: Plan, launch: LaunchConfig) -> list[str]:
    """The script's ``#SBATCH`` options (long forms, as ``sbatch --help`` lists them)."""
    name = remote.plan_name(plan)
    found = [
        f"--job-name={name}", f"--nodes={launch.hosts}", f"--ntasks-per-node={launch.gpus_per_node}",
        f"--gpus-per-node={launch.gpus_per_node}", "--exclusive", "--requeue", "--open-mode=append",
        f"--time={launch.time_limit}", f"--signal=B:USR1@{SAVE_BEFORE_LIMIT_S}", f"--output={name}-%j.out",
    ]
    if launch.partition:
        found.append(f"--partition={launch.partition}")
    if launch.account:
        found.append(f"--account={launch.account}")
    return found


def srun_command(plan: Plan, stage_args: Sequence[str]) -> list[str]:
    return ["srun", "--kill-on-bad-exit=1", *remote.host_command(plan.path, stage_args)]


def script(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str]) -> str:
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives(plan, launch)),
             f"# {plan.path}: {len(plan.stages)} stage(s); one JAX process per GPU ({launch.hosts} nodes x "
             f"{launch.gpus_per_node}), joined through SLURM's variables.",
             "set -euo pipefail"]
    if launch.setup:
        lines.append(launch.setup)
    lines.append(_SUPERVISE.format(srun=shlex.join(srun_command(plan, stage_args)), preempted=local.PREEMPTED,
                                   seconds=SAVE_BEFORE_LIMIT_S))
    return "\n".join(lines).rstrip("\n") + "\n"


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool) -> int:
    path = f"{remote.plan_name(plan)}.sbatch"
    text = script(plan, config, stage_args)
    print(f"# {path}\n{text}", end="", flush=True)
    if not dry_run:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return remote.execute([["sbatch", path]], dry_run)
