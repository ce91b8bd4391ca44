"""The ``tpu-vm`` backend: every worker of a Cloud TPU VM runs the plan over ``gcloud ... ssh --worker=all``.

1. build a wheel of this code; 2. copy it and the plan to ``BUCKET/lwm-stages/NAME/``;
3. on every worker: fetch both, install the wheel (with the ``tpu`` extra), run
``lwm stages run PLAN --backend local``. Preemption-safe: the workers resume from
the checkpoints in the shared ``run_root``, so after a preemption (or any failure)
the same command continues the plan.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import shlex
import sys
from typing import Sequence

from orchestration.stages import remote
from orchestration.stages.plan import LaunchConfig, Plan

DIST = "dist"
REMOTE_DIR = "/tmp/lwm-stages"


def wheel_name() -> str:
    version = importlib.metadata.version("lwm-workflow")
    return f"lwm_workflow-{version}-py3-none-any.whl"


def commands(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str]) -> list[list[str]]:
    remote.require(launch, "tpu", "zone", "project", "bucket")
    root = pathlib.Path(__file__).resolve().parents[2]
    staged = f"{launch.bucket.rstrip('/')}/lwm-stages/{remote.plan_name(plan)}"
    plan_file = pathlib.Path(plan.path).name
    wheel = wheel_name()
    on_worker = "; ".join(x for x in (
        "set -e",
        launch.setup,
        f"mkdir -p {REMOTE_DIR}",
        f"gcloud storage cp {staged}/{wheel} {staged}/{plan_file} {REMOTE_DIR}/",
        "python3 -m pip install -q " + shlex.quote(f"{REMOTE_DIR}/{wheel}[tpu]"),
        shlex.join(remote.host_command(f"{REMOTE_DIR}/{plan_file}", stage_args)),
    ) if x)
    return [
        [sys.executable, "-m", "build", "--wheel", "--outdir", DIST, str(root)],
        ["gcloud", "storage", "cp", f"{DIST}/{wheel}", plan.path, f"{staged}/"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", launch.tpu, "--zone", launch.zone, "--project",
         launch.project, "--worker=all", "--command", on_worker],
    ]


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool) -> int:
    return remote.execute(commands(plan, config, stage_args), dry_run)
