"""Stage plans: parsing through trainer.config, and every check on load with the message it gives."""

import dataclasses
import math

import pytest
import yaml

from orchestration import cli
from orchestration.stages import datasets, local, plan as plan_lib
from schemas import manifest as manifest_lib

TINY = {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"}


def _plan(stages, **top):
    defaults = top.pop("defaults", {"model": TINY, "mesh": {"dp": 1, "fsdp": 2, "sp": 4, "tp": 1},
                                    "data": {"batch_size": 2}})
    return {"run_root": "runs/p", "defaults": defaults, "stages": stages, **top}


def _stage(name, seq_len=512, **fields):
    return {"name": name, "steps": 4, "data": {"seq_len": seq_len, "datasets": [{"path": f"data/seq{seq_len}"}]},
            **fields}


def _error(mapping, match, devices=None):
    with pytest.raises(ValueError, match=match):
        plan = plan_lib.parse(mapping)
        if devices:
            plan_lib.check_mesh(plan.stages, devices)


def test_defaults_merge_into_each_stage_and_parent_sets_init_from():
    plan = plan_lib.parse(_plan([_stage("a"), _stage("b", 1024, parent="a", model={"rope_theta": 2e4})]))
    a, b = plan.stages
    assert (a.run_dir, b.run_dir) == ("runs/p/a", "runs/p/b")
    assert b.config.checkpoint.init_from == "runs/p/a/checkpoints" and not a.config.checkpoint.init_from
    assert b.config.model.rope_theta == 2e4 and b.config.model.d_model == 64  # preset from defaults, theta its own
    assert b.config.data.seq_len == 1024 and b.config.data.batch_size == 2
    assert dataclasses.replace(b.config.model, rope_theta=a.config.model.rope_theta) == a.config.model


def test_the_shipped_plans_load_and_fit_their_devices():
    for name, devices in (("lwm_text", 256), ("lwm_vision", 256)):
        plan = plan_lib.load(f"configs/stages/{name}.yaml")
        assert plan.launch.cluster_devices() in (0, devices)
        plan_lib.check_mesh(plan.stages, devices)
        assert all(s.config.checkpoint.init_from for s in plan.stages[1:])
    demo = plan_lib.load("configs/stages/demo.yaml")  # CPU: each stage simulates its own mesh's devices
    for stage in demo.stages:
        plan_lib.check_mesh([stage], math.prod(stage.config.mesh.as_tuple()))
    assert all(s.config.checkpoint.init_from for s in demo.stages[1:])
    text = plan_lib.load("configs/stages/lwm_text.yaml").stages
    assert [s.config.data.seq_len for s in text] == [2**15, 2**17, 2**18, 2**19, 2**20]
    assert [s.config.model.rope_theta for s in text] == [1e6, 1e7, 1e7, 2.5e7, 5e7]
    assert [s.config.steps for s in text] == [1200, 3000, 3000, 720, 450]
    assert {s.config.data.seq_len * s.config.data.batch_size for s in text} == {2**22}


def test_on_cpu_without_a_device_count_each_stage_simulates_its_own_mesh(monkeypatch):
    one = {"dp": 1, "fsdp": 1, "sp": 1, "tp": 1}
    plan = plan_lib.parse(_plan([_stage("ring"), _stage("one", mesh=one), _stage("any", mesh={**one, "dp": -1})]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    devices = local.devices_for(plan.stages)
    assert devices.simulated and devices.counts == {"ring": 8, "one": 1, "any": 8}
    assert devices.env("one")["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # the user's count: every stage's
    devices = local.devices_for(plan.stages)
    assert not devices.simulated and devices.counts == {"ring": 4, "one": 4, "any": 4}
    assert devices.env("one") is None


def test_unknown_keys_name_the_stage_and_section():
    _error(_plan([_stage("a")], extra=1), r"plan: unknown key 'extra'; known keys: stages, run_root")
    _error(_plan([_stage("a", optimizer={"lr": 1})]), r"stages\[a\]\.optimizer: unknown key 'lr'")
    _error(_plan([_stage("a", gate={"max_loss": 1})]),
           r"stages\[0\]\.gate: unknown key 'max_loss'; did you mean stages\[0\]\.gate\.max_eval_loss\?")
    _error(_plan([_stage("a")], datasets={"d/seq512": {"job": "books", "conf": {}}}),
           r"datasets\[d/seq512\]: unknown key 'conf'; did you mean datasets\[d/seq512\]\.config\?")


def test_unknown_and_cyclic_parents():
    _error(_plan([_stage("a", parent="zz")]), r"stages\[a\]: unknown parent 'zz'")
    _error(_plan([_stage("a", parent="b"), _stage("b", parent="a")]), r"cyclic parents a -> b -> a")
    _error(_plan([_stage("a", parent="b"), _stage("b")]), r"parent 'b' is listed after it")


def test_stage_names_run_dirs_and_init_from_must_not_clash():
    _error(_plan([_stage("a"), _stage("a")]), r"two stages are named 'a'")
    _error(_plan([_stage("a"), _stage("b", run_dir="runs/p/a")]), r"run_dir runs/p/a is also stage 'a'")
    _error(_plan([_stage("a"), _stage("b", parent="a", checkpoint={"init_from": "x"})]),
           r"either parent or checkpoint.init_from")


def test_mesh_must_divide_the_devices():
    _error(_plan([_stage("a", mesh={"dp": 1, "fsdp": 3, "sp": 1, "tp": 1})]),
           r"stages\[a\]: mesh does not divide the 8 devices: mesh .* needs 3 devices, have 8", devices=8)


def test_batch_and_length_must_fit_the_ring_layout():
    _error(_plan([_stage("a", data={"batch_size": 3})]),
           r"stages\[a\] on mesh .*: batch size 3 is not divisible by dp\*fsdp = 2", devices=8)
    _error(_plan([_stage("a", data={"seq_len": 100, "layout": "zigzag", "datasets": [{"path": "d/seq100"}]})]),
           r"seq_len 100 must be a positive multiple of 8 for layout 'zigzag'", devices=8)


def test_gates_need_something_to_measure():
    _error(_plan([_stage("a", gate={"max_eval_loss": 3.0})]),
           r"stages\[a\]: gate.max_eval_loss needs eval.datasets and eval.every > 0")
    _error(_plan([_stage("a", gate={"min_needle_accuracy": 0.5})]),
           r"stages\[a\]: gate.min_needle_accuracy needs needle.lengths")


def _write_manifest(directory, seq_len, tokenizer_sha):
    directory.mkdir(parents=True)
    manifest_lib.write(str(directory), manifest_lib.Manifest(
        job="books", name="books", seq_len=seq_len, tokenizer={"path": "t.model", "sha256": tokenizer_sha},
        shards=(), counts={}, tokens=0, pad_tokens=0, config={}))


def test_manifest_seq_len_must_match_its_stage(tmp_path):
    _write_manifest(tmp_path / "seq512", 1024, "aa")
    plan = plan_lib.parse(_plan([{"name": "a", "steps": 4, "data": {"seq_len": 512, "datasets": [
        {"path": str(tmp_path / "seq512")}]}}]))
    with pytest.raises(ValueError, match=r"stages\[a\]: dataset .*seq512 is packed at seq_len 1024, the stage's "
                                         r"data.seq_len is 512"):
        datasets.check_plan(plan)


def test_datasets_of_one_stage_must_share_a_tokenizer(tmp_path):
    _write_manifest(tmp_path / "one" / "seq512", 512, "aa")
    _write_manifest(tmp_path / "two" / "seq512", 512, "bb")
    stage = {"name": "a", "steps": 4, "data": {"seq_len": 512, "datasets": [
        {"path": str(tmp_path / "one" / "seq512")}, {"path": str(tmp_path / "two" / "seq512")}]}}
    with pytest.raises(ValueError, match=r"stages\[a\]: its datasets were built with different tokenizers"):
        datasets.check_plan(plan_lib.parse(_plan([stage])))
    declared = {f"d{i}/seq512": {"job": "books", "config": {"tokenizer": f"t{i}.model", "inputs": ["x"]}}
                for i in (1, 2)}
    stage = {"name": "a", "steps": 4, "data": {"seq_len": 512, "datasets": [{"path": p} for p in declared]}}
    with pytest.raises(ValueError, match=r"stages\[a\]: its datasets are declared with different tokenizers"):
        datasets.check_plan(plan_lib.parse(_plan([stage], datasets=declared)))


BOOKS = {"inputs": ["a.jsonl"], "tokenizer": "t.model"}


def test_declared_datasets_must_be_written_by_their_job():
    mapping = _plan([_stage("a")], datasets={"data/seq512": {"job": "books", "config": {
        **BOOKS, "output": {"buckets": "1024"}}}})
    _error(mapping, r"datasets\[data/seq512\]: `lwm data books` with this config writes \['data/seq1024'\], "
                    r"not data/seq512")
    _error(_plan([_stage("a")], datasets={"d/seq512": {"job": "pdfs"}}), r"job must be one of")


def test_dataset_configs_are_the_jobs_typed_config_checked_when_the_plan_loads():
    def declare(config, job="books"):
        return _plan([_stage("a")], datasets={"d/seq512": {"job": job, "config": config}})

    _error(declare({**BOOKS, "input": ["x"]}), r"datasets\[d/seq512\]\.config: unknown key 'input'; "
                                                r"did you mean datasets\[d/seq512\]\.config\.inputs\?")
    _error(declare({**BOOKS, "output": {"num_shard": 2}}), r"config\.output: unknown key 'num_shard'; did you mean "
                                                          r"datasets\[d/seq512\]\.config\.output\.num_shards\?")
    _error(declare({**BOOKS, "text_weight": "heavy"}), r"config\.text_weight: expected float, got 'heavy'")
    _error(declare({**BOOKS, "output": {"buckets": "512:9-1"}}), r"config\.output\.buckets: ")
    _error(declare({"tokenizer": "t.model"}), r"config: inputs must be set")
    _error(declare({**BOOKS, "generator": {"spec": "gpt4"}}, job="chat-qa"), r"unknown generator 'gpt4'")
    _error(_plan([_stage("a")], datasets={"d/seq512": {"job": "books", "options": {"seq-len": 512}}}),
           r"datasets\[d/seq512\]\.options was renamed: use datasets\[d/seq512\]\.config")


def test_print_config_is_what_a_plan_takes(capsys, tmp_path):
    argv = ["data", "video-text", "--input", "v.jsonl", "--tokenizer", "t.model", "--vqgan", "vq", "--output",
            str(tmp_path), "--buckets", "512,2048", "--fps", "2", "--max-frames", "4", "--no-condition-loss"]
    assert cli.main(argv + ["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["job"] == "video-text" and printed["config"]["media"]["video"]["max_frames"] == 4
    assert printed["config"]["output"]["buckets"] == "512,2048" and printed["config"]["layout"]["condition_loss"] is False
    assert not tmp_path.joinpath("seq512").exists()
    plan = plan_lib.parse(_plan([_stage("a")], datasets={f"{tmp_path}/seq512": printed}))
    (job,) = datasets.data_jobs(plan)
    assert job.argv()[2:] and cli.main(job.argv() + ["--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_data_job_argv_from_config():
    plan = plan_lib.parse(_plan([_stage("a")], datasets={
        "out/seq512": {"job": "books", "config": {"inputs": ["a.jsonl", "b.jsonl"], "tokenizer": "t.model",
                                                   "special": {"bos": False, "eos": True},
                                                   "output": {"num_shards": 2}}},
        "out/seq1024": {"job": "books", "config": {**BOOKS, "output": {"buckets": "512,1024"}}},
        "out/seq2048": {"job": "books", "config": {**BOOKS, "output": {"buckets": "512,1024,2048"}}}}))
    jobs = datasets.data_jobs(plan)
    assert jobs[0].argv() == ["data", "books", "--input", "a.jsonl", "b.jsonl", "--tokenizer", "t.model",
                              "--output", "out", "--buckets", "512", "--num-shards", "2", "--no-bos"]
    assert jobs[1].outputs == ("out/seq512", "out/seq1024")
    assert jobs[0].argv(overwrite=True)[-1] == "--overwrite"
    assert len(jobs) == 3
    shared = plan_lib.parse(yaml.safe_load(open("configs/stages/demo.yaml")))
    assert [len(j.outputs) for j in datasets.data_jobs(shared)] == [3, 1, 1, 1, 1, 1, 1]  # one books run for three buckets
