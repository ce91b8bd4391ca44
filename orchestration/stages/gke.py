"""The ``gke`` backend: a JobSet running the plan on one or more TPU slices, one pod per host.

The manifest holds two documents: a ConfigMap with the plan file, and a JobSet with one
replicated job ``slice`` of ``slices`` replicas, each an Indexed Job of one slice's hosts.
The number of pods follows from the accelerator and topology (``orchestration.stages.tpus``:
a host per 4 chips), each pod asking for its host's chips. The pods follow xpk's
conventions: the GKE TPU node selectors and the ``google.com/tpu`` toleration, host
networking with ``ClusterFirstWithHostNet`` DNS, a memory-backed ``/dev/shm``, and an
optional Kueue queue label and priority class.

Joining: JobSet names pod ``p`` of slice ``s`` ``NAME-slice-s-p`` under the headless
service ``NAME``, so pod 0 of slice 0 is the JAX coordinator (``LWM_COORDINATOR``) and
the process id is ``s * hosts + p`` (``LWM_PROCESS_ID``, the ``LWM_*`` variables of
``trainer.distributed``). With several slices the ``MEGASCALE_*`` variables join them
over the data-center network, and every stage's ``mesh.dcn`` must span the slices.

Failures: a pod that exits 143 (SIGTERM: preemption, node drain; the stage saved) or
137 (killed after the grace period), or that a disruption removes, fails its Job, and
JobSet recreates every pod (at most ``max_restarts`` times); the plan resumes from its
checkpoints. Any other exit status is final (a pod failure policy fails the Job, and
the JobSet's failure policy the JobSet): 1 an unexpected error, 2 bad input or config,
3 a failed gate, 4 a non-finite loss (``orchestration.stages.stage_runner``'s statuses).
``lwm`` is the container's main process (``exec``), so SIGTERM reaches it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import yaml

from orchestration.stages import local, remote, tpus
from orchestration.stages.plan import LaunchConfig, Plan
from trainer.sharding import dcn_shape

COORDINATOR_PORT = 8476
MEGASCALE_PORT = 8080
PLAN_DIR = "/etc/lwm-stages"
REPLICATED_JOB = "slice"
RESTARTED_EXITS = (local.PREEMPTED, 137)  # SIGTERM (saved), SIGKILL after the grace period
MAX_POD_NAME = 63  # a pod name is a DNS label
TPU_TOLERATION = {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_hostname(name: str, slice_index: int, pod_index: int) -> str:
    """The DNS name JobSet gives pod ``pod_index`` of slice ``slice_index`` (its headless service: ``name``)."""
    return f"{name}-{REPLICATED_JOB}-{slice_index}-{pod_index}.{name}"


def check_slices(plan: Plan, devices: int, slices: int) -> None:
    """Each stage's mesh splits over ``slices`` slices (its ``dcn`` part spans them)."""
    if slices == 1:
        return
    for stage in plan.stages:
        try:
            dcn_shape(stage.config.mesh, stage.config.mesh.resolve(devices), slices)
        except ValueError as error:
            raise ValueError(f"stages[{stage.name}] on {slices} slices: {error}") from None


def _env(name: str, hosts: int, slices: int) -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        {"name": "LWM_COORDINATOR", "value": f"{pod_hostname(name, 0, 0)}:{COORDINATOR_PORT}"},
        {"name": "LWM_NUM_PROCESSES", "value": str(hosts * slices)},
        {"name": "LWM_SLICE_ID", **field("metadata.labels['jobset.sigs.k8s.io/job-index']")},
        {"name": "LWM_HOST_IN_SLICE", **field("metadata.annotations['batch.kubernetes.io/job-completion-index']")},
    ]
    if slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": pod_hostname(name, 0, 0)},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
            {"name": "MEGASCALE_SLICE_ID", **field("metadata.labels['jobset.sigs.k8s.io/job-index']")},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    return env


def _pod(launch: LaunchConfig, name: str, plan_file: str, stage_args: Sequence[str], hosts: int,
         chips: int) -> dict[str, Any]:
    process_id = f"export LWM_PROCESS_ID=$((LWM_SLICE_ID * {hosts} + LWM_HOST_IN_SLICE))"
    run = "exec " + " ".join(remote.host_command(f"{PLAN_DIR}/{plan_file}", stage_args))
    command = " && ".join(x for x in (process_id, launch.setup, run) if x)
    ports = [{"containerPort": COORDINATOR_PORT}] + (
        [{"containerPort": MEGASCALE_PORT}] if launch.slices > 1 else [])
    container = {
        "name": "lwm", "image": launch.image, "command": ["bash", "-c", command],
        "env": _env(name, hosts, launch.slices), "ports": ports,
        "resources": {"limits": {"google.com/tpu": chips}},
        "volumeMounts": [{"name": "plan", "mountPath": PLAN_DIR}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 300,
        "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": launch.accelerator,
                         "cloud.google.com/gke-tpu-topology": launch.topology},
        "tolerations": [TPU_TOLERATION],
        "containers": [container],
        "volumes": [{"name": "plan", "configMap": {"name": f"{name}-plan"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if launch.priority_class:
        pod["priorityClassName"] = launch.priority_class
    return pod


def _failure_policy() -> dict[str, Any]:
    """The Job's pod failure policy: a disruption is retried; an exit status other than 143/137 fails the Job."""
    return {"rules": [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "lwm", "operator": "NotIn",
                                              "values": sorted(RESTARTED_EXITS)}},
    ]}


def manifest(plan: Plan, launch: LaunchConfig, stage_args: Sequence[str], plan_text: str) -> str:
    remote.require(launch, "accelerator", "topology", "image")
    gen = tpus.generation(launch.accelerator)
    hosts = tpus.hosts(gen, launch.topology)
    if launch.hosts not in (1, hosts):
        raise ValueError(f"--hosts {launch.hosts}: a {launch.topology} slice of {launch.accelerator} has {hosts} "
                         f"host(s) of {tpus.chips_per_host(gen, launch.topology)} chips; leave --hosts out for gke")
    name = remote.plan_name(plan)
    longest = f"{name}-{REPLICATED_JOB}-{launch.slices - 1}-{hosts - 1}"
    if len(longest) > MAX_POD_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"plan name {name!r} makes pod names such as {longest!r}, not DNS labels of at most "
                         f"{MAX_POD_NAME} characters: rename the plan file shorter")
    check_slices(plan, launch.cluster_devices(), launch.slices)
    plan_file = os.path.basename(plan.path)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-plan", "namespace": launch.namespace},
                  "data": {plan_file: plan_text}}
    metadata: dict[str, Any] = {"name": name, "namespace": launch.namespace}
    if launch.queue:
        metadata["labels"] = {"kueue.x-k8s.io/queue-name": launch.queue}
    metadata["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    pod = _pod(launch, name, plan_file, stage_args, hosts, tpus.chips_per_host(gen, launch.topology))
    job_set = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": launch.max_restarts,
                              "rules": [{"name": "finalExitStatus", "action": "FailJobSet",
                                         "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": launch.slices, "template": {"spec": {
                "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
                "backoffLimit": 0, "podFailurePolicy": _failure_policy(),
                "template": {"spec": pod}}}}],
        },
    }
    return yaml.dump_all([config_map, job_set], Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the plan file) as literal blocks, readable in the manifest."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _Dumper.represent_str)


def launch(plan: Plan, config: LaunchConfig, stage_args: Sequence[str], dry_run: bool, devices: int = 0) -> int:
    with open(plan.path) as f:
        text = manifest(plan, config, stage_args, f.read())
    path = f"{remote.plan_name(plan)}.jobset.yaml"
    print(f"# {path}\n{text}", end="", flush=True)
    if not dry_run:
        with open(path, "w") as f:
            f.write(text)
    return remote.execute([["kubectl", "apply", "-f", path]], dry_run)
