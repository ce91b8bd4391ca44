"""Cluster backends: `lwm stages run --dry-run` output against golden files; JobSet and sbatch outputs parse.

Regenerate the golden files after an intended change with ``LWM_UPDATE_GOLDEN=1``.
"""

import contextlib
import io
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from orchestration import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
PLAN = "configs/stages/lwm_text.yaml"
BACKENDS = {
    "tpu-vm": ["--tpu", "lwm-v4-512", "--zone", "us-central2-b", "--project", "my-project",
               "--bucket", "gs://my-bucket"],
    "gke": ["--image", "us-docker.pkg.dev/my-project/lwm/lwm:0.1.0", "--from", "text-128k"],
    "slurm": ["--hosts", "32", "--gpus-per-node", "8", "--partition", "a100", "--account", "lwm",
              "--setup", "source $HOME/lwm/.venv/bin/activate"],
}


def _run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue().replace(sys.executable, "PYTHON").replace(str(REPO), "REPO")


def _dry_run(backend):
    code, out = _run("stages", "run", PLAN, "--backend", backend, *BACKENDS[backend], "--dry-run")
    assert code == 0
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dry_run_matches_golden_file(backend, monkeypatch):
    monkeypatch.chdir(REPO)
    out = _dry_run(backend)
    golden = GOLDEN / f"stages_{backend.replace('-', '_')}.txt"
    if os.environ.get("LWM_UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text()


def _body(out):
    """The printed file: everything between its '# NAME' line and the '$ command' line."""
    lines = out.splitlines(keepends=True)
    return "".join(lines[1:-1])


def test_jobset_manifest_parses_with_one_pod_per_host(monkeypatch):
    monkeypatch.chdir(REPO)
    config_map, job_set = yaml.safe_load_all(_body(_dry_run("gke")))
    assert yaml.safe_load(config_map["data"]["lwm_text.yaml"]) == yaml.safe_load(open(PLAN))
    job = job_set["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 64 and job["completionMode"] == "Indexed"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
                                   "cloud.google.com/gke-tpu-topology": "8x8x4"}
    container = pod["containers"][0]
    assert container["resources"]["limits"]["google.com/tpu"] == 4  # 256 chips over 64 hosts
    assert "&& exec lwm stages run /etc/lwm-stages/lwm_text.yaml --backend local" in container["command"][-1]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LWM_COORDINATOR"] == "lwm-text-slice-0-0.lwm-text:8476" and env["LWM_NUM_PROCESSES"] == "64"


def test_sbatch_script_is_valid_bash(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    script = tmp_path / "job.sbatch"
    script.write_text(_body(_dry_run("slurm")))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes=32" in text and "#SBATCH --ntasks-per-node=8" in text  # one task per GPU
    assert "srun --kill-on-bad-exit=1 lwm stages run configs/stages/lwm_text.yaml --backend local" in text


def test_tpu_vm_ssh_command_and_worker_script_are_valid_bash(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    out = _dry_run("tpu-vm")
    ssh = shlex.split(next(line for line in out.splitlines() if " tpu-vm ssh " in line)[2:])
    subprocess.run(["bash", "-n", "-c", ssh[-1]], check=True)
    assert "--worker=all" in ssh and "setsid nohup bash /tmp/lwm-stages/lwm-text/lwm-text.worker.sh" in ssh[-1]
    script = tmp_path / "worker.sh"
    script.write_text(out.split("\n", 1)[1].split("\n$ ")[0])
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert ("lwm\" stages run /tmp/lwm-stages/lwm-text/lwm_text.yaml --backend local --devices 256"
            in script.read_text())


def _fake_tool(directory, name):
    tool = directory / name
    tool.write_text(f'#!/bin/sh\necho "$0 $@" >> {directory}/calls\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_without_dry_run_the_file_is_written_and_submitted(monkeypatch, tmp_path):
    for tool in ("sbatch", "kubectl"):
        _fake_tool(tmp_path, tool)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    plan = str(REPO / PLAN)
    assert _run("stages", "run", plan, "--backend", "slurm", "--hosts", "32")[0] == 0
    assert _run("stages", "run", plan, "--backend", "gke", "--image", "img:1")[0] == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"{tmp_path}/sbatch lwm-text.sbatch", f"{tmp_path}/kubectl apply -f lwm-text.jobset.yaml"]
    subprocess.run(["bash", "-n", "lwm-text.sbatch"], check=True)
    assert len(list(yaml.safe_load_all(open("lwm-text.jobset.yaml")))) == 2


def test_cluster_backends_say_which_settings_are_missing(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"backend tpu-vm needs --tpu, --zone, --project, --bucket"):
        _raise(PLAN, "tpu-vm")
    with pytest.raises(ValueError, match=r"backend gke needs --image"):
        _raise(PLAN, "gke")
    with pytest.raises(ValueError, match=r"give --topology \(TPU\) or --devices"):
        _raise("configs/stages/demo.yaml", "gke", "--image", "i")


def _raise(plan, backend, *flags):
    """Calls the command function directly, so its ValueError is not turned into exit status 2."""
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(["stages", "run", plan, "--backend", backend, "--dry-run", *flags])
    args.func(args, extra)
