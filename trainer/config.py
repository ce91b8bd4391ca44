"""The training run's config: typed frozen dataclasses, YAML, ``--set`` overrides.

One source of truth: the dataclasses below hold every setting of a run, and their
defaults are the paper's first text stage (docs/LWM.md, "Training recipe", 32K row:
Llama-2 7B, RoPE theta 1e6, 2^15 tokens per sequence, 4M tokens per batch = 128
sequences, 1200 steps, 100 warmup steps, constant LR 4e-5, AdamW b1 0.9 b2 0.95,
weight decay 0.1, grad clip 1.0, mesh dp 1 fsdp -1 tp 4 sp 1). A YAML file and
``--set section.key=value`` overrides change them; the resolved config is written
into the run directory (``config.yaml``) and into every checkpoint.

Parsing is ``schemas.typed_config.from_mapping`` (unknown keys refused with the
closest known one, types checked; a section overrides the defaults above, so
``mesh: {fsdp: 2}`` keeps tp 4). The ``model`` section is the one string lookup:
``model: {preset: tiny, rope_theta: 1e6}`` starts from a registered preset
(``trainer.model.PRESETS``) and overrides fields. A resolved config lists every
model field and no preset. ``help_text()`` lists every key with its default.

    config = load("configs/train_tiny.yaml", ["steps=50", "data.batch_size=4"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import yaml

from schemas import storage
from schemas.typed_config import describe, from_mapping, to_plain
from trainer.loss import LossConfig
from trainer.model import PRESETS, ModelConfig
from trainer.ring_layout import LAYOUTS
from trainer.sharding import MeshConfig

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")
CONFIG_NAME = "config.yaml"


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One packed dataset directory (holding ``manifest.json``) and its share of the mixture.

    ``proportion`` is relative: a stage's datasets are drawn in the ratio of their
    proportions (``[3, 1]`` and ``[0.75, 0.25]`` mix alike); see ``trainer.loss`` for
    how it combines with records' loss weights and the loss's modality shares.
    """

    RENAMED = {"weight": "proportion"}

    path: str
    proportion: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise ValueError("data.datasets: every dataset needs a path")
        if not self.proportion > 0:
            raise ValueError(f"data.datasets: proportion of {self.path} must be > 0, got {self.proportion}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the loader reads (``trainer.training.loader``).

    ``batch_size`` is global sequences per optimizer step (all hosts together);
    ``worker_count`` Grain prefetch processes per host (0: in the main process);
    ``layout`` the ring layout of the sequence axis over ``sp`` (``trainer.ring_layout``):
    ``segments`` (default) picks per packed row the order with the shortest ring,
    ``zigzag``/``contiguous``/``striped`` use one order for every row.
    """

    datasets: tuple[DatasetConfig, ...] = ()
    seq_len: int = 2**15
    batch_size: int = 128
    seed: int = 0
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    layout: str = "segments"
    verify_hashes: bool = False  # sha256 every shard at start-up (reads every byte); sizes are always checked

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "worker_buffer_size", "read_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.worker_count < 0 or not 0 <= self.seed < 2**32:
            raise ValueError("data.worker_count must be >= 0 and data.seed in [0, 2**32)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {LAYOUTS}, got {self.layout!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with gradient clipping and a learning-rate schedule (``trainer.training.optimizer``).

    ``warmup_constant`` and ``warmup_cosine`` warm up linearly from 0 over
    ``warmup_steps``; cosine then decays to ``end_learning_rate`` at the run's last
    step. ``grad_accum_steps`` micro-batches make one update (``optax.MultiSteps``).
    """

    learning_rate: float = 4e-5
    schedule: str = "warmup_constant"
    warmup_steps: int = 100
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate < 0 or self.end_learning_rate < 0 or self.weight_decay < 0:
            raise ValueError("optimizer: learning rates and weight decay must be >= 0")
        if self.warmup_steps < 0 or self.grad_accum_steps < 1 or self.clip_norm <= 0:
            raise ValueError("optimizer: warmup_steps >= 0, grad_accum_steps >= 1 and clip_norm > 0 required")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            raise ValueError("optimizer: b1 and b2 must lie in [0, 1) and eps be > 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``RUN_DIR/checkpoints``.

    ``init_from``: a checkpoint directory (or a run directory holding one) whose
    newest params start this run when it has no checkpoint of its own; the
    optimizer starts fresh. This is how stages chain (new RoPE theta, new length).
    """

    save_every: int = 100
    keep: int = 3
    init_from: str = ""
    async_save: bool = True

    def __post_init__(self):
        if self.save_every <= 0 or self.keep <= 0:
            raise ValueError("checkpoint.save_every and checkpoint.keep must be positive")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress line, ``metrics.jsonl`` and TensorBoard every ``every`` steps.

    ``peak_tflops`` per device for the MFU estimate; 0 looks it up from the device
    kind (no MFU where unknown, e.g. CPU).
    """

    every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0

    def __post_init__(self):
        if self.every <= 0 or self.peak_tflops < 0:
            raise ValueError("log.every must be positive and log.peak_tflops >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out loss during training (``trainer.evaluation.heldout_loss``): the first ``batches`` batches of each
    dataset (proportions unused), every ``every`` steps and at the last (0: off). ``batch_size`` 0
    means the training micro-batch size."""

    datasets: tuple[DatasetConfig, ...] = ()
    every: int = 0
    batches: int = 8
    batch_size: int = 0

    def __post_init__(self):
        if self.every < 0 or self.batches <= 0 or self.batch_size < 0:
            raise ValueError("eval.every and eval.batch_size must be >= 0 and eval.batches positive")
        if self.every and not self.datasets:
            raise ValueError("eval.every is set but eval.datasets is empty")


def _paper_model() -> ModelConfig:
    # 32K stage: Llama-2 7B, RoPE theta 1e6, bf16 compute with fp32 parameters.
    return dataclasses.replace(PRESETS["llama2-7b"], rope_theta=1e6, max_position_embeddings=2**15,
                               dtype="bfloat16", param_dtype="float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage. ``steps`` counts optimizer updates."""

    run_dir: str = "runs/text-32k"
    steps: int = 1200
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=_paper_model)
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig(dp=1, fsdp=-1, sp=1, tp=4)
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("run_dir must be set")
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.data.batch_size % self.optimizer.grad_accum_steps:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by "
                             f"optimizer.grad_accum_steps {self.optimizer.grad_accum_steps}: set "
                             f"optimizer.grad_accum_steps to a divisor of {self.data.batch_size}")
        warmup = self.optimizer.warmup_steps
        if self.optimizer.schedule == "warmup_cosine" and warmup >= self.steps:
            raise ValueError(f"optimizer.warmup_steps {warmup} leaves no steps to decay over in a run of "
                             f"steps {self.steps}: set optimizer.warmup_steps below {self.steps} "
                             f"(e.g. {self.steps // 10}) or steps above {warmup}")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(mapping: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML; list items by index) to a nested dict."""
    result = to_plain(dict(mapping))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not KEY=VALUE (e.g. optimizer.learning_rate=1e-4)")
        *parents, leaf = key.split(".")
        node: Any = result
        for part in parents:
            if isinstance(node, list):
                node = node[_index(part, node, key)]
            else:
                node = node.setdefault(part, {})
        if isinstance(node, list):
            node[_index(leaf, node, key)] = yaml.safe_load(text)
        elif isinstance(node, dict):
            node[leaf] = yaml.safe_load(text)
        else:
            raise ValueError(f"override {key!r}: {'.'.join(parents)} is not a section")
    return result


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def load(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of a YAML file (None: the defaults; any filesystem, ``gs://`` included) with ``overrides``
    applied."""
    mapping: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        with open(path) if storage.is_local(path) else storage.open(path, "r") as f:
            try:
                mapping = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config sections")
    # Overrides reach into the model section as given (preset plus fields), so
    # `--set model.preset=tiny` works before the preset is resolved.
    return from_mapping(TrainConfig, apply_overrides(mapping, overrides))


def help_text() -> str:
    """Every config key with its default (the paper's 32K text stage), one per line."""
    return "\n".join(describe(TrainConfig, TrainConfig()))


def write_resolved(config: TrainConfig) -> str:
    """Writes the resolved config to ``RUN_DIR/config.yaml`` (any filesystem); returns its path."""
    path = storage.join(config.run_dir, CONFIG_NAME)
    storage.write_atomically(path, config.to_yaml().encode())
    return path
