"""`lwm train --processes 2` (2 processes × 4 CPU devices) against one process × 8 devices.

Same config (tiny model, fsdp 2 × sp 4 zigzag ring, seq 256, batch 2): the losses agree;
a SIGKILLed process stops the job at once and the rerun resumes; SIGTERM saves on every
process (exit 143); a run saved on 2 processes resumes on 1 and the reverse, seeing the
batches of the uninterrupted run; a NaN on one process's rows stops both naming the step.

Losses are compared within 1e-6 relative, not bitwise: the gradient norm that clipping
divides by is an all-reduce, which gloo sums across processes in another order than XLA
sums within one (the first steps agree bitwise, the grad norms differ in the last bit).
The global batches themselves are compared byte for byte in ``tests/test_multihost.py``.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelines.kit.packed_writer import write_shard
from schemas import manifest, packed

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
RTOL = 1e-6


@pytest.fixture(scope="module")
def books256(sample_books, tokenizer_path, tmp_path_factory):
    """The books fixture packed at seq_len 256."""
    from pipelines import books
    from pipelines.kit.buckets import Bucket
    from pipelines.kit.output import OutputConfig
    from pipelines.kit.beam_runner import pipeline_options

    output = tmp_path_factory.mktemp("books256")
    books.run(books.BooksConfig(inputs=(str(sample_books),), tokenizer=tokenizer_path,
                                output=OutputConfig(str(output), (Bucket(256),), num_shards=2)), pipeline_options([]))
    return output / "seq256"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Children's environment: this checkout first, one persistent compilation cache."""
    cache = tmp_path_factory.getbasetemp() / "jax_cache_multihost"
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _sets(run_dir, *datasets):
    listed = ", ".join(f"{{path: '{path}', proportion: {share}}}" for path, share in datasets)
    return [f"run_dir={run_dir}", f"data.datasets=[{listed}]", "data.seq_len=256", "data.batch_size=2",
            f"steps={STEPS}", "optimizer.schedule=warmup_constant", "optimizer.warmup_steps=2",
            "optimizer.learning_rate=3e-3", "checkpoint.save_every=2", "checkpoint.keep=10", "log.every=1",
            "log.tensorboard=false"]


def _start(sets, env, processes=1):
    command = [sys.executable, "-m", "orchestration.cli", "train", "configs/train_tiny.yaml"]
    for s in sets:
        command += ["--set", s]
    command += ["--processes", str(processes)]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=900):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f)]


def _wait_for_checkpoint(process, run_dir, step):
    deadline = time.time() + 900
    while not os.path.isfile(os.path.join(run_dir, "checkpoints", str(step), "commit_success.txt")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"


def _children(pid):
    """{LWM_PROCESS_ID: pid} of the launcher's child processes."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"LWM_PROCESS_ID" in variables:
            found[int(variables[b"LWM_PROCESS_ID"])] = int(entry)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_matches(losses, reference):
    steps = [s for s, _ in losses]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    expected = dict(reference)
    for step, loss in losses:
        assert loss == pytest.approx(expected[step], rel=RTOL), step


@pytest.fixture(scope="module")
def reference(books256, env, tmp_path_factory):
    """Losses of the uninterrupted single-process run."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, _, err = _finish(_start(_sets(run_dir, (books256, 1.0)), env))
    assert code == 0, err
    return _losses(run_dir)


def test_two_processes_train_as_one_and_only_process_0_writes(books256, env, reference, tmp_path):
    code, out, err = _finish(_start(_sets(tmp_path, (books256, 1.0)), env, processes=2))
    assert code == 0, err
    assert "2 processes x 4 CPU devices" in out and f"step {STEPS}/{STEPS} | loss" in out
    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # one writer
    _assert_matches(losses, reference)
    for i in range(2):
        with open(tmp_path / "logs" / f"process-{i}.log") as f:
            assert "Traceback" not in f.read()
    saved = sorted(os.listdir(tmp_path / "checkpoints" / str(STEPS) / "data_iter"))
    assert [f for f in saved if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_sigkill_of_one_process_stops_the_other_and_the_rerun_resumes(books256, env, reference, tmp_path):
    sets = _sets(tmp_path, (books256, 1.0))
    launcher = _start(sets, env, processes=2)
    _wait_for_checkpoint(launcher, tmp_path, 4)
    children = _children(launcher.pid)
    assert sorted(children) == [0, 1]
    os.kill(children[1], signal.SIGKILL)
    code, _, err = _finish(launcher, timeout=60)  # well before the distributed runtime's heartbeat timeout
    assert code == 128 + signal.SIGKILL
    assert "process 1 of 2 was killed by SIGKILL; stopped the other processes" in err
    assert not any(_alive(pid) for pid in children.values())
    code, out, err = _finish(_start(sets, env, processes=2))
    assert code == 0, err
    assert "resumed from checkpoint" in out
    _assert_matches(_losses(tmp_path), reference)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_sigterm_saves_on_every_process_and_the_run_resumes_on_another_process_count(
        books256, env, reference, tmp_path, first, then):
    sets = _sets(tmp_path, (books256, 1.0))
    run = _start(sets, env, processes=first)
    _wait_for_checkpoint(run, tmp_path, 4)
    run.send_signal(signal.SIGTERM)
    code, out, err = _finish(run)
    assert code == 143, err
    saved = int(out.split("SIGTERM: saved checkpoint ")[1].split()[0])
    assert 4 <= saved < STEPS
    positions = sorted(f for f in os.listdir(tmp_path / "checkpoints" / str(saved) / "data_iter")
                       if f.startswith("process_"))
    assert positions == [f"process_{i}-of-{first}.json" for i in range(first)]
    code, out, err = _finish(_start(sets, env, processes=then))
    assert code == 0, err
    assert f"resumed from checkpoint {saved}" in out
    _assert_matches(_losses(tmp_path), reference)


def _nan_dataset(directory, tokenizer, count=8):
    """Records whose loss weights are NaN."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    records = [packed.encode(**packed.from_segments([{
        "tokens": rng.integers(3, 500, 256), "vision_mask": np.zeros(256, bool),
        "loss_weights": np.full(256, np.nan, np.float32)}], 256)) for _ in range(count)]
    shard = write_shard(str(directory / manifest.shard_name("nan", 0, 1)), records)
    manifest.write(str(directory), manifest.Manifest(job="test", name="nan", seq_len=256, tokenizer=tokenizer,
                                                     shards=(shard,), counts={}, tokens=0, pad_tokens=0, config={}))
    return directory


def test_a_nan_on_one_process_stops_both_naming_the_step(books256, env, tmp_path):
    nan_dir = _nan_dataset(tmp_path / "nan", manifest.read(str(books256), verify_hashes=False).tokenizer)
    code, _, err = _finish(_start(_sets(tmp_path / "run", (books256, 1.0), (nan_dir, 0.2)), env, processes=2))
    assert code == 4  # orchestration.stages.local.NON_FINITE
    assert "of 2 exited with code 4; stopped the other processes" in err
    steps = set()
    for i in range(2):
        with open(tmp_path / "run" / "logs" / f"process-{i}.log") as f:
            log = f.read()
        steps.add(int(log.split("non-finite training at step ")[1].split(":")[0]))
    assert len(steps) == 1 and 1 <= steps.pop() <= STEPS
