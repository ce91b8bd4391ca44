"""`lwm stages data|run|status` end to end on CPU: a two-stage plan (256 → 512 tokens, growing theta).

The data comes from the plan's own `datasets:` (one books job, two buckets). Stage
``long`` trains with learning rate 0, so its final params are its initial params:
equal to stage ``short``'s final params exactly when the chaining works.
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
import yaml

from orchestration import cli
from orchestration.stages import datasets, lineage, plan as plan_lib
from trainer import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory, sample_books, tokenizer_path):
    root = tmp_path_factory.mktemp("plan")
    data = f"{root}/data/books"
    books = {"job": "books", "config": {"inputs": [str(sample_books)], "tokenizer": tokenizer_path,
                                        "output": {"buckets": "256,512", "num_shards": 2}}}
    plan = {
        "run_root": f"{root}/runs",
        "datasets": {f"{data}/seq256": books, f"{data}/seq512": books},
        "defaults": {
            "model": {"preset": "tiny", "vision_vocab_size": 0, "dtype": "float32", "param_dtype": "float32"},
            "data": {"batch_size": 2}, "mesh": {"dp": 1, "fsdp": 2, "sp": 4, "tp": 1},
            "checkpoint": {"save_every": 2, "keep": 2}, "log": {"every": 1, "tensorboard": False},
        },
        "stages": [
            {"name": "short", "steps": 4, "model": {"rope_theta": 1e4},
             "data": {"seq_len": 256, "datasets": [{"path": f"{data}/seq256"}]},
             "optimizer": {"learning_rate": 3e-3, "schedule": "constant", "warmup_steps": 0}},
            {"name": "long", "parent": "short", "steps": 40, "model": {"rope_theta": 2e4},
             "data": {"seq_len": 512, "datasets": [{"path": f"{data}/seq512"}]},
             "optimizer": {"learning_rate": 0.0, "schedule": "constant", "warmup_steps": 0}},
        ],
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def _plan(path):
    return yaml.safe_load(open(path))


def test_stages_data_produces_missing_datasets_and_skips_ready_ones(plan_path, capsys):
    seq256, seq512 = _plan(plan_path)["datasets"]
    assert cli.main(["stages", "data", plan_path]) == 0
    assert "missing: " + seq256 in capsys.readouterr().out
    assert os.path.exists(f"{seq256}/manifest.json") and os.path.exists(f"{seq512}/manifest.json")
    before = os.stat(f"{seq512}/manifest.json").st_mtime_ns

    assert cli.main(["stages", "data", plan_path]) == 0
    out = capsys.readouterr().out
    assert f"ready: {seq256}, {seq512} (skipping lwm data books)" in out and "$ lwm" not in out
    assert os.stat(f"{seq512}/manifest.json").st_mtime_ns == before

    os.remove(f"{seq512}/manifest.json")  # as a job killed before its manifest leaves it
    assert cli.main(["stages", "data", plan_path, "--dry-run"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert f"incomplete: {seq512}" in out and "--buckets 256,512" in out and "--overwrite --dry-run" in out
    assert "WriteManifests" in out and not os.path.exists(f"{seq512}/manifest.json")  # the job's graph, not a run
    assert datasets.produce(plan_lib.load(plan_path), [], cli.main, parallel=True) == 0  # as with Dataflow
    out = capsys.readouterr().out
    assert "[0] $ lwm data books" in out and "[0] lwm data books: done" in out
    assert os.path.exists(f"{seq512}/manifest.json")
    assert datasets.remote_runner(["--runner", "DataflowRunner"]) and not datasets.remote_runner(["--runner=Flink"])


def test_missing_data_stops_the_plan_with_the_command_that_makes_it(tmp_path, plan_path, capsys):
    plan = _plan(plan_path)
    plan["run_root"] = str(tmp_path / "runs")
    plan["datasets"] = {str(tmp_path / "nowhere" / "seq256"): plan["datasets"][next(iter(plan["datasets"]))]}
    plan["stages"][0]["data"]["datasets"] = [{"path": str(tmp_path / "nowhere" / "seq256")}]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert cli.main(["stages", "run", str(path), "--devices", "8"]) == 2
    err = capsys.readouterr().err
    assert f"stage short: dataset {tmp_path}/nowhere/seq256 is missing" in err
    assert f"run `lwm stages data {path}` (it runs `lwm data books --input" in err and "--buckets 256,512" in err
    assert "--overwrite" not in err  # nothing of that job's output exists

    assert cli.main(["stages", "run", str(path), "--devices", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data not ready: {tmp_path}/nowhere/seq256 (missing)" in out
    assert f"-m orchestration.cli train {tmp_path}/runs/long/stage.yaml" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert cli.main(["stages", "run", str(path), "--devices", "8", "--processes", "2", "--dry-run"]) == 0
    assert f"train {tmp_path}/runs/long/stage.yaml --processes 2" in capsys.readouterr().out


def _env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax_cache_stages"
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _stages(*argv, env):
    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "stages", *argv], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _files(directory):
    """Every file under ``directory`` with its size and mtime: what 'untouched' means."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(directory) for f in files}


def test_plan_runs_chains_resumes_after_sigterm_and_then_does_nothing(plan_path, tmp_path_factory, capsys):
    if not os.path.exists(_plan(plan_path)["datasets"].popitem()[0] + "/manifest.json"):
        assert cli.main(["stages", "data", plan_path]) == 0
        capsys.readouterr()
    env = _env(tmp_path_factory)
    runs = _plan(plan_path)["run_root"]
    short, long = f"{runs}/short", f"{runs}/long"

    process = _stages("run", plan_path, env=env)
    deadline = time.time() + 600
    while not os.path.isdir(f"{long}/checkpoints/2"):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 143, out
    assert "stage long: interrupted at step" in out
    assert lineage.read(long)["state"] == "interrupted"
    interrupted_at = checkpoint.latest_step(f"{long}/checkpoints")
    assert 2 <= interrupted_at < 40
    short_files = _files(short)

    process = _stages("run", plan_path, env=env)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    assert "stage short: finished (4/4 steps), skipped" in out
    assert f"resumed from checkpoint {interrupted_at}" in out and "finished 40 steps" in out
    assert _files(short) == short_files

    record = lineage.read(long)
    assert record["state"] == "finished" and record["finished_at"] and record["final_metrics"]["loss"] > 0
    assert [a["outcome"] for a in record["attempts"]] == ["interrupted", "finished"]
    assert record["parent"] == {"run_dir": short, "checkpoint": f"{short}/checkpoints/4", "step": 4}
    assert record["config"]["model"]["rope_theta"] == 2e4 and record["config"]["data"]["seq_len"] == 512
    assert record["datasets"][0]["path"].endswith("seq512") and len(record["datasets"][0]["manifest_sha256"]) == 64
    assert record["plan"] == plan_path and record["devices"] == 8 and record["processes"] == 1
    assert record["code_version"]

    short_final, _ = checkpoint.restore_params(f"{short}/checkpoints", 4)
    long_final, _ = checkpoint.restore_params(f"{long}/checkpoints", 40)  # learning rate 0: its initial params
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), short_final, long_final))

    assert cli.main(["stages", "status", plan_path, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["state"], r["step"], r["steps"]) for r in rows] == [
        ("short", "finished", 4, 4), ("long", "finished", 40, 40)]
    assert rows[1]["tokens_seen"] == 40 * 2 * 512 and rows[1]["checkpoint"] == f"{long}/checkpoints/40"

    everything = _files(runs)
    assert cli.main(["stages", "run", plan_path]) == 0
    assert "all 2 selected stage(s) of " + plan_path + " finished; nothing to do" in capsys.readouterr().out
    assert _files(runs) == everything
