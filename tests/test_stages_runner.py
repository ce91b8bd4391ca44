"""The runner and status without training (stages made to look trained by a checkpoint directory).

Evaluation between stages: results go into lineage and status; an unmet gate stops
the plan before the next stage. A runner killed outright leaves its stage interrupted.
"""

import json
import os
import subprocess
import sys

import pytest

from orchestration.stages import gates, lineage, plan as plan_lib, status
from orchestration.stages import stage_runner as runner
from schemas import flags
from schemas import manifest as manifest_lib


def _plan(tmp_path, gate):
    mapping = {
        "run_root": str(tmp_path / "runs"),
        "defaults": {"model": {"preset": "tiny"}, "data": {"batch_size": 2}},
        "stages": [
            {"name": "a", "steps": 4, "data": {"seq_len": 512, "datasets": [{"path": str(tmp_path / "seq512")}]},
             "eval": {"datasets": [{"path": str(tmp_path / "heldout")}], "every": 2},
             "needle": {"lengths": [256, 512]}, "gate": gate},
            {"name": "b", "parent": "a", "steps": 4,
             "data": {"seq_len": 1024, "datasets": [{"path": str(tmp_path / "missing" / "seq1024")}]}},
        ],
    }
    plan = plan_lib.parse(mapping, "plan.yaml")
    os.makedirs(tmp_path / "runs" / "a" / "checkpoints" / "4")  # stage a trained to its last step
    return plan


class Evaluator:
    def __init__(self, results):
        self.results, self.calls = results, 0

    def __call__(self, stage):
        self.calls += 1
        return self.results


def test_unmet_gate_stops_the_plan_and_names_the_threshold(tmp_path, capsys):
    plan = _plan(tmp_path, {"min_needle_accuracy": 0.5, "max_eval_loss": 3.0})
    measure = Evaluator({"eval_loss": 2.5, "needle_accuracy/256": 0.9, "needle_accuracy/512": 0.25})
    assert runner.run_plan(plan, evaluator=measure) == runner.STOPPED_BY_GATE
    out = capsys.readouterr().out
    assert ("stage a: gate failed: needle accuracy at 512 tokens 0.25 < gate.min_needle_accuracy 0.5; "
            "the plan stops here") in out
    assert "stage b" not in out  # never started: its missing data would have stopped it otherwise
    record = lineage.read(plan.stage("a").run_dir)
    assert record["evaluation"] == measure.results and record["gate"].startswith("gate failed: needle accuracy")
    row = status.stage_status(plan.stage("a"))
    assert row.evaluation["needle_accuracy/512"] == 0.25 and "gate failed" in status.table([row])

    assert runner.run_plan(plan, evaluator=measure) == runner.STOPPED_BY_GATE
    assert measure.calls == 1  # results are kept: a rerun does not evaluate again


def test_met_gate_lets_the_next_stage_start(tmp_path):
    plan = _plan(tmp_path, {"max_eval_loss": 3.0, "needle_length": 256, "min_needle_accuracy": 0.5})
    measure = Evaluator({"eval_loss": 2.5, "needle_accuracy/256": 0.9, "needle_accuracy/512": 0.25})
    with pytest.raises(ValueError, match=r"stage b: dataset .*seq1024 is missing"):
        runner.run_plan(plan, evaluator=measure)
    assert lineage.read(plan.stage("a").run_dir)["gate"] == "gate passed"


def test_gate_failures_compare_each_threshold():
    plan = plan_lib.parse({"defaults": {"data": {"seq_len": 512}}, "stages": [{
        "name": "a", "eval": {"datasets": [{"path": "h"}], "every": 100}, "needle": {"lengths": [512]},
        "gate": {"max_eval_loss": 2.0, "min_needle_accuracy": 0.5}}]})
    stage = plan.stages[0]
    assert gates.gate_failures(stage, {"eval_loss": 2.0, "needle_accuracy/512": 0.5}) == []
    assert gates.gate_failures(stage, {"eval_loss": 2.1, "needle_accuracy/512": 0.7}) == [
        "eval loss 2.1 > gate.max_eval_loss 2.0"]
    assert gates.gate_failures(stage, {"eval_loss": float("nan")}) == [
        "eval loss nan > gate.max_eval_loss 2.0", "needle accuracy at 512 tokens None < gate.min_needle_accuracy 0.5"]


def test_eval_loss_comes_from_the_trainer(tmp_path):
    stage = _plan(tmp_path, {"max_eval_loss": 3.0}).stage("a")
    with open(os.path.join(stage.run_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 4, "loss": 2.0}\n{"step": 4, "eval/heldout/loss": 2.5, "eval/other/loss": 3.5}\n')
    assert gates.trainer_eval_loss(stage) == {"eval/heldout/loss": 2.5, "eval/other/loss": 3.5, "eval_loss": 3.0}
    assert status.last_metrics(stage.run_dir) == {"step": 4, "loss": 2.0}


def test_evals_run_lwm_eval_on_the_final_checkpoint_with_the_datas_tokenizer(tmp_path, monkeypatch):
    stage = _plan(tmp_path, {}).stage("a")
    manifest_lib.write(str(tmp_path / "seq512"), manifest_lib.Manifest(
        job="books", name="books", seq_len=512, tokenizer={"path": "t.model", "uri": "/abs/t.model", "sha256": "x"},
        shards=(), counts={}, tokens=0, pad_tokens=0, config={}))
    calls = []

    def fake_run(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        os.makedirs(out)
        trials = [(256, True), (256, False), (512, True), (512, True)]
        with open(os.path.join(out, "results.jsonl"), "w") as f:
            f.write("".join(json.dumps({"length": n, "correct": c}) + "\n" for n, c in trials))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(gates.subprocess, "run", fake_run)
    assert gates.measure(stage) == {"needle_accuracy/256": 0.5, "needle_accuracy/512": 1.0}
    (argv,) = calls
    assert argv[1:5] == ["-m", "orchestration.cli", "eval", "needle"]
    flags = dict(zip(argv[5::2], argv[6::2]))
    assert flags == {"--ckpt": stage.run_dir, "--step": "4", "--tokenizer": "/abs/t.model", "--lengths": "256,512",
                     "--out": os.path.join(stage.run_dir, "needle")}

    monkeypatch.setattr(gates.subprocess, "run", lambda argv: subprocess.CompletedProcess(argv, 2))
    with pytest.raises(ValueError, match="stage a: `lwm eval needle` exited 2"):
        gates.measure(stage)


def test_a_gate_can_require_any_registered_tasks_measurement(tmp_path):
    plan = plan_lib.parse({"defaults": {"data": {"seq_len": 512}}, "stages": [{
        "name": "a", "evals": {"variable-tracking": {"lengths": [512, 1024], "hops": 2}, "multi-needle": {
            "lengths": [512]}},
        "gate": {"at_least": {"variable-tracking_accuracy/1024": 0.4}, "at_most": {"multi-needle_accuracy/512": 0.9}}}]})
    stage = plan.stages[0]
    assert stage.evals["variable-tracking"].hops == 2 and stage.evals["multi-needle"].needles == 4
    assert gates.gate_failures(stage, {"variable-tracking_accuracy/1024": 0.5, "multi-needle_accuracy/512": 0.5}) == []
    assert gates.gate_failures(stage, {"variable-tracking_accuracy/1024": 0.25, "multi-needle_accuracy/512": 1.0}) == [
        "variable-tracking_accuracy/1024 0.25 < gate.at_least[variable-tracking_accuracy/1024] 0.4",
        "multi-needle_accuracy/512 1.0 > gate.at_most[multi-needle_accuracy/512] 0.9"]
    assert flags.to_argv(stage.evals["variable-tracking"]) == ["--lengths", "512,1024", "--hops", "2"]


def test_gates_and_evals_are_checked_when_the_plan_loads():
    def stage(**keys):
        return {"defaults": {"data": {"seq_len": 512}}, "stages": [{"name": "a", **keys}]}

    with pytest.raises(ValueError, match=r"stages\[a\]\.evals: unknown evaluation task 'haystack'; registered tasks: "
                                         r"loss, needle, multi-needle, variable-tracking, video-needle"):
        plan_lib.parse(stage(evals={"haystack": {}}))
    with pytest.raises(ValueError, match=r"stages\[a\]\.evals\.needle: unknown key 'length'; did you mean "
                                         r"stages\[a\]\.evals\.needle\.lengths\?"):
        plan_lib.parse(stage(evals={"needle": {"length": [512]}}))
    with pytest.raises(ValueError, match=r"gate.at_least\[needle_accuracy/2048\] needs the measurement "
                                         r"'needle_accuracy/2048', which this stage does not make; it measures: "
                                         r"needle_accuracy/512"):
        plan_lib.parse(stage(evals={"needle": {"lengths": [512]}}, gate={"at_least": {"needle_accuracy/2048": 0.5}}))
    with pytest.raises(ValueError, match=r"gate.at_most\[eval_loss\]: expected a number"):
        plan_lib.parse(stage(gate={"at_most": {"eval_loss": "low"}}))
    with pytest.raises(ValueError, match=r"give needle: or evals.needle, not both"):
        plan_lib.parse(stage(needle={"lengths": [512]}, evals={"needle": {}}))


def test_a_stage_whose_runner_was_killed_outright_shows_as_interrupted(tmp_path):
    plan = _plan(tmp_path, {})
    stage = plan.stage("b")
    lineage.start(stage.run_dir, {"stage": "b"})
    assert status.stage_status(stage).state == "running"  # this process is its runner, alive
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = lineage.read(stage.run_dir)
    record["attempts"][-1]["pid"] = int(gone.stdout)
    lineage.write(stage.run_dir, record)
    assert status.stage_status(stage).state == "interrupted"


def test_only_and_from_select_stages_and_a_parent_must_be_finished_first(tmp_path):
    plan = _plan(tmp_path, {})
    assert [s.name for s in runner.select(plan, start="b")] == ["b"]
    assert [s.name for s in runner.select(plan)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"no stage named 'c'"):
        runner.select(plan, only="c")
    os.rmdir(tmp_path / "runs" / "a" / "checkpoints" / "4")
    os.makedirs(tmp_path / "runs" / "a" / "checkpoints" / "2")  # a stopped half-way
    with pytest.raises(ValueError, match=r"stage b starts from stage a's final params, but a is interrupted at step "
                                         r"2/4; run it first \(lwm stages run plan.yaml --from a\)"):
        runner.run_plan(plan, only="b", evaluator=Evaluator({}))
