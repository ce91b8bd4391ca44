"""The ``tpu-vm`` backend: every worker of a Cloud TPU VM runs the plan, detached from the ssh session.

1. build a wheel of this code and write the worker script (``NAME.worker.sh``);
2. copy the wheel, the plan and the script to ``BUCKET/lwm-stages/NAME/``;
3. ``gcloud ... ssh --worker=all`` fetches them on every worker and starts the script in
   a session of its own (``setsid nohup``), then returns: a dropped connection or a
   closed laptop does not stop the run. A worker where the script still runs is left
   alone (a lock), so the same command is safe to repeat.

The worker script finds a Python >= 3.11 (``python3.12``, ``python3.11``, ``python3``;
TPU VM images ship older ones, so it installs ``python3.11`` with apt when none is
there), makes a virtual environment, installs the wheel with its ``tpu`` extra and
runs ``lwm stages run PLAN --backend local``. Its output goes to
``/tmp/lwm-stages/NAME/worker-HOST.log`` on the worker and, every 30 s and at the end,
to ``BUCKET/lwm-stages/NAME/logs/``; ``reattach`` says how to follow it. Preemption-safe:
the workers resume from the checkpoints in the shared ``run_root``, so after a
preemption (or any failure) the same command continues the plan.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shlex
import sys
from typing import Sequence

from orchestration.stages import remote
from orchestration.stages.plan import LaunchConfig, Plan

DIST = "dist"
REMOTE_DIR = "/tmp/lwm-stages"
LOG_COPY_EVERY_S = 30
MIN_PYTHON = (3, 11)

_WORKER = """\
#!/bin/bash
# lwm stages on one TPU VM worker, detached from the ssh session that started it.
set -uo pipefail
dir={dir}
log="$dir/worker-$(hostname).log"
staged={staged}
exec 9>"$dir/lock"
if ! flock -n 9; then
  echo "lwm-tpu-vm: already running on $(hostname); not started again"
  exit 0
fi
copy_log() {{ gcloud storage cp "$log" "$staged/logs/" >/dev/null 2>&1 || true; }}
(while sleep {every}; do copy_log; done) &
copier=$!
(
  set -e
  # this worker's index (lineage is written by worker 0 only), from the TPU VM's metadata server
  metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  export TPU_WORKER_ID="${{TPU_WORKER_ID:-$(curl -s -m 5 -H 'Metadata-Flavor: Google' "$metadata/agent-worker-number" ||
                                           true)}}"
  {setup}
  python=""
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < {min_python})'; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "lwm-tpu-vm: no Python >= {min_dotted} on $(hostname); installing python3.11"
    sudo apt-get update -qq
    apt-cache show python3.11 >/dev/null 2>&1 || sudo add-apt-repository -y ppa:deadsnakes/ppa
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
    python=python3.11
  fi
  [ -x "$dir/venv/bin/python" ] || "$python" -m venv "$dir/venv"
  "$dir/venv/bin/python" -m pip install -q {wheel}
  {run}
) >>"$log" 2>&1
status=$?
echo "lwm-tpu-vm: lwm stages exited $status on $(hostname)" >>"$log"
kill "$copier" 2>/dev/null || true
copy_log
exit "$status"
"""


def wheel_name() -> str:
    version = importlib.metadata.version("lwm-workflow")
    return f"lwm_workflow-{version}-py3-none-any.whl"


def _names(plan: Plan, launch: LaunchConfig) -> tuple[str, str, str]:
    """(staging location in the bucket, folder on each worker, worker script's file name)."""
    name = remote.plan_name(plan)
    return f"{launch.bucket.rstrip('/')}/lwm-stages/{name}", f"{REMOTE_DIR}/{name}", f"{name}.worker.sh"


def worker_script(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str]) -> str:
    """The script each worker runs detached (module docstring)."""
    staged, folder, _ = _names(plan, launch)
    plan_file = pathlib.Path(plan.path).name
    run = ['"$dir/venv/bin/lwm"', *map(shlex.quote, remote.host_command(f"{folder}/{plan_file}", stage_args)[1:])]
    return _WORKER.format(
        dir=shlex.quote(folder), staged=shlex.quote(staged), every=LOG_COPY_EVERY_S, setup=launch.setup or ":",
        min_python=repr(MIN_PYTHON), min_dotted=".".join(map(str, MIN_PYTHON)),
        wheel=shlex.quote(f"{folder}/{wheel_name()}[tpu]"), run=" ".join(run))


def commands(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str]) -> list[list[str]]:
    remote.require(launch, "tpu", "zone", "project", "bucket")
    root = pathlib.Path(__file__).resolve().parents[2]
    staged, folder, script = _names(plan, launch)
    plan_file = pathlib.Path(plan.path).name
    wheel = wheel_name()
    fetch_and_start = "; ".join((
        "set -e",
        f"mkdir -p {folder}",
        f"if ! flock -n {folder}/lock true; then echo \"lwm-tpu-vm: already running on $(hostname)\"; exit 0; fi",
        f"gcloud storage cp {staged}/{wheel} {staged}/{plan_file} {staged}/{script} {folder}/",
        f"(setsid nohup bash {folder}/{script} >/dev/null 2>&1 < /dev/null &)",
        f"echo \"lwm-tpu-vm: started on $(hostname), detached; log {folder}/worker-$(hostname).log\"",
    ))
    return [
        [sys.executable, "-m", "build", "--wheel", "--outdir", DIST, str(root)],
        ["gcloud", "storage", "cp", f"{DIST}/{wheel}", plan.path, f"{DIST}/{script}", f"{staged}/"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", launch.tpu, "--zone", launch.zone, "--project",
         launch.project, "--worker=all", "--command", fetch_and_start],
    ]


def reattach(plan: Plan, launch: LaunchConfig) -> str:
    """How to follow a detached run: the workers' logs over ssh, or their copies in the bucket."""
    staged, folder, _ = _names(plan, launch)
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", launch.tpu, "--zone", launch.zone, "--project",
           launch.project, "--worker=0", "--command", f"tail -n 50 -F {folder}/worker-*.log"]
    return (f"# the plan runs detached on every worker of {launch.tpu}; closing this session does not stop it.\n"
            f"# follow worker 0:       {shlex.join(ssh)}\n"
            f"# logs of every worker:  gcloud storage ls {staged}/logs/  (copied every {LOG_COPY_EVERY_S} s)\n"
            f"# after a preemption, run the same command again: it resumes the plan.\n")


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool) -> int:
    steps = commands(plan, config, stage_args)
    script = worker_script(plan, config, stage_args)
    path = os.path.join(DIST, _names(plan, config)[2])
    print(f"# {path}\n{script}", end="", flush=True)
    if not dry_run:
        os.makedirs(DIST, exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
    code = remote.execute(steps, dry_run)
    if not code:
        print(reattach(plan, config), end="", flush=True)
    return code
