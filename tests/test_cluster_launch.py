"""Cluster launches checked against the real schemas and tools, not against our own golden files.

- gke: every JobSet validates against the JobSet CRD's schema (``tests/jobset_crd.yaml``,
  vendored from kubernetes-sigs/jobset) with kubectl's strict field validation, and
  against the Kubernetes object rules, for v4, v5e, v5p and v6e slices of one host to
  many and for two slices; pods x chips per pod = the topology's chips; the coordinator
  is pod 0 by JobSet's naming; accelerator names that are not GKE labels are refused.
- slurm: the script uses only options of sbatch, srun and scancel (``tests/slurm_options.txt``,
  from Slurm's man pages); with the environment srun gives each task, JAX's own SLURM
  detection makes the processes together use every GPU the plan was checked against;
  the batch shell requeues the job itself before the time limit, after the stages saved.
- tpu-vm: the launch survives its ssh client being killed (a fake ``gcloud``).
- exit statuses: a failed gate and a non-finite loss stop a plan with distinct codes.
"""

import functools
import itertools
import os
import pathlib
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import jsonschema
import pytest
import yaml

from orchestration import cli
from orchestration.stages import gke, local, plan as plan_lib, remote, slurm, status, tpu_vm
from orchestration.stages import stage_runner as runner
from tests.test_loader import write_dataset

TESTS = pathlib.Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- gke

# (accelerator, topology, slices, pods per slice, chips per pod)
SHAPES = [
    ("tpu-v4-podslice", "2x2x1", 1, 1, 4), ("tpu-v4-podslice", "2x2x4", 1, 4, 4),
    ("tpu-v4-podslice", "4x4x8", 1, 32, 4), ("tpu-v4-podslice", "2x2x4", 2, 4, 4),
    ("tpu-v5-lite-podslice", "1x1", 1, 1, 1), ("tpu-v5-lite-podslice", "2x2", 1, 1, 4),
    ("tpu-v5-lite-podslice", "4x8", 1, 8, 4), ("tpu-v5-lite-podslice", "16x16", 1, 64, 4),
    ("tpu-v5-lite-podslice", "4x8", 2, 8, 4),
    ("tpu-v5p-slice", "2x2x1", 1, 1, 4), ("tpu-v5p-slice", "4x4x4", 1, 16, 4), ("tpu-v5p-slice", "4x4x8", 2, 32, 4),
    ("tpu-v6e-slice", "1x1", 1, 1, 1), ("tpu-v6e-slice", "2x4", 1, 2, 4), ("tpu-v6e-slice", "8x16", 1, 32, 4),
]


def _plan_file(tmp_path, mesh=None, launch=None):
    mapping = {
        "run_root": str(tmp_path / "runs"), "launch": launch or {"backend": "local"},
        "defaults": {"model": {"preset": "tiny", "vision_vocab_size": 0}, "data": {"batch_size": 512},
                     "mesh": mesh or {"dp": -1, "fsdp": 1, "sp": 1, "tp": 1}},
        "stages": [{"name": "a", "steps": 4, "data": {"seq_len": 64, "datasets": [{"path": str(tmp_path / "d")}]}}],
    }
    path = tmp_path / "lwm-cluster.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _job_set(capsys, plan, *flags):
    code, out, err = _run(capsys, "stages", "run", plan, "--backend", "gke", "--image", "lwm:1", *flags, "--dry-run")
    assert code == 0, err
    return list(yaml.safe_load_all("".join(out.splitlines(keepends=True)[1:-1])))


def _strict(schema):
    """kubectl's strict field validation: a field that an object schema does not name is an error."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _jobset_validator():
    crd = yaml.safe_load((TESTS / "jobset_crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    return jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))  # OpenAPI v3.0 ~ draft 4


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _kubernetes_problems(config_map, job_set):
    """What the API server and JobSet's webhook would refuse that the CRD schema does not say."""
    problems = []
    name = job_set["metadata"]["name"]
    check = lambda ok, what: ok or problems.append(what)  # noqa: E731
    check(DNS_1035.fullmatch(name) and len(name) <= 63, f"JobSet name {name}")
    check(DNS_LABEL.fullmatch(config_map["metadata"]["name"]), "ConfigMap name")
    check(all(re.fullmatch(r"[-._a-zA-Z0-9]+", k) for k in config_map["data"]), "ConfigMap keys")
    for key, value in job_set["metadata"].get("labels", {}).items():
        check(LABEL_VALUE.fullmatch(value) and len(value) <= 63, f"label {key}={value}")
    for rjob in job_set["spec"]["replicatedJobs"]:
        job = rjob["template"]["spec"]
        pod = job["template"]["spec"]
        check(job["completionMode"] != "Indexed" or job["completions"] >= job["parallelism"], "Indexed job counts")
        for replica, index in itertools.product(range(rjob["replicas"]), range(job["completions"])):
            pod_name = f"{name}-{rjob['name']}-{replica}-{index}"  # JobSet's GenPodName
            check(DNS_LABEL.fullmatch(pod_name) and len(pod_name) <= 63, f"pod name {pod_name}")
        check(pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never")
        containers = {c["name"] for c in pod["containers"]}
        for rule in job["podFailurePolicy"]["rules"]:
            codes = rule.get("onExitCodes")
            if codes:
                check(codes["containerName"] in containers, "onExitCodes.containerName")
                check(codes["values"] == sorted(set(codes["values"])), "onExitCodes.values sorted, unique")
                check(codes["operator"] == "NotIn" or 0 not in codes["values"], "In with exit code 0")
        check(pod["dnsPolicy"] in ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"), "dnsPolicy")
        volumes = {v["name"] for v in pod["volumes"]}
        check(all(DNS_LABEL.fullmatch(v) for v in volumes | containers), "volume and container names")
        for container in pod["containers"]:
            check({m["name"] for m in container["volumeMounts"]} <= volumes, "volumeMounts name volumes")
            for env in container["env"]:
                check(ENV_NAME.fullmatch(env["name"]) and ("value" in env) != ("valueFrom" in env), env["name"])
            for port in container["ports"]:
                check(0 < port["containerPort"] < 65536 and port.get("hostPort", port["containerPort"])
                      == port["containerPort"], "hostNetwork ports")
    return problems


def _env(container):
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("accelerator, topology, slices, pods, chips_per_pod", SHAPES)
def test_jobsets_validate_and_their_pods_hold_the_slices_chips(tmp_path, capsys, accelerator, topology, slices,
                                                                 pods, chips_per_pod):
    plan = _plan_file(tmp_path)
    config_map, job_set = _job_set(capsys, plan, "--accelerator", accelerator, "--topology", topology,
                                   "--slices", str(slices), "--queue", "team-a", "--priority-class", "high")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _jobset_validator().iter_errors(job_set)]
    assert errors == [] and _kubernetes_problems(config_map, job_set) == []

    (rjob,) = job_set["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    chips = eval(topology.replace("x", "*"))
    assert rjob["replicas"] == slices and job["parallelism"] == job["completions"] == pods
    assert pods * container["resources"]["limits"]["google.com/tpu"] == chips and chips_per_pod * pods == chips
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    # xpk's conventions
    assert pod["hostNetwork"] and pod["dnsPolicy"] == "ClusterFirstWithHostNet" and pod["priorityClassName"] == "high"
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert job_set["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}

    # the coordinator is pod 0 of slice 0 by JobSet's naming: NAME-REPLICATEDJOB-JOBINDEX-PODINDEX.SUBDOMAIN
    env = _env(container)
    pod0 = f"{job_set['metadata']['name']}-{rjob['name']}-0-0.{job_set['spec']['network']['subdomain']}"
    assert env["LWM_COORDINATOR"] == f"{pod0}:{gke.COORDINATOR_PORT}"
    assert env["LWM_NUM_PROCESSES"] == str(slices * pods)
    if slices > 1:
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == pod0 and env["MEGASCALE_NUM_SLICES"] == str(slices)
    else:
        assert "MEGASCALE_NUM_SLICES" not in env
    # every pod gets its own process id, 0 .. slices x pods - 1, from the two indices Kubernetes gives it
    setup = container["command"][-1].split(" && exec ")[0]
    corners = {(s, p) for s in range(slices) for p in {0, 1 % pods, pods - 1}}
    ids = {(s, p): int(subprocess.run(["bash", "-c", setup + ' && echo "$LWM_PROCESS_ID"'], text=True, check=True,
                                      capture_output=True, env={"LWM_SLICE_ID": str(s), "LWM_HOST_IN_SLICE": str(p)}
                                      ).stdout) for s, p in corners}
    assert all(ids[s, p] == s * pods + p for s, p in corners)


def test_jobset_restarts_on_preemption_only_and_says_which_exit_codes_are_final(tmp_path, capsys):
    _, job_set = _job_set(capsys, _plan_file(tmp_path), "--accelerator", "tpu-v5p-slice", "--topology", "2x2x2",
                          "--max-restarts", "5")
    policy = job_set["spec"]["failurePolicy"]
    assert policy == {"maxRestarts": 5, "rules": [{"name": "finalExitStatus", "action": "FailJobSet",
                                         "onJobFailureReasons": ["PodFailurePolicy"]}]}
    rules = job_set["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["operator"] == "NotIn"
    assert rules[1]["onExitCodes"]["values"] == [137, local.PREEMPTED]  # all others (1, 2, 3 gate, 4 NaN) are final


@pytest.mark.parametrize("flags, message", [
    (["--accelerator", "v4-32", "--topology", "2x2x4"], "--accelerator v4-32 is a Cloud TPU type, not a GKE node "
     "label: use --accelerator tpu-v4-podslice and a --topology of 16 chips"),
    (["--accelerator", "v5e-16", "--topology", "4x4"], "use --accelerator tpu-v5-lite-podslice and a --topology of "
     "16 chips"),
    (["--accelerator", "nvidia-h100", "--topology", "2x2"], "'nvidia-h100' is not a GKE TPU accelerator label; use "
     "one of tpu-v4-podslice, tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "4x4"], "--topology '4x4' is not a tpu-v4-podslice "
     "topology: give AxBxC"),
    (["--accelerator", "tpu-v6e-slice", "--topology", "1x2"], "--topology 1x2 has 2 chips, which do not fill hosts"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "2x2x4", "--hosts", "16"], "--hosts 16: a 2x2x4 slice of "
     "tpu-v4-podslice has 4 host(s) of 4 chips; leave --hosts out for gke"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "2x2x4", "--slices", "0"], "slices must be >= 1"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "2xbx4"], "--topology '2xbx4' is not AxB or AxBxC"),
])
def test_bad_gke_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    code, out, err = _run(capsys, "stages", "run", _plan_file(tmp_path), "--backend", "gke", "--image", "i", *flags,
                          "--dry-run")
    assert code == 2 and err.startswith("lwm: error: ") and message in err and err.count("\n") == 1


def test_two_slices_need_a_mesh_whose_dcn_part_spans_them(tmp_path, capsys):
    plan = _plan_file(tmp_path, mesh={"dp": -1, "fsdp": 1, "sp": 1, "tp": 1, "dcn": {"dp": 4}})
    code, _, err = _run(capsys, "stages", "run", plan, "--backend", "gke", "--image", "i", "--accelerator",
                        "tpu-v5-lite-podslice", "--topology", "4x4", "--slices", "2", "--dry-run")
    assert code == 2 and "stages[a] on 2 slices: mesh.dcn" in err and "spans 4 hosts, but the job has 2" in err


# --------------------------------------------------------------------------------------------- slurm

def _slurm_options():
    lines = (TESTS / "slurm_options.txt").read_text().splitlines()
    return {tuple(line.split()) for line in lines if line and not line.startswith("#")}


def _sbatch(tmp_path, capsys, *flags):
    code, out, err = _run(capsys, "stages", "run", _plan_file(tmp_path), "--backend", "slurm", *flags, "--dry-run")
    assert code == 0, err
    return "".join(out.splitlines(keepends=True)[1:-1])


def test_sbatch_script_uses_only_real_sbatch_srun_and_scancel_options(tmp_path, capsys):
    script = _sbatch(tmp_path, capsys, "--hosts", "2", "--partition", "gpu", "--account", "lwm")
    real = _slurm_options()
    used = {("sbatch", line.split()[1].split("=")[0]) for line in script.splitlines() if line.startswith("#SBATCH")}
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    used |= {("srun", a.split("=")[0]) for a in srun[1:srun.index("lwm")] if a.startswith("--")}
    used |= {("scancel", o.split("=")[0]) for o in re.findall(r"scancel (--[a-z-]+=?)", script)}
    assert used - real == set() and len(used) > 12
    assert {("sbatch", "--requeue"), ("sbatch", "--exclusive"), ("sbatch", "--signal")} <= used
    assert "#SBATCH --signal=B:USR1@300" in script  # the batch shell only (sbatch(1): "B:")


def _srun_environments(script, nodes):
    """The variables srun gives each task of the script's step (SLURM's names, as JAX's tests set them)."""
    directives = dict(line.split()[1].lstrip("-").split("=", 1) if "=" in line else (line.split()[1].lstrip("-"), "")
                      for line in script.splitlines() if line.startswith("#SBATCH"))
    per_node, gpus = int(directives["ntasks-per-node"]), int(directives["gpus-per-node"])
    # without --gpus-per-task or --gpu-bind, every task of a node sees all of the node's GPUs
    assert "gpus-per-task" not in directives and "gpu-bind" not in directives
    visible = ",".join(map(str, range(gpus)))
    for node, local_id in itertools.product(range(nodes), range(per_node)):
        yield node, {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": f"gpu[001-{nodes:03d}]",
                     "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": str(node * per_node + local_id),
                     "SLURM_LOCALID": str(local_id), "SLURM_STEP_NUM_NODES": str(nodes),
                     "CUDA_VISIBLE_DEVICES": visible}


def _gpus_jax_uses(script, nodes, monkeypatch):
    """(node, GPU) pairs the processes use, by JAX's own SLURM detection in each task's environment."""
    from jax._src import clusters

    used, processes = set(), set()
    for node, env in _srun_environments(script, nodes):
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            assert clusters.SlurmCluster.is_env_present()
            _, count, process_id, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, None, None)
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        used |= {(node, visible[i]) for i in (local_ids if local_ids is not None else range(len(visible)))}
        processes.add((process_id, count))
    assert {p for p, _ in processes} == set(range(len(processes))) and {c for _, c in processes} == {len(processes)}
    return used


def test_srun_tasks_together_give_jax_every_gpu_the_plan_was_checked_against(tmp_path, capsys, monkeypatch):
    script = _sbatch(tmp_path, capsys, "--hosts", "2", "--gpus-per-node", "8")
    checked = int(re.search(r"--devices (\d+)", script)[1])
    assert len(_gpus_jax_uses(script, 2, monkeypatch)) == checked == 16
    # one task per node (the old script) would give JAX GPU 0 of each node: 2 of the 16
    old = script.replace("--ntasks-per-node=8", "--ntasks-per-node=1")
    assert len(_gpus_jax_uses(old, 2, monkeypatch)) == 2


def _tool(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_slurm(tmp_path, task_exit=None):
    """srun starting one task that saves and exits 143 on SIGTERM; scancel signalling it; scontrol recorded."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls"
    task = f"exit {task_exit}" if task_exit is not None else (
        f"trap 'echo task saved >> {calls}; exit 143' TERM\necho $$ > {tmp_path}/task.pid\n"
        "while :; do sleep 0.05; done")
    _tool(tools, "srun", f'echo "srun $*" >> {calls}\n{task}\n')
    _tool(tools, "scancel", f'echo "scancel $*" >> {calls}\nkill -TERM "$(cat {tmp_path}/task.pid)"\n')
    _tool(tools, "scontrol", f'echo "scontrol $*" >> {calls}\n')
    return tools, calls


def _start_batch(tmp_path, capsys, tools):
    script = tmp_path / "job.sbatch"
    script.write_text(_sbatch(tmp_path, capsys, "--hosts", "2"))
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)


def _when_task_runs(tmp_path, batch):
    deadline = time.time() + 30
    while not (tmp_path / "task.pid").exists():
        assert batch.poll() is None and time.time() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("signum, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_batch_shell_stops_the_stages_with_sigterm_and_requeues_before_the_time_limit(tmp_path, capsys, signum,
                                                                                       requeued):
    tools, calls = _fake_slurm(tmp_path)
    batch = _start_batch(tmp_path, capsys, tools)
    _when_task_runs(tmp_path, batch)
    batch.send_signal(signum)  # USR1: sbatch's --signal=B:USR1@300; TERM: scancel or a preemption
    out, _ = batch.communicate(timeout=30)
    assert batch.returncode == local.PREEMPTED
    log = calls.read_text().splitlines()
    assert "scancel --signal=TERM 42" in log and "task saved" in log  # SIGTERM to the tasks, not through srun
    assert ("scontrol requeue 42" in log) == requeued
    assert ("requeues itself" in out) == requeued


def test_a_failed_stage_ends_the_job_without_a_requeue(tmp_path, capsys):
    tools, calls = _fake_slurm(tmp_path, task_exit=local.NON_FINITE)
    batch = _start_batch(tmp_path, capsys, tools)
    batch.communicate(timeout=30)
    assert batch.returncode == local.NON_FINITE
    assert not any(c.startswith(("scontrol", "scancel")) for c in calls.read_text().splitlines())


# -------------------------------------------------------------------------------------------- tpu-vm

def _fake_tpu_vm(tmp_path):
    """gcloud with a local bucket folder, and an ssh that runs the command in a session of its own on this
    machine and keeps it open (an interactive connection) until killed; python3.12 whose venv has a fake lwm."""
    tools, bucket = tmp_path / "bin", tmp_path / "bucket"
    tools.mkdir()
    bucket.mkdir()
    _tool(tools, "gcloud", f"""echo "gcloud $*" >> {tmp_path}/calls
if [ "$1 $2" = "storage cp" ]; then
  shift 2; files=(); for a in "$@"; do files+=("${{a/gs:\\/\\/my-bucket/{bucket}}}"); done
  target="${{files[-1]}}"; unset 'files[-1]'; mkdir -p "$target"; cp "${{files[@]}}" "$target"
else
  setsid bash -c "${{@: -1}}; exec sleep 600" &
  echo $! > {tmp_path}/session
  wait
fi
""")
    _tool(tools, "python3.12", """if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\\necho "pip $*"\\n' > "$3/bin/python"
  printf '#!/bin/bash\\necho "lwm $* started"\\n' > "$3/bin/lwm"
  printf 'while [ ! -e "$FINISH" ]; do sleep 0.05; done\\necho "lwm finished"\\n' >> "$3/bin/lwm"
  chmod +x "$3/bin/python" "$3/bin/lwm"
fi
""")
    return tools, bucket


def test_tpu_vm_launch_survives_its_ssh_client_being_killed(tmp_path, capsys, monkeypatch):
    tools, bucket = _fake_tpu_vm(tmp_path)
    monkeypatch.setattr(tpu_vm, "REMOTE_DIR", str(tmp_path / "worker"))
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FINISH", str(tmp_path / "finish"))
    monkeypatch.chdir(tmp_path)
    plan = plan_lib.load(_plan_file(tmp_path))
    launch = plan_lib.LaunchConfig(backend="tpu-vm", tpu="pod", zone="z", project="p", bucket="gs://my-bucket")
    os.makedirs("dist")
    (tmp_path / "dist" / tpu_vm.wheel_name()).write_text("wheel")
    (tmp_path / "dist" / "lwm-cluster.worker.sh").write_text(tpu_vm.worker_script(plan, launch, ["--devices", "8"]))
    _, upload, ssh = tpu_vm.commands(plan, launch, ["--devices", "8"])
    assert remote.execute([upload], dry_run=False) == 0
    client = subprocess.Popen(ssh, stdout=subprocess.PIPE, text=True)
    log = tmp_path / "worker" / "lwm-cluster" / f"worker-{os.uname().nodename}.log"
    deadline = time.time() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, "the worker did not start"
        time.sleep(0.05)

    # the connection drops: the client dies, and sshd hangs up the session's processes
    client.kill()
    client.wait()
    os.killpg(int((tmp_path / "session").read_text()), signal.SIGHUP)
    time.sleep(0.3)
    assert "lwm finished" not in log.read_text()

    # started again while it runs: left alone
    again = subprocess.run(["bash", "-c", ssh[-1]], capture_output=True, text=True, timeout=30)
    (tmp_path / "finish").touch()
    deadline = time.time() + 30
    copied = bucket / "lwm-stages" / "lwm-cluster" / "logs" / log.name
    while "exited" not in (copied.read_text() if copied.exists() else ""):
        assert time.time() < deadline, "the detached run did not finish"
        time.sleep(0.05)
    text = copied.read_text()
    assert "lwm stages run" in text and "lwm finished" in text and "lwm stages exited 0" in text
    assert text.count("lwm stages run") == 1 and "already running" in again.stdout


def test_tpu_vm_dry_run_says_how_to_reattach(tmp_path, capsys):
    code, out, _ = _run(capsys, "stages", "run", _plan_file(tmp_path), "--backend", "tpu-vm", "--tpu", "pod",
                        "--zone", "z", "--project", "p", "--bucket", "gs://b", "--topology", "2x2x2", "--dry-run")
    assert code == 0
    assert "--worker=0 --command 'tail -n 50 -F /tmp/lwm-stages/lwm-cluster/worker-*.log'" in out
    assert "gcloud storage ls gs://b/lwm-stages/lwm-cluster/logs/" in out
    assert "sys.version_info < (3, 11)" in out and "apt-get install -y -qq python3.11" in out


# ------------------------------------------------------------------------ checkpoints and exit codes

@pytest.fixture
def fake_store(tmp_path, monkeypatch):
    from tests.fake_remote_fs import FakeRemoteFileSystem

    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(root))
    return root


def _stage_plan(tmp_path, run_root):
    data = write_dataset(tmp_path / "seq64", list(range(1, 17)))
    mapping = {"run_root": run_root, "defaults": {"model": {"preset": "tiny"}, "data": {"batch_size": 2}},
               "stages": [{"name": "a", "steps": 4, "data": {"seq_len": 64, "datasets": [{"path": str(data)}]}}]}
    return plan_lib.parse(mapping, "plan.yaml")


def _child(code, touch=None):
    """A stand-in for the stage's `lwm train`: optionally commits a step (a marker file), then exits ``code``."""
    script = f"import pathlib, sys; p = {str(touch)!r}; (p != 'None') and (pathlib.Path(p).parent.mkdir(" \
             f"parents=True, exist_ok=True), pathlib.Path(p).touch()); sys.exit({code})"
    return lambda config_path, processes: [sys.executable, "-c", script]


def test_a_final_checkpoint_without_commit_marker_is_interrupted_and_resumed(tmp_path, fake_store, capsys,
                                                                             monkeypatch):
    plan = _stage_plan(tmp_path, "fakegcs://runs")
    marker = "commit_success.txt"  # orbax's COMMIT_SUCCESS_FILE
    for step, committed in ((2, True), (4, False)):  # the final save was cut off before its marker
        folder = fake_store / "runs" / "a" / "checkpoints" / str(step) / "params"
        folder.mkdir(parents=True)
        (folder / "data").write_bytes(b"x")
        if committed:
            (folder.parent / marker).write_text("")
    row = status.stage_status(plan.stage("a"))
    assert (row.state, row.step, row.checkpoint) == ("interrupted", 2, "fakegcs://runs/a/checkpoints/2")

    monkeypatch.setattr(local, "train_argv", _child(0, fake_store / "runs" / "a" / "checkpoints" / "4" / marker))
    assert runner.run_plan(plan, evaluator=None) == 0
    out = capsys.readouterr().out
    assert "stage a: interrupted at step 2/4; resuming" in out and "ran 1" in out
    assert status.stage_status(plan.stage("a")).state == "finished"


def test_a_failed_gate_and_a_non_finite_loss_stop_the_plan_with_distinct_codes(tmp_path, capsys, monkeypatch):
    assert len({0, 1, 2, runner.STOPPED_BY_GATE, local.NON_FINITE, local.PREEMPTED}) == 6
    plan = _stage_plan(tmp_path, str(tmp_path / "runs"))
    monkeypatch.setattr(local, "train_argv", _child(local.NON_FINITE))
    assert runner.run_plan(plan, evaluator=None) == local.NON_FINITE
    assert "stage a: its loss became non-finite (exit 4); the plan stops" in capsys.readouterr().out


def test_a_rerun_on_a_finished_run_with_a_damaged_final_checkpoint_trains_its_last_steps_again(tmp_path, capsys,
                                                                                               monkeypatch):
    data = write_dataset(tmp_path / "seq64", list(range(1, 33)))
    run_dir = tmp_path / "run"
    argv = ["train", "configs/train_tiny.yaml"] + [a for s in (
        f"run_dir={run_dir}", f"data.datasets=[{{path: '{data}'}}]", "data.seq_len=64", "data.batch_size=8",
        "model.max_position_embeddings=64", "steps=4", "optimizer.warmup_steps=1", "checkpoint.save_every=2",
        "checkpoint.async_save=false",
        "log.every=1", "log.tensorboard=false", "mesh={dp: 1, fsdp: -1, sp: 1, tp: 1}") for a in ("--set", s)]
    monkeypatch.chdir(TESTS.parent)
    assert cli.main(argv) == 0
    ckpt_dir = run_dir / "checkpoints"
    params = [p for p in (ckpt_dir / "4" / "params").rglob("*") if p.is_file()]
    os.truncate(max(params, key=os.path.getsize), 10)  # the final checkpoint: complete by name, damaged
    capsys.readouterr()

    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"checkpoint 4 in {ckpt_dir} cannot be restored" in out and "resumed from checkpoint 2" in out
    assert "finished 4 steps" in out and "nothing to do" not in out
    assert cli.main(argv) == 0  # now the final checkpoint restores: finished
    assert "is complete: checkpoint 4 of 4 steps, nothing to do" in capsys.readouterr().out


def test_metrics_and_events_on_an_object_store_are_not_uploaded_at_every_log_line(fake_store, monkeypatch):
    from schemas import storage
    from trainer import run_files

    uploads = []
    real_upload = storage.upload
    monkeypatch.setattr(storage, "upload", lambda local, dest: (uploads.append(dest), real_upload(local, dest)))
    now = [0.0]
    metrics = run_files.SyncedFile("fakegcs://run/metrics.jsonl", every_s=60, clock=lambda: now[0])
    events = run_files.SyncedDir("fakegcs://run/tensorboard", every_s=60, clock=lambda: now[0])
    with open(os.path.join(events.local, "static"), "w") as f:
        f.write("written once")
    for step in range(1, 101):  # 100 log lines over 99 seconds
        metrics.write(f'{{"step": {step}}}\n')
        metrics.sync()
        with open(os.path.join(events.local, "events.out"), "a") as f:
            f.write(f"{step}\n")
        events.sync()
        now[0] += 1.0
    assert uploads.count("fakegcs://run/metrics.jsonl") == 2 and uploads.count("fakegcs://run/tensorboard/static") == 1
    metrics.close()
    events.close()
    assert (fake_store / "run" / "metrics.jsonl").read_text().count("\n") == 100  # all of it once closed
    assert (fake_store / "run" / "tensorboard" / "events.out").read_text().count("\n") == 100
    assert uploads.count("fakegcs://run/tensorboard/static") == 1  # changed files only


def test_start_up_lists_each_dataset_once_and_reads_no_shard(tmp_path, fake_store, monkeypatch):
    from schemas import manifest as manifest_lib
    from schemas import storage
    from trainer.config import DataConfig, DatasetConfig
    from trainer.training import loader

    import shutil
    shutil.copytree(write_dataset(tmp_path / "d", list(range(1, 41)), shard_sizes=(10, 10, 20)), fake_store / "d")
    opened, sized = [], []
    monkeypatch.setattr(manifest_lib, "file_sha256", lambda path: opened.append(path))
    real_size = storage.size
    monkeypatch.setattr(storage, "size", lambda path: (sized.append(path), real_size(path))[1])
    config = DataConfig(datasets=(DatasetConfig("fakegcs://d"),), seq_len=64, batch_size=4)
    assert loader.read_manifests(config)[0].records == 40
    assert opened == [] and sized == []  # sizes from one listing; hashes only with data.verify_hashes
    (fake_store / "d" / manifest_lib.shard_name("synthetic", 1, 3)).write_bytes(b"cut")
    with pytest.raises(ValueError, match=r"shard synthetic.array_record-00001-of-00003 has 3 bytes"):
        loader.read_manifests(config)


def test_the_dockerfile_installs_every_package_and_the_extras_the_gke_backend_needs():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(TESTS.parent / "setup.cfg")
    packages = {p.strip().rstrip("*") for p in setup["options.packages.find"]["include"].split() if p.strip()}
    dockerfile = (TESTS.parent / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    assert packages <= copied and "ARG EXTRAS=tpu,gcp" in dockerfile and 'pip install --no-cache-dir ".[${EXTRAS}]"' \
        in dockerfile and {"tpu", "gcp"} <= set(setup["options.extras_require"])
