"""The ``gke`` backend: a JobSet running the plan on a TPU slice, one pod per host.

The manifest holds two documents: a ConfigMap with the plan file, and a JobSet of
one Indexed Job with ``hosts`` pods, pinned to the slice by the GKE TPU node
selectors (accelerator, topology) and requesting the chips of one host each. JobSet's
headless service gives pod 0 a stable name, the JAX coordinator; each pod's process id
is its completion index: the ``LWM_*`` variables of ``trainer.distributed``. ``lwm`` is the
container's main process (``exec``), so Kubernetes' SIGTERM reaches it and the
running stage saves; JobSet restarts the pods after a failure and the plan resumes
from its checkpoints.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import yaml

from orchestration.stages import remote
from orchestration.stages.plan import LaunchConfig, Plan

COORDINATOR_PORT = 8476
PLAN_DIR = "/etc/lwm-stages"


def manifest(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str], plan_text: str, devices: int) -> str:
    remote.require(launch, "accelerator", "topology", "image")
    if devices % launch.hosts:
        raise ValueError(f"{devices} TPU chips do not split over --hosts {launch.hosts}")
    name = remote.plan_name(plan)
    plan_file = os.path.basename(plan.path)
    command = "exec " + " ".join(remote.host_command(f"{PLAN_DIR}/{plan_file}", stage_args))
    if launch.setup:
        command = f"{launch.setup} && {command}"
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-plan", "namespace": launch.namespace},
                  "data": {plan_file: plan_text}}
    container: dict[str, Any] = {
        "name": "lwm", "image": launch.image, "command": ["bash", "-c", command],
        "env": [
            {"name": "LWM_COORDINATOR", "value": f"{name}-workers-0-0.{name}:{COORDINATOR_PORT}"},
            {"name": "LWM_NUM_PROCESSES", "value": str(launch.hosts)},
            {"name": "LWM_PROCESS_ID", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ],
        "ports": [{"containerPort": COORDINATOR_PORT}],
        "resources": {"limits": {"google.com/tpu": devices // launch.hosts}},
        "volumeMounts": [{"name": "plan", "mountPath": PLAN_DIR}],
    }
    pod = {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 300,
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": launch.accelerator,
                         "cloud.google.com/gke-tpu-topology": launch.topology},
        "containers": [container],
        "volumes": [{"name": "plan", "configMap": {"name": f"{name}-plan"}}],
    }
    job_set = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": name, "namespace": launch.namespace,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": 10},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": {
                "parallelism": launch.hosts, "completions": launch.hosts, "completionMode": "Indexed",
                "backoffLimit": 0, "template": {"spec": pod}}}}],
        },
    }
    return yaml.dump_all([config_map, job_set], Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the plan file) as literal blocks, readable in the manifest."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _Dumper.represent_str)


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool, devices: int) -> int:
    with open(plan.path) as f:
        text = manifest(plan, config, stage_args, f.read(), devices)
    path = f"{remote.plan_name(plan)}.jobset.yaml"
    print(f"# {path}\n{text}", end="", flush=True)
    if not dry_run:
        with open(path, "w") as f:
            f.write(text)
    return remote.execute([["kubectl", "apply", "-f", path]], dry_run)
