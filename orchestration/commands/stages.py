"""`lwm stages run|data|status PLAN`: a plan's stages, their data jobs, and where they stand."""

from __future__ import annotations

import json

from orchestration.stages import datasets, gates, gke, local, slurm, status, tpu_vm
from orchestration.stages import stage_runner as runner
from orchestration.stages import plan as plan_lib
from orchestration.stages.plan import LaunchConfig
from orchestration.commands import add_examples
from schemas import flags


def _launch(plan: plan_lib.Plan, args) -> LaunchConfig:
    """The plan's ``launch:`` section with the flags given on the command line over it."""
    return flags.from_args(LaunchConfig, args, base=plan.launch)


def run(args, extra) -> int:
    plan = plan_lib.load(args.plan)
    launch = _launch(plan, args)
    selected = runner.select(plan, args.only, args.start)
    stage_args = ["--only", args.only] if args.only else (["--from", args.start] if args.start else [])
    devices = launch.cluster_devices()
    if launch.backend == "local":
        # Finished stages are not run again, so only the others must fit this machine.
        unfinished = [s for s in selected if status.stage_status(s).state != status.FINISHED]
        if devices or not unfinished:
            per_stage = local.Devices({s.name: devices for s in unfinished})
        else:
            per_stage = local.devices_for(unfinished)
        for stage in unfinished:
            plan_lib.check_mesh([stage], per_stage.counts[stage.name])
        datasets.check_plan(plan)
        return runner.run_plan(plan, only=args.only, start=args.start, processes=launch.processes,
                               devices=per_stage, dry_run=args.dry_run, evaluator=gates.measure)
    if not devices:
        raise ValueError(f"backend {launch.backend}: give --topology (TPU) or --devices so the meshes can be checked")
    plan_lib.check_mesh(selected, devices)
    stage_args += ["--devices", str(devices)]  # known here: no host probes its accelerators
    if launch.backend == "tpu-vm":
        return tpu_vm.launch(plan, launch, stage_args, args.dry_run)
    if launch.backend == "gke":
        return gke.launch(plan, launch, stage_args, args.dry_run, devices)
    return slurm.launch(plan, launch, stage_args, args.dry_run)


def data(args, extra) -> int:
    from orchestration import cli

    plan = plan_lib.load(args.plan)
    return datasets.produce(plan, extra, cli.main, dry_run=args.dry_run, parallel=datasets.remote_runner(extra))


def show(args, extra) -> int:
    rows = status.plan_status(plan_lib.load(args.plan))
    print(json.dumps([r.to_dict() for r in rows], indent=2) if args.json else status.table(rows))
    return 0


def register(subparsers) -> None:
    stages = subparsers.add_parser(
        "stages",
        description="A stage plan (configs/stages/*.yaml) lists training stages of growing length and RoPE theta, "
        "each starting from its parent's final params, and how their datasets are made. `run` runs them in order "
        "(locally or on TPU VMs, GKE, SLURM), `data` makes the missing datasets, `status` shows where each stage is.")
    group = stages.add_subparsers(dest="action", required=True, metavar="ACTION")

    parser = group.add_parser(
        "run", help="run the plan's stages in order; finished ones are skipped, interrupted ones resume",
        description="Run the stages of PLAN in order. A finished stage is skipped, an interrupted one resumes; "
        "each stage starts from its parent's final params. Exit status 143 after a SIGTERM (the running stage "
        "saved). Cluster settings come from the plan's launch: section or these flags.")
    parser.add_argument("plan", help="stage plan YAML (e.g. configs/stages/demo.yaml)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", metavar="STAGE", help="run only this stage (its parent must be finished)")
    which.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; start and submit nothing")
    launch = parser.add_argument_group("launch (override the plan's launch: section)")
    flags.add_flags(launch, LaunchConfig, given_only=True)
    parser.set_defaults(func=run)
    add_examples(parser, "lwm stages run configs/stages/demo.yaml                 # every stage, in order",
                 "lwm stages run configs/stages/demo.yaml --only chat-1024 --dry-run",
                 "lwm stages run configs/stages/lwm_text.yaml --backend tpu-vm --tpu my-tpu --zone us-central2-b "
                 "--topology v4-64 --dry-run")

    parser = group.add_parser(
        "data", help="run (or submit to Dataflow) the plan's data jobs whose output is missing or incomplete",
        description="Run every data job declared in the plan's datasets: section whose output is missing or "
        "incomplete; complete outputs are skipped. Unknown options are Beam pipeline options and pass through "
        "to every job (e.g. --runner DataflowRunner --project P --region R --temp_location gs://...). Local jobs "
        "run one after another; Dataflow jobs all at once.")
    parser.add_argument("plan", help="stage plan YAML")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each lwm data command and its job's pipeline options and graph; run nothing")
    parser.set_defaults(func=data, accepts_extra=True)
    add_examples(parser, "lwm stages data configs/stages/demo.yaml --dry-run",
                 "lwm stages data configs/stages/lwm_text.yaml --runner DataflowRunner --project P --region us-central1 "
                 "--temp_location gs://B/tmp")

    parser = group.add_parser("status", help="a table of the plan's stages: state, step, loss, tokens, checkpoint")
    parser.add_argument("plan", help="stage plan YAML")
    parser.add_argument("--json", action="store_true", help="print a JSON list (one object per stage) instead")
    parser.set_defaults(func=show)
    add_examples(parser, "lwm stages status configs/stages/demo.yaml", "lwm stages status configs/stages/demo.yaml --json")
