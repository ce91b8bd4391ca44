"""``run_plan``: the stages of a plan in order, on this machine, resumable at any point.

For each selected stage:

1. finished (newest checkpoint = its last step): skipped, its lineage untouched
   (unless training ended but its lineage or evaluation was not recorded);
2. its parent must be finished (its final params start this stage);
3. its data must be ready and fit it (``datasets.check_stage``), else the plan
   stops with the command that produces the data;
4. ``RUN_DIR/stage.yaml`` (the stage's resolved config) is written, lineage records
   the start, and `lwm train RUN_DIR/stage.yaml` runs; the trainer (which keeps its
   own ``config.yaml`` and checks a resume against it) resumes from the
   stage's newest checkpoint, or starts from the parent's final params;
5. when training finishes: lineage is completed, the stage's ``eval:`` and ``needle:``
   run and its ``gate:`` decides whether the plan goes on.

A SIGTERM (preemption, Kubernetes, a scheduler) saves the running stage and the
plan exits 143; running the same command again continues where it stopped.

Exit statuses of ``run_plan`` (and ``lwm stages run``), which the cluster backends
use to tell a retry from a final failure:

====== =================================================================
0      every selected stage finished
1      an unexpected error (a stage's ``lwm train`` crashed)
2      bad input or config (``lwm: error: ...``)
3      a gate failed (``STOPPED_BY_GATE``): the plan stops, later stages wait
4      a stage's loss became non-finite (``local.NON_FINITE``)
143    SIGTERM (130: Ctrl-C): the running stage saved; run again to resume
====== =================================================================
"""

from __future__ import annotations

import shlex

from orchestration.stages import datasets, lineage, local, status
from orchestration.stages.gates import Evaluator, gate_failures
from orchestration.stages.plan import Plan, Stage
from schemas import storage

STAGE_CONFIG = "stage.yaml"
STOPPED_BY_GATE = 3


def select(plan: Plan, only: str | None = None, start: str | None = None) -> tuple[Stage, ...]:
    """The stages to run: all, ``--only`` one, or ``--from`` one to the end."""
    if only and start:
        raise ValueError("give --only or --from, not both")
    names = [s.name for s in plan.stages]
    if only:
        return (plan.stage(only),)
    if start:
        return plan.stages[names.index(plan.stage(start).name):]
    return plan.stages


def _parent_record(plan: Plan, stage: Stage) -> dict | None:
    if not stage.parent:
        return None
    parent = plan.stage(stage.parent)
    progress = status.stage_status(parent)
    if progress.state != status.FINISHED:
        raise ValueError(f"stage {stage.name} starts from stage {parent.name}'s final params, but {parent.name} is "
                         f"{progress.state} at step {progress.step}/{progress.steps}; run it first "
                         f"(lwm stages run {plan.path} --from {parent.name})")
    return {"run_dir": parent.run_dir, "checkpoint": progress.checkpoint, "step": progress.step}


def _describe(stage: Stage, index: int, total: int) -> str:
    config = stage.config
    start = f"from {stage.parent}" if stage.parent else (
        f"from {config.checkpoint.init_from}" if config.checkpoint.init_from else "from scratch")
    return (f"=== stage {stage.name} ({index}/{total}): seq_len {config.data.seq_len}, rope theta "
            f"{config.model.rope_theta:g}, {config.steps} steps of {config.data.batch_size} sequences, {start} ===")


def _evaluate(stage: Stage, evaluator: Evaluator) -> int:
    """Runs the stage's evaluation (once) and its gate; 0 to go on, ``STOPPED_BY_GATE`` to stop the plan."""
    if not stage.evaluates:
        return 0
    record = lineage.read(stage.run_dir) or {}
    results = record.get("evaluation")
    if results is None:
        print(f"stage {stage.name}: evaluating", flush=True)
        results = evaluator(stage)
        lineage.update(stage.run_dir, evaluation=results)
        print(f"stage {stage.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()), flush=True)
    failures = gate_failures(stage, results)
    verdict = "gate failed: " + "; ".join(failures) if failures else ("gate passed" if not stage.gate.empty else "")
    if verdict != record.get("gate", ""):
        lineage.update(stage.run_dir, gate=verdict)
    if failures:
        print(f"stage {stage.name}: {verdict}; the plan stops here (later stages need a promoted stage)", flush=True)
        return STOPPED_BY_GATE
    return 0


def _record_finish(stage: Stage) -> None:
    lineage.end(stage.run_dir, status.FINISHED, final_metrics=status.last_metrics(stage.run_dir) or None)


def _run_stage(plan: Plan, stage: Stage, processes: int, devices: local.Devices, signals: local.Signals) -> int:
    parent = _parent_record(plan, stage)
    used = datasets.check_stage(plan, stage)
    config_path = storage.join(stage.run_dir, STAGE_CONFIG)
    storage.write_atomically(config_path, stage.config.to_yaml().encode())
    lineage.start(stage.run_dir, {
        "plan": plan.path, "plan_sha256": plan.sha256, "stage": stage.name, "config": stage.config.to_dict(),
        "parent": parent, "datasets": used, "code_version": lineage.code_version(), "processes": processes,
        "devices": devices.counts.get(stage.name, 0),
    })
    argv = local.train_argv(config_path, processes)
    print("$ " + shlex.join(argv), flush=True)
    code = signals.run(argv, devices.env(stage.name))
    if status.stage_status(stage).state == status.FINISHED and code in (0, local.PREEMPTED):
        _record_finish(stage)  # a SIGTERM that came with the last step leaves nothing to resume
        return 0
    if code == local.PREEMPTED or (code and signals.received):
        lineage.end(stage.run_dir, status.INTERRUPTED)
        progress = status.stage_status(stage)
        print(f"stage {stage.name}: interrupted at step {progress.step}/{progress.steps}; run "
              f"`lwm stages run {plan.path}` again to resume it", flush=True)
        return local.PREEMPTED
    lineage.end(stage.run_dir, "failed", exit_status=code)
    if code:
        why = "its loss became non-finite" if code == local.NON_FINITE else "lwm train failed"
        print(f"stage {stage.name}: {why} (exit {code}); the plan stops", flush=True)
        return code
    raise ValueError(f"stage {stage.name}: lwm train exited 0 without a checkpoint at step {stage.config.steps}")


def run_plan(plan: Plan, *, only: str | None = None, start: str | None = None, processes: int = 1,
             devices: local.Devices = local.Devices({}), dry_run: bool = False, evaluator: Evaluator) -> int:
    """Runs the selected stages in order; returns 0, 143 after a SIGTERM, 3 when a gate stops the plan,
    4 after a non-finite loss, or the failing exit status (module docstring). ``evaluator`` measures what
    the stages' ``eval:`` sections ask for."""
    selected = select(plan, only, start)
    ran = 0
    with local.Signals() as signals:
        for index, stage in enumerate(selected, 1):
            progress = status.stage_status(stage)
            if progress.state == status.FINISHED:
                print(f"stage {stage.name}: finished ({progress.step}/{progress.steps} steps), skipped", flush=True)
                if (lineage.read(stage.run_dir) or {}).get("state") != status.FINISHED and not dry_run:
                    _record_finish(stage)
            elif dry_run:
                _dry_run_stage(plan, stage, index, len(selected), processes, progress)
                continue
            else:
                if signals.received:
                    print(f"lwm stages: stopped before stage {stage.name}", flush=True)
                    return local.PREEMPTED
                print(_describe(stage, index, len(selected)), flush=True)
                if progress.step:
                    print(f"stage {stage.name}: {progress.state} at step {progress.step}/{progress.steps}; resuming",
                          flush=True)
                code = _run_stage(plan, stage, processes, devices, signals)
                if code:
                    return code
                ran += 1
            if not dry_run and _evaluate(stage, evaluator):
                return STOPPED_BY_GATE
    if not dry_run:
        done = "nothing to do" if not ran else f"ran {ran}"
        print(f"all {len(selected)} selected stage(s) of {plan.path} finished; {done}", flush=True)
    return 0


def _dry_run_stage(plan: Plan, stage: Stage, index: int, total: int, processes: int,
                   progress: status.StageStatus) -> None:
    print(_describe(stage, index, total))
    if progress.step:
        print(f"  resumes from {progress.checkpoint}")
    for dataset in stage.config.data.datasets:
        state, why = datasets.state(dataset.path)
        if state != datasets.READY:
            print(f"  data not ready: {dataset.path} ({state}); {datasets.how_to_make(plan, dataset.path)}")
    config_path = storage.join(stage.run_dir, STAGE_CONFIG)
    print(f"  writes {config_path}, then runs: {shlex.join(local.train_argv(config_path, processes))}")

