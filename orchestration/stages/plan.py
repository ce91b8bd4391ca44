"""The stage plan file: training stages in order, how their data is made, where they run.

A plan (``configs/stages/*.yaml``)::

    run_root: runs/lwm-text          # a stage's run_dir defaults to RUN_ROOT/NAME
    launch: {backend: local}         # LaunchConfig: cluster settings, also CLI flags
    datasets:                        # optional: how each dataset directory is produced
      data/books/seq32768: {job: books, config: {inputs: [raw/*.jsonl], tokenizer: tok.model,
                                                 output: {buckets: lwm-text}}}
    defaults: {model: {preset: llama2-7b}, ...}   # any `lwm train` sections, merged into every stage
    stages:
      - name: text-32k
        data: {seq_len: 32768, datasets: [{path: data/books/seq32768}]}
      - name: text-128k
        parent: text-32k             # start from its final params, fresh optimizer
        model: {rope_theta: 1.0e+7}
        eval: {datasets: [...], every: 500}   # the trainer's held-out loss (also at the last step)
        evals:                       # registered evaluation tasks after the stage (trainer.evaluation)
          needle: {lengths: [131072]}
          variable-tracking: {lengths: [131072], hops: 4}
        gate: {at_least: {needle_accuracy/131072: 0.5}, at_most: {eval_loss: 2.5}}

One parser: each stage is ``defaults`` deep-merged with the stage's own sections and
parsed by ``schemas.typed_config.from_mapping(TrainConfig, ...)``, exactly as ``lwm train``
parses its YAML; the plan's own keys are the small dataclasses below, parsed by the
same function. Everything is checked on load (``load``); what depends on the machine
(device count) or on data on disk is checked by ``check_mesh`` and
``orchestration.stages.datasets.check_plan_data``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import posixpath
import re
import typing
from typing import Any, Iterable, Literal, Mapping

import yaml
from jax.sharding import AbstractMesh

import pipelines
from schemas.typed_config import from_mapping
from trainer import evaluation
from trainer.config import TrainConfig
from trainer.evaluation.heldout_loss import dataset_name
from trainer.ring_layout import check_layout
from trainer.sharding import MESH_AXES, validate

STAGE_KEYS = ("name", "parent", "evals", "needle", "gate")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Where and how the stages run; every field is also a ``lwm stages run`` flag (CLI wins)."""

    backend: Literal["local", "tpu-vm", "gke", "slurm"] = "local"
    """Where the stages run: this machine, the workers of a TPU VM, a GKE JobSet or a SLURM job."""
    processes: int = 1
    """JAX processes per stage on this machine, sharing its devices (local; lwm train --processes)."""
    devices: int = 0
    """Devices the meshes are checked against (0: probe locally; tpu-vm/gke: product of --topology; slurm:
    --hosts x --gpus-per-node)."""
    hosts: int = 1
    """Hosts (TPU VM workers, SLURM nodes; gke: must match --accelerator and --topology, which fix it)."""
    tpu: str = ""
    """TPU VM name (tpu-vm)."""
    zone: str = ""
    """GCP zone of the TPU VM (tpu-vm)."""
    project: str = ""
    """GCP project (tpu-vm)."""
    bucket: str = ""
    """A gs:// location the code, plan and worker logs are staged to (tpu-vm)."""
    accelerator: str = ""
    """GKE TPU accelerator node label: tpu-v4-podslice, tpu-v5p-slice, tpu-v5-lite-podslice or tpu-v6e-slice (gke)."""
    topology: str = ""
    """TPU slice topology, e.g. 4x4x4 (v4, v5p) or 4x8 (v5e, v6e) (tpu-vm, gke)."""
    slices: int = 1
    """TPU slices joined over the data-center network; each stage's mesh.dcn must span them (gke)."""
    image: str = ""
    """Container image with lwm installed, e.g. built from the repository's Dockerfile (gke)."""
    namespace: str = "default"
    """Kubernetes namespace (gke)."""
    queue: str = ""
    """Kueue LocalQueue the JobSet is submitted to (gke; the kueue.x-k8s.io/queue-name label; none: no Kueue)."""
    priority_class: str = ""
    """Kubernetes PriorityClass of the pods (gke)."""
    max_restarts: int = 10
    """Restarts of the whole JobSet after preemptions or node failures (gke; other failures are final)."""
    partition: str = ""
    """SLURM partition (slurm)."""
    account: str = ""
    """SLURM account (slurm)."""
    gpus_per_node: int = 8
    """GPUs per SLURM node, one JAX process (task) each (slurm)."""
    time_limit: str = "24:00:00"
    """SLURM time limit of one allocation; the job requeues itself before it runs out (slurm)."""
    setup: str = ""
    """Shell line run on each host before lwm (e.g. activating a venv; slurm, tpu-vm)."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"launch.backend must be one of {BACKENDS}, got {self.backend!r}")
        if min(self.processes, self.hosts, self.gpus_per_node, self.slices) < 1 or min(self.devices,
                                                                                        self.max_restarts) < 0:
            raise ValueError("launch: processes, hosts, gpus_per_node and slices must be >= 1, devices and "
                             "max_restarts >= 0")

    def cluster_devices(self) -> int:
        """Devices of the cluster as configured (0 when it must be probed on this machine)."""
        if self.devices:
            return self.devices
        if self.backend in ("tpu-vm", "gke") and self.topology:
            try:
                chips = math.prod(int(n) for n in self.topology.split("x"))
            except ValueError:
                raise ValueError(f"--topology {self.topology!r} is not AxB or AxBxC") from None
            return chips * (self.slices if self.backend == "gke" else 1)
        if self.backend == "slurm":
            return self.hosts * self.gpus_per_node
        return 0


BACKENDS = typing.get_args(typing.get_type_hints(LaunchConfig)["backend"])


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A ``datasets:`` entry as written: ``{job: JOB, config: {...}}``, the config by the job's field names."""

    RENAMED = {"options": "config (the job's config by field names; `lwm data JOB ... --print-config` prints it)"}

    job: str
    config: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """How one dataset directory is produced: ``lwm data JOB`` with ``config``, the job's typed config.

    The entry's ``config`` has the job config's field names and nesting, exactly as
    ``lwm data JOB ... --print-config`` prints them (e.g. ``inputs``, ``tokenizer``,
    ``output: {buckets: "512,1024", num_shards: 4}``). ``output.output`` defaults to
    the dataset's parent directory and, without ``output.buckets``, the bucket is the
    ``L`` of the dataset's name ``seq{L}``. It is parsed when the plan loads, so a
    misspelled field is refused naming the closest one before any stage runs.
    """

    job: str
    config: Any
    outputs: tuple[str, ...]  # the dataset directories the job writes

    @classmethod
    def parse(cls, path: str, mapping: Any) -> "DatasetSource":
        where = f"datasets[{path}]"
        entry = from_mapping(DatasetEntry, _mapping(mapping, where), where)
        if entry.job not in pipelines.JOBS:
            raise ValueError(f"{where}.job must be one of {tuple(pipelines.JOBS)}, got {entry.job!r}")
        fields = dict(_mapping(entry.config, f"{where}.config"))
        output = dict(_mapping(fields.get("output", {}), f"{where}.config.output"))
        output.setdefault("output", posixpath.dirname(path) or ".")
        if "buckets" not in output:
            match = re.fullmatch(r"seq(\d+)", posixpath.basename(path))
            if not match:
                raise ValueError(f"{where}: give config.output.buckets (the name is not seq{{L}})")
            output["buckets"] = match.group(1)
        job = importlib.import_module(pipelines.JOBS[entry.job]).JOB
        config = from_mapping(job.config, {**fields, "output": output}, f"{where}.config")
        outputs = tuple(f"{config.output.output.rstrip('/')}/{b.name}" for b in config.output.buckets)
        if path not in outputs:
            raise ValueError(f"{where}: `lwm data {entry.job}` with this config writes {list(outputs)}, not {path}")
        return cls(entry.job, config, outputs)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Thresholds a stage's measurements must meet before the next stage starts.

    ``at_least`` and ``at_most`` map a measurement's name to the lowest (highest)
    value that passes: ``eval_loss`` and ``eval/NAME/loss`` (the trainer's held-out
    loss at the stage's last step), or any of the stage's ``evals:`` tasks'
    measurements (``needle_accuracy/1024``, ``variable-tracking_accuracy/2048``, ...).
    The first spellings stay: ``max_eval_loss``, and ``min_needle_accuracy`` at
    ``needle_length`` tokens (0: the stage's seq_len); 0 sets no threshold.
    """

    at_least: dict = dataclasses.field(default_factory=dict)
    at_most: dict = dataclasses.field(default_factory=dict)
    max_eval_loss: float = 0.0
    min_needle_accuracy: float = 0.0
    needle_length: int = 0

    def __post_init__(self):
        for side in ("at_least", "at_most"):
            for name, value in getattr(self, side).items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"gate.{side}[{name}]: expected a number, got {value!r}")

    @property
    def empty(self) -> bool:
        return not (self.at_least or self.at_most or self.max_eval_loss or self.min_needle_accuracy)

    def thresholds(self, seq_len: int) -> list["Threshold"]:
        """Every threshold, the first spellings included."""
        found = [Threshold(name, True, float(v), f"gate.at_least[{name}]", name) for name, v in self.at_least.items()]
        found += [Threshold(name, False, float(v), f"gate.at_most[{name}]", name) for name, v in self.at_most.items()]
        if self.max_eval_loss:
            found.append(Threshold("eval_loss", False, self.max_eval_loss, "gate.max_eval_loss", "eval loss"))
        if self.min_needle_accuracy:
            length = self.needle_length or seq_len
            found.append(Threshold(f"needle_accuracy/{length}", True, self.min_needle_accuracy,
                                   "gate.min_needle_accuracy", f"needle accuracy at {length} tokens"))
        return found


@dataclasses.dataclass(frozen=True)
class Threshold:
    measurement: str
    at_least: bool  # False: at most
    value: float
    key: str  # the gate's key that set it, as messages name it
    label: str  # the measurement, as messages name it

    def failure(self, results: Mapping[str, float]) -> str | None:
        """None when ``results`` meet the threshold, else the message (a missing or NaN measurement fails)."""
        value = results.get(self.measurement)
        if value is not None and (value >= self.value if self.at_least else value <= self.value):
            return None
        return f"{self.label} {value} {'<' if self.at_least else '>'} {self.key} {self.value}"


@dataclasses.dataclass(frozen=True)
class StageKeys:
    """A stage entry's own keys (all others are ``lwm train`` sections).

    ``evals`` maps registered evaluation tasks (:mod:`trainer.evaluation`) to their
    configs, run after the stage; ``needle`` is the first spelling of ``evals: {needle: ...}``.
    """

    name: str
    parent: str = ""
    evals: dict = dataclasses.field(default_factory=dict)
    needle: dict | None = None
    gate: GateConfig = GateConfig()


@dataclasses.dataclass(frozen=True)
class PlanFile:
    """The top level of a plan file."""

    stages: tuple[dict, ...]
    run_root: str = "runs"
    launch: LaunchConfig = LaunchConfig()
    datasets: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolved stage: its own keys and its ``lwm train`` config."""

    name: str
    parent: str
    config: TrainConfig
    evals: dict[str, Any]  # registered task name -> its config
    gate: GateConfig

    @property
    def run_dir(self) -> str:
        return self.config.run_dir

    @property
    def evaluates(self) -> bool:
        return bool(self.evals) or not self.gate.empty


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str
    sha256: str
    launch: LaunchConfig
    stages: tuple[Stage, ...]
    datasets: dict[str, DatasetSource]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"{self.path}: no stage named {name!r}; stages: {[s.name for s in self.stages]}")


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` deep-merged over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    return value


def _stage(entry: Mapping[str, Any], index: int, top: PlanFile, names: set[str]) -> Stage:
    where = f"stages[{index}]"
    entry = _mapping(entry, where)
    if "name" not in entry:
        raise ValueError(f"{where}: every stage needs a name")
    keys = from_mapping(StageKeys, {k: v for k, v in entry.items() if k in STAGE_KEYS}, where)
    where = f"stages[{keys.name}]"
    if keys.name in names:
        raise ValueError(f"{where}: two stages are named {keys.name!r}")
    evals = _evals(keys, where)
    sections = merge(top.defaults, {k: v for k, v in entry.items() if k not in STAGE_KEYS})
    sections.setdefault("run_dir", f"{top.run_root.rstrip('/')}/{keys.name}")
    if keys.parent:
        init_from = _mapping(sections.get("checkpoint", {}), f"{where}.checkpoint").get("init_from")
        if init_from:
            raise ValueError(f"{where}: give either parent or checkpoint.init_from, not both")
        # init_from becomes the parent's checkpoints once every stage is parsed (_link_parents).
    config = from_mapping(TrainConfig, sections, where)
    _check_gate(keys.gate, evals, config, where)
    return Stage(keys.name, keys.parent, config, evals, keys.gate)


def _evals(keys: StageKeys, where: str) -> dict[str, Any]:
    """The stage's evaluation tasks with their typed configs (``needle:`` is ``evals: {needle: ...}``)."""
    mappings = dict(_mapping(keys.evals, f"{where}.evals"))
    if keys.needle is not None:
        if "needle" in mappings:
            raise ValueError(f"{where}: give needle: or evals.needle, not both")
        mappings["needle"] = keys.needle
    evals = {}
    for name, mapping in mappings.items():
        try:
            task = evaluation.task(name)
        except ValueError as error:
            raise ValueError(f"{where}.evals: {error}") from None
        evals[name] = from_mapping(task.config, _mapping(mapping or {}, f"{where}.evals.{name}"),
                                   f"{where}.evals.{name}")
    return evals


def _check_gate(gate: GateConfig, evals: Mapping[str, Any], config: TrainConfig, where: str) -> None:
    """Every threshold names a measurement the stage makes."""
    measured = {f"eval/{dataset_name(d.path)}/{k}" for d in config.eval.datasets for k in ("loss", "text_loss",
                                                                                            "vision_loss")}
    measured |= {"eval_loss"} if config.eval.datasets and config.eval.every else set()
    for name, task_config in evals.items():
        measured.update(evaluation.task(name).metric_names(task_config))
    for threshold in gate.thresholds(config.data.seq_len):
        if threshold.measurement in measured:
            continue
        if threshold.key == "gate.max_eval_loss":
            raise ValueError(f"{where}: gate.max_eval_loss needs eval.datasets and eval.every > 0 (the trainer "
                             "then measures the held-out loss at the stage's last step)")
        if threshold.key == "gate.min_needle_accuracy" and "needle" not in evals:
            raise ValueError(f"{where}: gate.min_needle_accuracy needs needle.lengths to measure the accuracy at")
        raise ValueError(f"{where}: {threshold.key} needs the measurement {threshold.measurement!r}, which this "
                         f"stage does not make; it measures: {', '.join(sorted(measured)) or 'nothing'} (add the "
                         "task to evals: or the lengths to its config)")


def _link_parents(stages: list[Stage]) -> list[Stage]:
    """Checks parents (known, acyclic, listed earlier) and points each child's init_from at its parent."""
    by_name = {s.name: s for s in stages}
    for stage in stages:
        if stage.parent and stage.parent not in by_name:
            raise ValueError(f"stages[{stage.name}]: unknown parent {stage.parent!r}; stages: {list(by_name)}")
    for stage in stages:
        chain, node = [stage.name], stage
        while node.parent:
            node = by_name[node.parent]
            if node.name in chain:
                raise ValueError(f"stages[{stage.name}]: cyclic parents {' -> '.join(chain + [node.name])}")
            chain.append(node.name)
    order = [s.name for s in stages]
    linked = []
    for stage in stages:
        if stage.parent:
            if order.index(stage.parent) > order.index(stage.name):
                raise ValueError(f"stages[{stage.name}]: parent {stage.parent!r} is listed after it; "
                                 "list stages in the order they run")
            parent_dir = by_name[stage.parent].run_dir
            checkpoint = dataclasses.replace(stage.config.checkpoint, init_from=f"{parent_dir}/checkpoints")
            stage = dataclasses.replace(stage, config=dataclasses.replace(stage.config, checkpoint=checkpoint))
        linked.append(stage)
    return linked


def _check_run_dirs(stages: list[Stage]) -> None:
    seen: dict[str, str] = {}
    for stage in stages:
        if stage.run_dir in seen:
            raise ValueError(f"stages[{stage.name}]: run_dir {stage.run_dir} is also stage "
                             f"{seen[stage.run_dir]!r}'s; give each stage its own")
        seen[stage.run_dir] = stage.name


def parse(mapping: Mapping[str, Any], path: str = "plan", sha256: str = "") -> Plan:
    """The plan of a parsed YAML mapping; ValueError naming what to fix."""
    top = from_mapping(PlanFile, _mapping(mapping, path), path)
    _mapping(top.defaults, "defaults")
    if "run_dir" in top.defaults:
        raise ValueError("defaults.run_dir: stages need their own run directories; set run_root instead")
    if not top.stages:
        raise ValueError(f"{path}: the plan has no stages")
    stages: list[Stage] = []
    for index, entry in enumerate(top.stages):
        stages.append(_stage(entry, index, top, {s.name for s in stages}))
    stages = _link_parents(stages)
    _check_run_dirs(stages)
    datasets = {str(k).rstrip("/"): DatasetSource.parse(str(k).rstrip("/"), v)
                for k, v in _mapping(top.datasets, "datasets").items()}
    return Plan(path, sha256, top.launch, tuple(stages), datasets)


def load(path: str | os.PathLike) -> Plan:
    """Reads and checks the plan file at ``path``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    mapping = yaml.safe_load(raw) or {}
    return parse(mapping, path, hashlib.sha256(raw).hexdigest())


def check_mesh(stages: Iterable[Stage], devices: int) -> None:
    """Each stage's mesh fits ``devices``; its batch and sequence split over it (ring layout included)."""
    for stage in stages:
        config = stage.config
        try:
            sizes = config.mesh.resolve(devices)
        except ValueError as error:
            raise ValueError(f"stages[{stage.name}]: mesh does not divide the {devices} devices: {error}") from None
        mesh = AbstractMesh(sizes, MESH_AXES)
        micro_batch = config.data.batch_size // config.optimizer.grad_accum_steps
        try:
            validate(config.model, mesh, micro_batch, config.data.seq_len)
            check_layout(config.data.seq_len, mesh.shape["sp"], config.data.layout)
        except ValueError as error:
            raise ValueError(f"stages[{stage.name}] on mesh {dict(mesh.shape)}: {error}") from None
