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
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipelines.dataset import write_shard
from schemas import manifest, packed
from trainer import checkpoint, config as config_lib, optimizer, train as train_lib
from trainer.config import OptimizerConfig
from trainer.model import PRESETS, abstract_params, init_params
from trainer.sharding import make_mesh, param_shardings

STEPS = 24


def _sets(run_dir, *datasets):
    listed = ", ".join(f"{{path: '{path}', weight: {weight}}}" for path, weight in datasets)
    return [f"run_dir={run_dir}", f"data.datasets=[{listed}]", "data.seq_len=512", "data.batch_size=2",
            f"steps={STEPS}", "optimizer.schedule=warmup_constant", "optimizer.warmup_steps=2",
            "optimizer.learning_rate=3e-3", "checkpoint.save_every=4", "checkpoint.keep=3", "log.every=1"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """The environment for `lwm train` children: one persistent compilation cache for all test workers."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache_train"
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
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


def _check_outputs(run_dir, out):
    """Progress lines, resolved config, TensorBoard events, kept checkpoints readable by inference."""
    assert f"step {STEPS}/{STEPS} | loss" in out and "tokens/s" in out
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resolved = config_lib.load(os.path.join(run_dir, config_lib.CONFIG_NAME))
    assert resolved.steps == STEPS and resolved.model.d_model == 64 and resolved.mesh.sp == 4
    assert checkpoint.restore_train_config(ckpt_dir) == resolved.to_dict()
    assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [16, 20, 24]  # keep 3
    params, model_config = checkpoint.restore_params(ckpt_dir)
    assert model_config == resolved.model
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))


def test_tiny_model_loss_falls_and_resumes_bitwise_after_sigkill_and_sigterm(books_dataset, cache_env, tmp_path):
    # One test, so that test workers do not each repeat the uninterrupted reference run.
    reference = tmp_path / "reference"
    code, out, err = _finish(_start(_sets(reference, (books_dataset, 1.0)), cache_env))
    assert code == 0, err
    expected = {m["step"]: m["loss"] for m in _metrics(reference)}
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert np.mean([expected[s] for s in range(STEPS - 4, STEPS + 1)]) < expected[1] - 0.5
    _check_outputs(reference, out)

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


def test_init_from_loads_another_runs_params_for_a_new_theta_and_length(tmp_path):
    previous = config_lib.load("configs/train_tiny.yaml")
    saved = init_params(previous.model, jax.random.key(1))
    checkpoint.save_params(tmp_path / "checkpoints", saved, previous.model, step=7)
    stage = config_lib.load("configs/train_tiny.yaml", [
        f"checkpoint.init_from={tmp_path}", "model.rope_theta=1e6", "data.seq_len=2048"])
    shardings = param_shardings(make_mesh(stage.mesh), abstract_params(stage.model))
    params = train_lib.init_from_params(stage, shardings)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, saved))
    wider = config_lib.load("configs/train_tiny.yaml", [f"checkpoint.init_from={tmp_path}", "model.d_model=128"])
    with pytest.raises(ValueError, match=r"differing fields \(saved, this run\): \{'d_model': \(64, 128\)"):
        train_lib.init_from_params(wider, shardings)


def test_config_yaml_with_overrides_resolves_and_rejects_typos(tmp_path):
    config = config_lib.load("configs/train_tiny.yaml", ["optimizer.learning_rate=1e-4", "data.datasets.0.weight=2",
                                                         "model.preset=llama2-7b", "mesh.tp=2"])
    assert config.optimizer.learning_rate == 1e-4 and config.data.datasets[0].weight == 2.0
    assert config.model.d_model == 4096 and config.model.vision_vocab_size == 0 and config.mesh.tp == 2
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert config_lib.load(path) == config
    assert config_lib.TrainConfig().optimizer == config_lib.load("configs/train_text_32k.yaml").optimizer
    with pytest.raises(ValueError, match=r"config.optimizer: unknown keys \['learning_rat'\]"):
        config_lib.load("configs/train_tiny.yaml", ["optimizer.learning_rat=1"])
    with pytest.raises(ValueError, match="config.steps: expected int"):
        config_lib.load("configs/train_tiny.yaml", ["steps=ten"])
    with pytest.raises(ValueError, match="not divisible by optimizer.grad_accum_steps"):
        config_lib.load("configs/train_tiny.yaml", ["optimizer.grad_accum_steps=3"])


def test_schedules_follow_the_paper_shapes():
    constant = optimizer.schedule(OptimizerConfig(schedule="warmup_constant", warmup_steps=100), 1200)
    assert constant(0) == 0 and np.isclose(constant(50), 2e-5) and np.isclose(constant(1000), 4e-5)
    cosine = optimizer.schedule(OptimizerConfig(learning_rate=6e-4, end_learning_rate=6e-5,
                                                schedule="warmup_cosine", warmup_steps=10), 110)
    assert np.isclose(cosine(10), 6e-4) and np.isclose(cosine(60), 3.3e-4) and np.isclose(cosine(110), 6e-5)


def test_grad_accumulation_applies_the_mean_of_micro_batch_gradients():
    params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(2)}
    grads = [jax.tree.map(lambda p, k=k: (k + 1.0) * p, params) for k in range(2)]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    single = optimizer.make(OptimizerConfig(schedule="constant", learning_rate=0.1), 10)
    expected, _ = single.update(mean, single.init(params), params)
    accumulated = optimizer.make(OptimizerConfig(schedule="constant", learning_rate=0.1, grad_accum_steps=2), 10)
    state = accumulated.init(params)
    first, state = accumulated.update(grads[0], state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(first))
    second, _ = accumulated.update(grads[1], state, params)
    assert jax.tree.all(jax.tree.map(np.allclose, second, expected))
    # weight decay reaches matrices only: with zero gradients the norm scale does not move
    zero = jax.tree.map(jnp.zeros_like, params)
    decayed, _ = single.update(zero, single.init(params), params)
    assert np.all(np.asarray(decayed["scale"]) == 0) and np.all(np.asarray(decayed["w"]) < 0)
    assert single.init(params)[1][0].mu["w"].dtype == jnp.float32


def test_mfu_estimate_counts_matmul_and_attention_flops_against_the_device_peak():
    assert train_lib.peak_flops(types.SimpleNamespace(device_kind="TPU v4")) == 275e12
    assert train_lib.peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert train_lib.peak_flops(types.SimpleNamespace(device_kind="cpu")) is None
    assert train_lib.peak_flops(types.SimpleNamespace(device_kind="cpu"), 2.0) == 2e12
    # Llama-2 7B at 4K: 6 x 6.61B matmul weights (embedding lookups excluded) + 6 x 32 x 4096 x 4096.
    assert np.isclose(train_lib.flops_per_token(PRESETS["llama2-7b"], 4096), 3.97e10 + 3.22e9, rtol=0.01)
