"""`lwm train` end to end on books shards: loss falls, exact resume, SIGTERM, NaN, config and logs.

Runs are subprocesses of `lwm train configs/train_tiny.yaml` on the seq-512 books
fixture (tiny text model, fsdp 2 x sp 4 ring attention, batch 2), sharing a
persistent compilation cache so only the first one compiles.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pipelines.dataset import write_shard
from schemas import manifest, packed
from trainer import checkpoint, config as config_lib, train as train_lib

STEPS = 24


def _sets(run_dir, *datasets):
    listed = ", ".join(f"{{path: '{path}', weight: {weight}}}" for path, weight in datasets)
    return [f"run_dir={run_dir}", f"data.datasets=[{listed}]", "data.seq_len=512", "data.batch_size=2",
            f"steps={STEPS}", "optimizer.schedule=warmup_constant", "optimizer.warmup_steps=2",
            "optimizer.learning_rate=3e-3", "checkpoint.save_every=4", "checkpoint.keep=3", "log.every=1"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(sets, env):
    command = [sys.executable, "-m", "orchestration.cli", "train", "configs/train_tiny.yaml"]
    for s in sets:
        command += ["--set", s]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _signal_after_checkpoint(process, ckpt_dir, step, signum):
    """Sends ``signum`` once checkpoint ``step`` is complete; asserts the run was still going."""
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(ckpt_dir, str(step))):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signum)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(books_dataset, cache_env, tmp_path_factory):
    """An uninterrupted run: its directory and loss per step."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, out, err = _finish(_start(_sets(run_dir, (books_dataset, 1.0)), cache_env))
    assert code == 0, err
    return run_dir, {m["step"]: m["loss"] for m in _metrics(run_dir)}, out


def test_tiny_model_loss_falls_on_books_shards(reference):
    _, losses, out = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < losses[1] - 0.5
    assert f"step {STEPS}/{STEPS} | loss" in out and "tokens/s" in out


def test_run_writes_config_logs_and_checkpoints_readable_by_inference(reference):
    run_dir, _, _ = reference
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resolved = config_lib.load(os.path.join(run_dir, config_lib.CONFIG_NAME))
    assert resolved.steps == STEPS and resolved.model.d_model == 64 and resolved.mesh.sp == 4
    assert checkpoint.restore_train_config(ckpt_dir) == resolved.to_dict()
    assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [16, 20, 24]  # keep 3
    params, model_config = checkpoint.restore_params(ckpt_dir)
    assert model_config == resolved.model
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))


def test_sigkill_then_sigterm_then_resume_gives_bitwise_equal_losses(reference, books_dataset, cache_env, tmp_path):
    _, expected, _ = reference
    run_dir = tmp_path / "run"
    ckpt_dir = str(run_dir / "checkpoints")
    sets = _sets(run_dir, (books_dataset, 1.0))

    killed = _start(sets, cache_env)
    _signal_after_checkpoint(killed, ckpt_dir, 8, signal.SIGKILL)
    _finish(killed)

    terminated = _start(sets, cache_env)
    _signal_after_checkpoint(terminated, ckpt_dir, 16, signal.SIGTERM)
    code, out, err = _finish(terminated)
    assert code == 143, err
    assert "resumed from checkpoint" in out
    saved = checkpoint.latest_step(ckpt_dir)
    assert f"SIGTERM: saved checkpoint {saved}" in out and 16 <= saved < STEPS
    assert _metrics(run_dir)[-1]["step"] == saved

    code, out, err = _finish(_start(sets, cache_env))
    assert code == 0, err
    assert f"resumed from checkpoint {saved}" in out
    logged = _metrics(run_dir)
    assert {m["step"] for m in logged} == set(range(1, STEPS + 1))
    for m in logged:  # every step, including those computed twice around the kill, as uninterrupted
        assert m["loss"] == expected[m["step"]], m["step"]


def _nan_dataset(directory, count=8):
    """Records of the books vocabulary whose loss weights are NaN."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for _ in range(count):
        example = packed.from_segments([{"tokens": rng.integers(3, 500, 512), "vision_mask": np.zeros(512, bool),
                                         "loss_weights": np.full(512, np.nan, np.float32)}], 512)
        records.append(packed.encode(**example))
    shard = write_shard(str(directory / manifest.shard_name("nan", 0, 1)), records)
    return directory, shard


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(books_dataset, cache_env, tmp_path):
    nan_dir, shard = _nan_dataset(tmp_path / "nan")
    good = manifest.read(str(books_dataset), verify_hashes=False)
    manifest.write(str(nan_dir), manifest.Manifest(
        job="test", name="nan", seq_len=512, tokenizer=good.tokenizer, shards=(shard,), counts={}, tokens=0,
        pad_tokens=0, config={}))
    run_dir = tmp_path / "run"
    code, _, err = _finish(_start(_sets(run_dir, (books_dataset, 1.0), (nan_dir, 0.04)), cache_env))
    assert code == 1
    message = err.strip().splitlines()[-1]
    step = int(message.split("non-finite training at step ")[1].split(":")[0])
    last_good = checkpoint.latest_step(run_dir / "checkpoints")
    assert f"the last good checkpoint is step {last_good}" in message
    assert 4 <= last_good < step
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, step))
    params, _ = checkpoint.restore_params(run_dir / "checkpoints")
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_multihost_is_detected_from_the_environment():
    assert not train_lib.multihost_environment({})
    assert not train_lib.multihost_environment({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert train_lib.multihost_environment({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert train_lib.multihost_environment({"JAX_NUM_PROCESSES": "2"})
    assert train_lib.multihost_environment({"OMPI_COMM_WORLD_SIZE": "16"})
