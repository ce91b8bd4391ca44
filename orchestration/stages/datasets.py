"""A plan's data: the checks before a stage starts, and the ``lwm data`` jobs that make what is missing.

A dataset is ready when its ``manifest.json`` exists and every shard it lists is
there with its recorded size (the trainer verifies hashes when it loads them). A
declared dataset (the plan's ``datasets:``) becomes one ``lwm data JOB`` command;
datasets declared with the same job and options (e.g. the buckets of one books
run) share one command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import posixpath
import shlex
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

from orchestration.stages.plan import Plan, Stage
import pipelines
from schemas import flags
from schemas import manifest as manifest_lib
from schemas import storage

READY, INCOMPLETE, MISSING = "ready", "incomplete", "missing"


@dataclasses.dataclass(frozen=True)
class DataJob:
    """One ``lwm data JOB`` run: its typed config and the dataset directories it writes."""

    job: str
    config: Any
    outputs: tuple[str, ...]

    def argv(self, overwrite: bool = False) -> list[str]:
        """``["data", JOB, "--flag", "value", ...]`` for ``orchestration.cli.main``: the flags that give
        ``config`` (:func:`schemas.flags.to_argv`)."""
        renames = importlib.import_module(pipelines.JOBS[self.job]).JOB.renames
        argv = ["data", self.job, *flags.to_argv(self.config, renames=renames)]
        if overwrite and not self.config.output.overwrite:
            argv.append("--overwrite")
        return argv

    def command(self, overwrite: bool = False) -> str:
        return "lwm " + shlex.join(self.argv(overwrite))


def data_jobs(plan: Plan) -> list[DataJob]:
    """The plan's declared datasets as ``lwm data`` runs, one per distinct job and config, in plan order."""
    jobs: dict[tuple, DataJob] = {}
    for source in plan.datasets.values():
        jobs.setdefault((source.job, repr(source.config)), DataJob(source.job, source.config, source.outputs))
    return list(jobs.values())


def job_for(plan: Plan, path: str) -> DataJob | None:
    """The job that writes dataset ``path``, if the plan declares one."""
    return next((job for job in data_jobs(plan) if path in job.outputs), None)


def state(path: str) -> tuple[str, str]:
    """(``ready`` | ``incomplete`` | ``missing``, why) for a dataset directory."""
    try:
        manifest_lib.read(path, verify_hashes=False)
        return READY, ""
    except ValueError as error:
        if storage.listdir(path):
            return INCOMPLETE, str(error)
        return MISSING, f"{path} does not exist"


def manifest_sha256(path: str) -> str:
    """sha256 of the dataset's ``manifest.json`` bytes, as lineage records it."""
    return hashlib.sha256(storage.read_bytes(storage.join(path, manifest_lib.MANIFEST_NAME))).hexdigest()


def how_to_make(plan: Plan, path: str) -> str:
    job = job_for(plan, path)
    if job is None:
        return (f"declare it under datasets: in {plan.path}, or produce it with "
                f"`lwm data {'|'.join(pipelines.JOBS)} ... --output {posixpath.dirname(path)}`")
    overwrite = any(state(p)[0] != MISSING for p in job.outputs)
    return f"run `lwm stages data {plan.path}` (it runs `{job.command(overwrite)}`)"


def check_stage(plan: Plan, stage: Stage) -> list[dict[str, str]]:
    """Refuses a stage whose data is not ready or does not fit it; returns lineage's ``datasets`` entries."""
    paths = [d.path for d in stage.config.data.datasets]
    manifests = {}
    for path in paths:
        status, why = state(path)
        if status != READY:
            raise ValueError(f"stage {stage.name}: dataset {path} is {status} ({why}); {how_to_make(plan, path)}")
        manifests[path] = manifest_lib.read(path, verify_hashes=False)
    _check_manifests(stage, manifests)
    return [{"path": p, "manifest_sha256": manifest_sha256(p)} for p in paths]


def _check_manifests(stage: Stage, manifests: dict[str, manifest_lib.Manifest]) -> None:
    seq_len = stage.config.data.seq_len
    tokenizers: dict[str, str] = {}
    for path, manifest in manifests.items():
        if manifest.seq_len != seq_len:
            raise ValueError(f"stages[{stage.name}]: dataset {path} is packed at seq_len {manifest.seq_len}, "
                             f"the stage's data.seq_len is {seq_len}")
        tokenizers.setdefault(manifest.tokenizer.get("sha256", ""), path)
    if len(tokenizers) > 1:
        raise ValueError(f"stages[{stage.name}]: its datasets were built with different tokenizers "
                         f"({', '.join(f'{p}: sha256 {s[:12]}' for s, p in tokenizers.items())}); "
                         "rebuild them with one tokenizer")


def check_plan(plan: Plan) -> None:
    """What can be checked before anything runs: declared jobs and the manifests already on disk fit their stages."""
    jobs = data_jobs(plan)
    for stage in plan.stages:
        seq_len = stage.config.data.seq_len
        declared_tokenizers = {}
        manifests = {}
        for dataset in stage.config.data.datasets:
            job = next((j for j in jobs if dataset.path in j.outputs), None)
            if job is not None:
                if not dataset.path.endswith(f"/seq{seq_len}"):
                    raise ValueError(f"stages[{stage.name}]: dataset {dataset.path} is declared as a seq"
                                     f"{dataset.path.rsplit('seq', 1)[-1]} bucket, the stage's data.seq_len "
                                     f"is {seq_len}")
                declared_tokenizers.setdefault(job.config.tokenizer, dataset.path)
            if state(dataset.path)[0] == READY:
                manifests[dataset.path] = manifest_lib.read(dataset.path, verify_hashes=False)
        if len(declared_tokenizers) > 1:
            raise ValueError(f"stages[{stage.name}]: its datasets are declared with different tokenizers "
                             f"({', '.join(f'{p}: {t}' for t, p in declared_tokenizers.items())}); "
                             "use one tokenizer for a stage")
        _check_manifests(stage, manifests)


def remote_runner(beam_args: Sequence[str]) -> bool:
    """True when ``beam_args`` choose a runner that works off this machine (Dataflow)."""
    for index, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            return "dataflow" in arg.split("=", 1)[1].lower()
        if arg == "--runner" and index + 1 < len(beam_args):
            return "dataflow" in beam_args[index + 1].lower()
    return False


def produce(plan: Plan, beam_args: Sequence[str], run: Callable[[list[str]], int], *,
            dry_run: bool = False, parallel: bool = False) -> int:
    """Runs every declared job with an output not ready; skips the rest.

    ``run`` is ``orchestration.cli.main``; Beam options in ``beam_args`` pass through to
    every job. Jobs run one after another through ``run`` (the local runner already uses
    every core for one job), or with ``parallel`` all at once as `lwm data` processes (a
    remote runner: each waits for its own Dataflow job). With ``dry_run`` each runs as
    ``lwm data JOB ... --dry-run``: its resolved pipeline options and job graph are
    printed, nothing is read or written. Returns the first non-zero exit status, or 0.
    """
    jobs = data_jobs(plan)
    if not jobs:
        print(f"{plan.path} declares no datasets (datasets: section); nothing to produce")
        return 0
    pending = []
    for job in jobs:
        states = {path: state(path) for path in job.outputs}
        if all(s == READY for s, _ in states.values()):
            print(f"ready: {', '.join(job.outputs)} (skipping lwm data {job.job})", flush=True)
            continue
        for path, (status, why) in states.items():
            print(f"{status}: {path}" + (f" ({why})" if status == INCOMPLETE else ""), flush=True)
        overwrite = any(s != MISSING for s, _ in states.values())
        pending.append(job.argv(overwrite) + list(beam_args) + (["--dry-run"] if dry_run else []))
    if parallel and not dry_run:
        return _run_all_at_once(pending)
    for argv in pending:
        print("$ lwm " + shlex.join(argv), flush=True)
        code = run(argv)
        if code:
            print(f"lwm stages data: `lwm data {argv[1]}` exited {code}; later jobs not started", flush=True)
            return code
    return 0


def _run_all_at_once(argvs: list[list[str]]) -> int:
    """Each ``lwm data`` argv in its own process, all at once, their lines prefixed ``[i]``."""
    processes = []
    for index, argv in enumerate(argvs):
        print(f"[{index}] $ lwm " + shlex.join(argv), flush=True)
        processes.append(subprocess.Popen([sys.executable, "-m", "orchestration.cli", *argv], text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    relays = [threading.Thread(target=_relay, args=(index, p.stdout)) for index, p in enumerate(processes)]
    for relay in relays:
        relay.start()
    codes = [p.wait() for p in processes]
    for relay in relays:
        relay.join()
    for index, (argv, code) in enumerate(zip(argvs, codes)):
        print(f"[{index}] lwm data {argv[1]}: " + ("done" if code == 0 else f"exited {code}"), flush=True)
    return next((c for c in codes if c), 0)


def _relay(index: int, stream) -> None:
    for line in stream:
        print(f"[{index}] {line}", end="", flush=True)
