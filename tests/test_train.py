"""`lwm train` end to end on books shards: loss falls, exact resume after kills, signals and damaged
checkpoints; NaN; refusals before work; config and logs.

Runs are subprocesses of `lwm train configs/train_tiny.yaml` on the seq-512 books
fixture (tiny text model, fsdp 2 x sp 4 ring attention, batch 2), sharing a
persistent compilation cache so only the first one compiles.
"""

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from orchestration import cli
from pipelines.kit.packed_writer import write_shard
from schemas import manifest, packed
from trainer import checkpoint, config as config_lib, run_dir as run_dir_lib
from trainer.training import optimizer
from trainer.training import loop as train_lib
from trainer.config import OptimizerConfig
from trainer.model import PRESETS, abstract_params, init_params
from trainer.sharding import make_mesh, param_shardings

STEPS = 24


def _sets(run_dir, *datasets):
    listed = ", ".join(f"{{path: '{path}', proportion: {weight}}}" for path, weight in datasets)
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


def _damage(ckpt_dir, step, how):
    """Damages checkpoint ``step``: truncates its largest parameter file, or deletes its optimizer state's metadata."""
    if how == "truncate":
        params = os.path.join(ckpt_dir, str(step), "params")
        files = [os.path.join(root, f) for root, _, names in os.walk(params) for f in names]
        os.truncate(max(files, key=os.path.getsize), 100)
    else:
        os.remove(os.path.join(ckpt_dir, str(step), "opt_state", "_METADATA"))


def test_tiny_model_loss_falls_and_resumes_bitwise_after_kills_signals_and_damage(books_dataset, cache_env, tmp_path,
                                                                                    capsys):
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

    # Ctrl-C and SIGTERM both save the step they arrive at and exit as the shell reports the signal. Saves
    # are synchronous here, so the awaited checkpoint appears before its next step (the resume reports it).
    for signum, code_expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        after = 4 * (checkpoint.latest_step(ckpt_dir) // 4 + 1)  # a checkpoint this run has yet to write
        interrupted = _start(sets + ["checkpoint.async_save=false"], cache_env)
        _signal_after_checkpoint(interrupted, ckpt_dir, after, signum)
        code, out, err = _finish(interrupted)
        assert code == code_expected, err
        assert "resumed from checkpoint" in out and "Traceback" not in err
        saved = checkpoint.latest_step(ckpt_dir)
        assert f"{signum.name}: saved checkpoint {saved}" in out and after <= saved < STEPS
        assert _metrics(run_dir)[-1]["step"] == saved

    # the two newest checkpoints damaged: each reported in one line, the third restored
    newest, second, third = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
    _damage(ckpt_dir, newest, "truncate")
    _damage(ckpt_dir, second, "metadata")
    code, out, err = _finish(_start(sets, cache_env))
    open(f"/work/exp/evl/err_{os.getpid()}_{time.time()}.txt", "w").write(out + "\n=====ERR\n" + err)
    assert code == 0, err
    assert f"checkpoint {newest} in {ckpt_dir} cannot be restored: " in out
    assert f"checkpoint {second} in {ckpt_dir} cannot be restored: " in out
    assert f"fell back to checkpoint {third}" in out and f"resumed from checkpoint {third}" in out
    assert sorted(os.listdir(run_dir / "damaged_checkpoints")) == sorted([str(newest), str(second)])
    assert len(out.splitlines()) < 60 and "Event loop is closed" not in out + err and "Traceback" not in err
    logged = _metrics(run_dir)
    assert {m["step"] for m in logged} == set(range(1, STEPS + 1))
    for m in logged:  # every step, including those computed twice around kills and fallbacks, as uninterrupted
        assert m["loss"] == expected[m["step"]], m["step"]

    # rerun: nothing to do; changed shape: refused in one line before anything is restored or written
    argv = ["train", "configs/train_tiny.yaml"] + [a for s in sets for a in ("--set", s)]
    assert cli.main(argv) == 0
    assert f"is complete: checkpoint {STEPS} of {STEPS} steps, nothing to do" in capsys.readouterr().out
    saved_config = (run_dir / config_lib.CONFIG_NAME).read_text()
    assert cli.main(argv + ["--set", "model.d_model=128"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lwm: error: cannot resume {run_dir} with changed model.d_model 64 -> 128")
    assert err.count("\n") == 1
    assert (run_dir / config_lib.CONFIG_NAME).read_text() == saved_config


def _wake_a_closed_loop(tmp_path):
    """As orbax's failed restore: one read fails, the loop closes, tensorstore finishes another read later."""
    in_flight = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "in_flight")}},
                        create=True, delete_existing=True, dtype="float32", shape=[2048, 2048]).result()
    in_flight.write(np.ones((2048, 2048), np.float32)).result()

    async def damaged():
        await asyncio.sleep(0.001)  # the other read has started
        raise ValueError("damaged")

    async def restore():
        await asyncio.gather(in_flight.read(), damaged())

    loop = asyncio.new_event_loop()
    with pytest.raises(ValueError):
        loop.run_until_complete(restore())
    loop.close()


def _wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_damaged_step_is_reported_in_one_line_and_what_its_restore_leaves_behind_prints_nothing(
        tmp_path, monkeypatch, caplog):
    ckpt_dir = str(tmp_path / "checkpoints")
    params, opt_state = {"w": jnp.arange(4096.0).reshape(64, 64)}, {"m": jnp.ones((64, 64))}
    with checkpoint.train_manager(ckpt_dir) as mngr:
        for step in (1, 2):
            checkpoint.save_train_state(mngr, step, params=params, opt_state=opt_state, model_config=PRESETS["tiny"],
                                        data_iter=iter(grain.MapDataset.range(8).to_iter_dataset()),
                                        train_config={}, force=True)
    _damage(ckpt_dir, 2, "truncate")
    printed, seen = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(str(unraisable.exc_value)))
    _wake_a_closed_loop(tmp_path)  # what users saw before
    _wait_until(lambda: printed)
    assert printed == ["Event loop is closed"]

    printed.clear()
    reports = []
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, opt_state))
    with checkpoint.train_manager(ckpt_dir) as mngr:
        step, *_ = checkpoint.restore_newest_train_state(
            mngr, params=targets[0], opt_state=targets[1], data_iter=iter(grain.MapDataset.range(8).to_iter_dataset()),
            micro_batches=1, damaged_dir=str(tmp_path / "damaged"), report=reports.append)
    assert step == 1 and len(reports) == 2 and reports[0].startswith(f"checkpoint 2 in {ckpt_dir} cannot be restored: ")

    beneath = sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: (seen.append(1), beneath(unraisable)))
    _wake_a_closed_loop(tmp_path)
    _wait_until(lambda: seen)
    caplog.clear()
    about_damaged = Exception(f"error while reading {os.path.join(ckpt_dir, '2', 'params')}")
    caused_by_damaged = Exception("error while reading array")
    caused_by_damaged.__cause__ = about_damaged
    about_restored = Exception(f"error while reading {os.path.join(ckpt_dir, '1', 'params')}")
    same_words = RuntimeError("Event loop is closed")  # not raised while waking a loop
    for error in (about_damaged, caused_by_damaged, about_restored, same_words):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=None))  # as the garbage collector does
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=error)  # as asyncio does
    assert printed == [str(about_restored), str(same_words)]
    assert [record.exc_info[1] for record in caplog.records] == [about_restored, same_words]


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
    assert code == 4  # orchestration.stages.local.NON_FINITE
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
    config = config_lib.load("configs/train_tiny.yaml", ["optimizer.learning_rate=1e-4", "data.datasets.0.proportion=2",
                                                         "model.preset=llama2-7b", "mesh.tp=2"])
    assert config.optimizer.learning_rate == 1e-4 and config.data.datasets[0].proportion == 2.0
    assert config.model.d_model == 4096 and config.model.vision_vocab_size == 0 and config.mesh.tp == 2
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert config_lib.load(path) == config
    assert config_lib.TrainConfig().optimizer == config_lib.load("configs/train_text_32k.yaml").optimizer
    with pytest.raises(ValueError, match=r"config.optimizer: unknown key 'learning_rat'; did you mean "
                                         r"config.optimizer.learning_rate\?"):
        config_lib.load("configs/train_tiny.yaml", ["optimizer.learning_rat=1"])
    with pytest.raises(ValueError, match="config.steps: expected int"):
        config_lib.load("configs/train_tiny.yaml", ["steps=ten"])
    with pytest.raises(ValueError, match="not divisible by optimizer.grad_accum_steps 3: set optimizer"):
        config_lib.load("configs/train_tiny.yaml", ["optimizer.grad_accum_steps=3"])


def test_config_errors_name_the_setting_to_change_and_renamed_keys():
    with pytest.raises(ValueError, match=r"set optimizer.warmup_steps below 5 \(e.g. 0\) or steps above 20"):
        config_lib.load("configs/train_tiny.yaml", ["steps=5"])
    with pytest.raises(ValueError, match=r"config.data.datasets\[0\].weight was renamed: use "
                                         r"config.data.datasets\[0\].proportion"):
        config_lib.load("configs/train_tiny.yaml", ["data.datasets.0.weight=2"])
    with pytest.raises(ValueError, match="config.loss.text_weight was renamed: use config.loss.text_share"):
        config_lib.load(None, ["loss.text_weight=1"])
    # a section overrides the default stage's values, not its class's: tp stays 4
    assert config_lib.load(None, ["mesh.fsdp=2"]).mesh == config_lib.MeshConfig(dp=1, fsdp=2, sp=1, tp=4)
    assert config_lib.load(None, ["model.preset=tiny"]).model == config_lib.PRESETS["tiny"]
    listed = config_lib.help_text()
    assert "optimizer.learning_rate = 4e-05  (float)" in listed and "model.rope_theta = 1000000.0  (float)" in listed
    assert "data.datasets = []  (list of DatasetConfig)" in listed


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


class _FakeManager:
    """The part of orbax's CheckpointManager the loop uses, recording saved steps."""

    directory = "/ckpt"

    def __init__(self):
        self.saved = []

    def save(self, step, force=False, args=None):
        self.saved.append(step)
        return True

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def wait_until_finished(self):
        pass


class _SignalAt:
    """Stands in for the signal handler: reports ``signum`` from step ``at`` on."""

    def __init__(self, at, signum):
        self.at, self.signum, self.calls = at, signum, 0

    def requested(self):
        self.calls += 1
        return self.signum if self.calls >= self.at else 0


class _FakeLoader:
    iterator = None

    def __next__(self):
        return {}


def _fake_session(tmp_path, stop, params=None):
    """A loop session whose step only reports metrics, over a fake manager and loader."""

    def step_fn(state, batch):
        metrics = {k: jnp.float32(1.0) for k in ("loss", "text_loss", "grad_norm")}
        return state, {**metrics, "vision_weight": jnp.float32(0.0)}

    state = train_lib.TrainState({"w": jnp.ones(3)} if params is None else params, None)
    log = train_lib.MetricsLog(str(tmp_path), True, False)
    return train_lib._Session(state, step_fn, _FakeLoader(), _FakeManager(), log, stop)


def _loop_config(tmp_path):
    return config_lib.load("configs/train_tiny.yaml", [f"run_dir={tmp_path}", "steps=10", "optimizer.warmup_steps=2",
                                                       "checkpoint.save_every=4", "log.every=5"])


def test_checkpoints_follow_save_every_and_the_last_step_not_step_one(tmp_path):
    run = _fake_session(tmp_path, _SignalAt(99, 0))
    result = train_lib._loop(_loop_config(tmp_path), run, 0)
    assert run.mngr.saved == [4, 8, 10] and result == train_lib.TrainResult(10, False, result.metrics)
    assert [m["step"] for m in _metrics(tmp_path)] == [5, 10] and "eta_s" in _metrics(tmp_path)[-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_stops_but_on_the_last_step_the_stage_finishes(tmp_path, signum):
    run = _fake_session(tmp_path, _SignalAt(6, signum))
    result = train_lib._loop(_loop_config(tmp_path), run, 0)
    assert (result.step, result.preempted, result.signum) == (6, True, signum) and run.mngr.saved == [4, 6]
    run = _fake_session(tmp_path, _SignalAt(10, signum))
    result = train_lib._loop(_loop_config(tmp_path), run, 0)
    assert (result.step, result.preempted) == (10, False) and run.mngr.saved == [4, 8, 10]


def test_non_finite_parameters_are_never_saved_and_the_error_names_a_finite_checkpoint(tmp_path):
    model = PRESETS["tiny"]
    finite = {"w": jnp.ones(3)}
    checkpoint.save_params(tmp_path / "checkpoints", finite, model, step=4)
    run = _fake_session(tmp_path, _SignalAt(99, 0), params={"w": jnp.array([1.0, jnp.inf, 0.0])})
    with checkpoint.train_manager(tmp_path / "checkpoints") as mngr:
        run.mngr = mngr
        with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite parameters after step 5; nothing saved, "
                                                               r"the last good checkpoint is step 4"):
            train_lib._save(_loop_config(tmp_path), run, 5)
        assert mngr.all_steps() == [4]


def _manifest(tokenizer_size, max_ids):
    return manifest.Manifest(job="books", name="books", seq_len=512, tokenizer={"vocab_size": tokenizer_size},
                             shards=(), counts={}, tokens=0, pad_tokens=0, config={}, max_ids=max_ids)


def test_data_outside_the_model_vocabulary_is_refused_naming_both_sizes():
    tiny = PRESETS["tiny"]
    train_lib.check_vocabulary([_manifest(512, {"text": 511, "vision": 8193})], ["d"], tiny)
    with pytest.raises(ValueError, match="d: its tokenizer has 912 pieces but model.vocab_size is 512"):
        train_lib.check_vocabulary([_manifest(912, {"text": 900})], ["d"], tiny)
    text_only = dataclasses.replace(tiny, vision_vocab_size=0)
    with pytest.raises(ValueError, match="d: holds vision id 8193, outside model.vision_vocab_size 0: set it to at least 8194"):
        train_lib.check_vocabulary([_manifest(512, {"vision": 8193})], ["d"], text_only)


def test_lwm_train_refuses_a_vocabulary_mismatch_and_an_unwritable_run_dir_before_any_work(books_dataset, tmp_path,
                                                                                            capsys):
    sets = ["--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.datasets=[{{path: '{books_dataset}'}}]",
            "--set", "data.seq_len=512", "--set", "data.batch_size=2"]
    assert cli.main(["train", "configs/train_tiny.yaml", *sets, "--set", "model.vocab_size=256"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lwm: error: {books_dataset}: its tokenizer has 512 pieces but model.vocab_size is 256")
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    missing_data = ["--set", "data.datasets=[{path: /no/such/dataset}]"]
    assert cli.main(["train", "configs/train_tiny.yaml", "--set", f"run_dir={blocker / 'run'}", *missing_data]) == 2
    assert capsys.readouterr().err.startswith(f"lwm: error: run_dir {blocker / 'run'} is not writable")


def test_resume_reports_changed_settings_and_refuses_shape_and_data_order_changes(tmp_path):
    base = config_lib.load("configs/train_tiny.yaml", [f"run_dir={tmp_path}"])
    config_lib.write_resolved(base)
    reported = []
    changed = config_lib.load("configs/train_tiny.yaml", [f"run_dir={tmp_path}", "steps=300", "optimizer.learning_rate=1e-3"])
    run_dir_lib.check_resume(changed, reported.append)
    assert reported == ["resuming with changed settings: optimizer.learning_rate 0.003 -> 0.001, steps 200 -> 300"]
    for change, key in (("data.seq_len=2048", "data.seq_len"), ("model.num_layers=3", "model.num_layers"),
                        ("data.seed=1", "data.seed"), ("data.datasets.0.path=other", "data.datasets"),
                        ("optimizer.grad_accum_steps=2", "optimizer.grad_accum_steps")):
        with pytest.raises(ValueError, match=f"cannot resume {tmp_path} with changed {key} "):
            config = config_lib.load("configs/train_tiny.yaml", [f"run_dir={tmp_path}", change])
            run_dir_lib.check_resume(config, print)
    mesh = config_lib.load("configs/train_tiny.yaml", [f"run_dir={tmp_path}", "mesh.fsdp=1", "mesh.sp=8"])
    run_dir_lib.check_resume(mesh, reported.append)  # the data position is global: any mesh, any process count
    assert reported[-1] == "resuming with changed settings: mesh.fsdp 2 -> 1, mesh.sp 4 -> 8"


def test_unwritable_run_dir_or_too_little_space_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not writable"):
        run_dir_lib.check_writable(str(tmp_path / "file" / "run"))
    with pytest.raises(ValueError, match="GiB free, but one checkpoint needs"):
        run_dir_lib.check_writable(str(tmp_path / "run"), needed_bytes=2**62)
    run_dir_lib.check_writable(str(tmp_path / "run"), train_lib.checkpoint_bytes(PRESETS["tiny"]))


def test_the_cli_sets_the_simulated_cpu_device_count_from_the_mesh():
    from orchestration.commands import train as train_command

    tiny = config_lib.load("configs/train_tiny.yaml")
    env = {}
    assert train_command.simulate_cpu_devices(tiny, env) == 8 and env["XLA_FLAGS"].endswith("device_count=8")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert train_command.simulate_cpu_devices(tiny, env) is None and env["XLA_FLAGS"].endswith("=2")


def test_a_uniform_record_weight_cancels_under_the_modality_mean_but_shares_do_not():
    from trainer.loss import LossConfig, reduce_losses

    ce = jnp.array([[1.0, 2.0, 4.0, 8.0]])
    vision = jnp.array([[False, False, True, True]])
    correct = jnp.zeros_like(vision)

    def loss(weights, **config):
        return float(reduce_losses(ce, correct, vision, jnp.array([weights], jnp.float32), LossConfig(**config))[0])

    assert loss([1, 1, 1, 1]) == loss([2, 2, 1, 1]) == 0.5 * 1.5 + 0.5 * 6.0  # --text-weight 2 on every text token
    assert loss([1, 3, 1, 1]) == 0.5 * 1.75 + 0.5 * 6.0  # weights that differ within a modality count
    assert loss([1, 1, 1, 1], text_share=0.75, vision_share=0.25) == 0.75 * 1.5 + 0.25 * 6.0


def test_too_few_cpu_devices_for_the_mesh_says_how_to_simulate_more():
    config = config_lib.load("configs/train_tiny.yaml", ["mesh.fsdp=4"])  # 16 devices; the tests have 8
    with pytest.raises(ValueError, match=r"needs 16 devices, have 8: on CPU, simulate devices with "
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=N"):
        train_lib._mesh(config)
