"""Several processes as one job: environment join, the mesh over hosts, the loader, the launcher.

Real multi-process runs use ``orchestration.launch.run_processes`` on this machine:
N processes × D/N simulated CPU devices, gloo collectives, a coordinator on 127.0.0.1.
The fast cases run the loader alone (``tests/multihost_loader_job.py``); whole training
runs are ``slow`` (``tests/test_multihost_training.py``).
"""

import io
import json
import os
import sys
import types

import jax
import numpy as np
import pytest

from orchestration import launch
from trainer import config as config_lib
from trainer import distributed
from trainer.training.loader import BATCH_KEYS, Loader
from trainer.sharding import DcnConfig, MeshConfig, dcn_shape, device_grid, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_devices(hosts, per_host, slices=False):
    return [types.SimpleNamespace(id=i, process_index=i // per_host, platform="cpu", device_kind="cpu",
                                  slice_index=i // per_host if slices else None)
            for i in range(hosts * per_host)]


def _ids(grid):
    return np.vectorize(lambda d: d.id)(grid)


@pytest.mark.parametrize("slices", [False, True])
def test_dcn_dp_2_by_ici_sp_4_puts_each_hosts_devices_on_one_sp_ring(slices):
    grid = device_grid(MeshConfig(dp=2, fsdp=1, sp=4, tp=1), _fake_devices(2, 4, slices))
    assert grid.shape == (2, 1, 4, 1)
    assert _ids(grid[0, 0, :, 0]).tolist() == [0, 1, 2, 3]
    assert _ids(grid[1, 0, :, 0]).tolist() == [4, 5, 6, 7]


def test_hosts_go_to_dp_then_fsdp_unless_dcn_says_otherwise():
    assert dcn_shape(MeshConfig(dp=1, fsdp=2, sp=4), (1, 2, 4, 1), 2) == (1, 2, 1, 1)
    assert dcn_shape(MeshConfig(dp=2, fsdp=4), (2, 4, 1, 1), 4) == (2, 2, 1, 1)
    assert dcn_shape(MeshConfig(dp=1, fsdp=2, sp=4), (1, 2, 4, 1), 1) == (1, 1, 1, 1)
    ring_across = MeshConfig(dp=1, fsdp=2, sp=4, dcn=DcnConfig(fsdp=2, sp=2))
    assert dcn_shape(ring_across, (1, 2, 4, 1), 4) == (1, 2, 2, 1)
    grid = device_grid(ring_across, _fake_devices(4, 2))
    assert _ids(grid[0, 0, :, 0]).tolist() == [0, 1, 2, 3]  # the ring crosses hosts 0 and 1


@pytest.mark.parametrize("mesh, hosts, message", [
    (MeshConfig(dp=1, fsdp=1, sp=8), 2, r"dp \* fsdp = 1 .* cannot be split over 2 hosts"),
    (MeshConfig(dp=1, fsdp=2, sp=4, dcn=DcnConfig(tp=2)), 2, "mesh.dcn.tp = 2 does not divide mesh axis tp = 1"),
    (MeshConfig(dp=1, fsdp=2, sp=4, dcn=DcnConfig(fsdp=2)), 1, "spans 2 hosts, but the job has 1"),
])
def test_a_mesh_that_does_not_fit_the_hosts_is_refused_naming_the_axis(mesh, hosts, message):
    with pytest.raises(ValueError, match=message):
        dcn_shape(mesh, mesh.resolve(8), hosts)


def test_one_process_mesh_is_unchanged():
    mesh = make_mesh(MeshConfig(dp=1, fsdp=2, sp=4, tp=1))
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 2, "sp": 4, "tp": 1}
    assert [d.id for d in mesh.devices.ravel()] == list(range(8))


def test_explicit_variables_join_and_partial_ones_are_refused():
    env = {"LWM_COORDINATOR": "10.0.0.1:1234", "LWM_NUM_PROCESSES": "4", "LWM_PROCESS_ID": "3"}
    assert distributed.multihost_environment(env) == distributed.Join("explicit", "10.0.0.1:1234", 4, 3)
    assert distributed.explicit_join({}) is None
    with pytest.raises(ValueError, match="LWM_PROCESS_ID not"):
        distributed.explicit_join({k: v for k, v in env.items() if k != "LWM_PROCESS_ID"})
    with pytest.raises(ValueError, match=r"LWM_PROCESS_ID='4' is not an integer in \[0, 4\)"):
        distributed.explicit_join({**env, "LWM_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        distributed.explicit_join({**env, "LWM_COORDINATOR": "10.0.0.1"})


def test_slurm_job_is_detected_by_jax(monkeypatch):
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.multihost_environment({}) == distributed.Join("SlurmCluster")


def test_launcher_refuses_a_mesh_that_does_not_split_over_the_processes():
    with pytest.raises(ValueError, match="needs 8 devices, which do not split over 3 processes"):
        launch.launch(os.path.join(ROOT, "configs/train_tiny.yaml"), [], 3)
    with pytest.raises(ValueError, match="cannot be split over 4 hosts"):
        launch.launch(os.path.join(ROOT, "configs/train_tiny.yaml"), [], 4)


def _sets(books_dataset):
    return [f"data.datasets=[{{path: '{books_dataset}'}}]", "data.seq_len=512", "data.batch_size=4"]


def _loader_job(tmp_path, name, processes, batches, sets, restore=None, save=None):
    """Runs the loader job as ``processes`` processes; returns its gathered global batches."""
    out = tmp_path / f"{name}.npz"
    command = [sys.executable, os.path.join(ROOT, "tests", "multihost_loader_job.py"), str(out), str(batches)]
    command += ["--restore", str(restore)] * bool(restore) + ["--save", str(save)] * bool(save)
    for s in sets:
        command += ["--set", s]
    err = io.StringIO()
    env = {**os.environ, "PYTHONPATH": ROOT}
    code = launch.run_processes(command, processes, 8 // processes, str(tmp_path / name), env=env,
                                stdout=io.StringIO(), stderr=err)
    assert code == 0, err.getvalue()
    with np.load(out) as saved:
        return {k: saved[k] for k in BATCH_KEYS}


def test_global_batches_do_not_depend_on_the_process_count_even_across_a_resume(books_dataset, tmp_path):
    sets = _sets(books_dataset)
    config = config_lib.load(os.path.join(ROOT, "configs/train_tiny.yaml"), sets)
    loader = Loader(config.data, make_mesh(config.mesh))
    expected = [{k: np.asarray(v) for k, v in next(loader).items()} for _ in range(10)]
    loader.close()
    one = _loader_job(tmp_path, "one", 1, 4, sets, save=tmp_path / "at4")
    two = _loader_job(tmp_path, "two", 2, 3, sets, restore=tmp_path / "at4", save=tmp_path / "at7")
    saved = sorted(f for f in os.listdir(tmp_path / "at7" / "7" / "data_iter") if f.startswith("process_"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    back = _loader_job(tmp_path, "back", 1, 3, sets, restore=tmp_path / "at7")
    for key in BATCH_KEYS:
        together = np.concatenate([one[key], two[key], back[key]])
        assert together.tobytes() == np.stack([e[key] for e in expected]).tobytes(), key
    assert os.path.getsize(tmp_path / "two" / "process-1.log") > 0


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """The fake object store of ``tests/fake_remote_fs.py`` (``fakegcs://``), rooted in a temporary folder."""
    from tests.fake_remote_fs import FakeRemoteFileSystem

    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(tmp_path / "bucket"))
    return tmp_path / "bucket"


def test_metrics_config_and_tensorboard_go_to_a_remote_run_dir_and_continue_on_resume(remote):
    from trainer.training.loop import MetricsLog

    config = config_lib.load(os.path.join(ROOT, "configs/train_tiny.yaml"), ["run_dir=fakegcs://runs/tiny"])
    assert config_lib.write_resolved(config) == "fakegcs://runs/tiny/config.yaml"
    assert config_lib.load(str(remote / "runs/tiny/config.yaml")) == config
    metrics = {"loss": 2.0, "text_loss": 2.0, "vision_loss": 0.0, "learning_rate": 1e-3, "grad_norm": 1.0,
               "tokens_per_s": 10.0, "elapsed_s": 1.0, "eta_s": 1.0}
    for step in (1, 2):  # a run, then its resumed continuation
        log = MetricsLog(config.run_dir, enabled=True, tensorboard=True)
        log.write(step, 2, metrics)
        log.close()
    with open(remote / "runs/tiny/metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(remote / "runs/tiny/tensorboard"))


def test_vqgan_saves_to_and_loads_from_remote_storage(remote):
    from pipelines.tokens.vqgan import SMALL, VQGAN

    saved = VQGAN.init_random(SMALL, seed=0)
    saved.save("fakegcs://models/vq")
    assert sorted(os.listdir(remote / "models/vq")) == ["config.json", "params.safetensors"]
    loaded = VQGAN.load("fakegcs://models/vq")
    assert loaded.config == saved.config
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(saved.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_saved_position_moves_to_zero_prefetch_workers_and_is_refused_for_another_worker_count(
        books_dataset, tmp_path):
    import dataclasses

    import orbax.checkpoint as ocp

    from trainer.training.data_position import DataPositionError, DataPositionRestore, DataPositionSave

    config = config_lib.load(os.path.join(ROOT, "configs/train_tiny.yaml"), _sets(books_dataset))
    mesh = make_mesh(config.mesh)
    with_workers = dataclasses.replace(config.data, worker_count=2)
    saving = Loader(with_workers, mesh)
    for _ in range(3):
        next(saving)
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",), options=options) as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=DataPositionSave(saving.iterator)))
        mngr.wait_until_finished()
        expected = np.asarray(next(saving)["tokens"])
        saving.close()
        in_process = Loader(config.data, mesh)
        mngr.restore(3, args=ocp.args.Composite(data_iter=DataPositionRestore(in_process.iterator, 3)))
        assert np.asarray(next(in_process)["tokens"]).tobytes() == expected.tobytes()
        other = Loader(dataclasses.replace(config.data, worker_count=3), mesh)
        with pytest.raises(DataPositionError, match="saved with another data.worker_count"):
            mngr.restore(3, args=ocp.args.Composite(data_iter=DataPositionRestore(other.iterator, 3)))
        other.close()


def _python_job(tmp_path, code, processes=2):
    """Runs ``python -c code`` as a launcher job; returns (exit status, launcher stdout, launcher stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = launch.run_processes([sys.executable, "-c", code], processes, 1, str(tmp_path / "logs"),
                                  stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


PEER = ("import os, signal, sys, time\n"
        "i = int(os.environ['LWM_PROCESS_ID'])\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "print(f'process {i} of', os.environ['LWM_NUM_PROCESSES'], 'at', os.environ['LWM_COORDINATOR'], flush=True)\n")


def test_when_one_process_fails_the_launcher_stops_the_others_and_names_it(tmp_path):
    code = PEER + ("print(os.getpid(), flush=True)\n"
                   "if i == 1:\n    print('the last words', flush=True)\n    sys.exit(3)\n"
                   "time.sleep(600)\n")
    status, out, err = _python_job(tmp_path, code)
    assert status == 3
    assert "process 1 of 2 exited with code 3; stopped the other processes" in err and "    the last words" in err
    assert "process 0 of 2 at 127.0.0.1:" in out  # process 0's output is streamed
    for i in range(2):
        log = (tmp_path / "logs" / f"process-{i}.log").read_text().splitlines()
        assert log[0].startswith(f"process {i} of 2")
        assert not os.path.exists(f"/proc/{log[1]}")  # nothing of the job is left running


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    import signal
    import threading

    code = PEER + "time.sleep(600)\n"
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    status, _, err = _python_job(tmp_path, code)
    assert status == 143, err
