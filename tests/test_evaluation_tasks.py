"""Evaluation tasks come from one registry: `lwm eval TASK`, a stage's evals: and its gate read it."""

import json

import pytest

from orchestration import cli
from orchestration.stages import gates, plan as plan_lib
from schemas import flags
from schemas.typed_config import from_mapping
from trainer import evaluation


def test_lwm_eval_offers_every_registered_task(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in evaluation.TASKS)
    for name in evaluation.TASKS:
        assert evaluation.task(name).name == name


@pytest.mark.parametrize("name", sorted(evaluation.TASKS))
def test_a_tasks_flags_and_plan_keys_give_the_same_config(name):
    task = evaluation.task(name)
    examples = {"loss": dict(data=("d/seq512",)), "video-needle": dict(frames=(4, 8), vqgan="v", seed=3)}
    config = task.config(**examples.get(name, dict(lengths=(256, 512), seed=3)))
    argv = flags.to_argv(config)
    assert cli.build_parser("eval").parse_args(["eval", name, "--ckpt", "c", "--out", "o", *argv] + (
        ["--tokenizer", "t"] if task.needs_tokenizer else []))
    mapping = flags.to_mapping(config)
    assert from_mapping(task.config, mapping) == config
    assert task.metric_names(config)


def test_a_new_task_is_one_module_and_one_registry_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(evaluation.TASKS, "coin", "tests.fake_eval_task")
    ckpt = tmp_path / "abcd"
    argv = ["eval", "coin", "--ckpt", str(ckpt), "--scale", "2", "--out", str(tmp_path / "coin"), "--json"]
    assert cli.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["task"] == "coin" and document["metrics"] == {"coin_score": 8.0}

    stage = plan_lib.parse({"defaults": {"data": {"seq_len": 512}}, "stages": [{
        "name": "a", "evals": {"coin": {"scale": 0.5}}, "gate": {"at_least": {"coin_score": 3}}}]}).stages[0]
    assert stage.evals["coin"].scale == 0.5
    assert gates.gate_failures(stage, {"coin_score": 2.0}) == ["coin_score 2.0 < gate.at_least[coin_score] 3.0"]
    assert gates.gate_failures(stage, {"coin_score": 4.0}) == []


def test_an_unknown_task_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown evaluation task 'needles'; registered tasks: loss, needle"):
        evaluation.task("needles")
