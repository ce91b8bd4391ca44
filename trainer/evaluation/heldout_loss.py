"""Held-out loss: the same batches every time, text and vision reported separately.

An ``Evaluator`` reads the first ``batches × batch_size`` records of each held-out
packed dataset in manifest order (no shuffle, no mixing), once, and scores any
parameters on them with the training loss (``trainer.loss.loss_and_metrics``), on
the training mesh and ring layout. Numbers therefore depend only on the parameters:
two evaluations of one checkpoint agree, and a resumed run reports what the
uninterrupted run did.

Used by ``lwm train`` (the ``eval:`` config section: every N steps, to the progress
line, ``metrics.jsonl`` and TensorBoard under ``eval/``) and by ``lwm eval loss`` for
any checkpoint (:func:`evaluate_checkpoint`).

Per dataset ``NAME`` (the dataset directory's name, or its parent's for ``seqN``
bucket directories) the metrics are ``eval/NAME/loss``, ``eval/NAME/text_loss``,
``eval/NAME/vision_loss`` (when it has vision targets), the matching accuracies and
``eval/NAME/tokens``. Modality means are weighted over all batches (not means of
batch means); ``loss`` combines them as the run's ``LossConfig`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from schemas import manifest as manifest_lib
from schemas import flags, packed, storage
from trainer import checkpoint
from trainer.config import DatasetConfig, EvalConfig, TrainConfig
from trainer.evaluation import Target, Task
from trainer import ring_layout as layout_lib
from trainer.training.loader import NextTokenTargets, RingLayout
from trainer.loss import LossConfig, loss_and_metrics
from trainer.model import LWM, abstract_params
from trainer.sharding import MeshConfig, activate, attention_fn, batch_sharding, make_mesh, param_shardings, validate


def dataset_name(path: str) -> str:
    """``…/books/seq1024`` → ``books``; ``…/heldout`` → ``heldout``."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 1 and parts[-1].startswith("seq") and parts[-1][3:].isdigit():
        return parts[-2]
    return parts[-1]


def fixed_batches(path: str, seq_len: int, batch_size: int, num_batches: int, sp: int,
                  layout: str, block: int = layout_lib.DEFAULT_BLOCK) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full batches of a packed dataset in manifest order, in the ring layout
    with next-token targets (the loader's ``NextTokenTargets`` and ``RingLayout``). Fewer when the dataset is smaller;
    ValueError when it cannot fill one batch or its ``seq_len`` differs."""
    manifest = manifest_lib.read(path)
    if manifest.seq_len != seq_len:
        raise ValueError(f"{path}: manifest seq_len is {manifest.seq_len}, but the model is evaluated at {seq_len}")
    paths = [p for p, s in zip(manifest_lib.shard_paths(path, manifest), manifest.shards) if s.records]
    if manifest.records < batch_size:
        raise ValueError(f"{path}: {manifest.records} records cannot fill one eval batch of {batch_size}")
    count = min(num_batches, manifest.records // batch_size)
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))[:count * batch_size]
    decode = functools.partial(packed.decode, seq_len=seq_len)
    layout_lib.check_layout(seq_len, sp, layout)
    batches = records.map(decode).batch(batch_size).map(NextTokenTargets()).map(RingLayout(sp, layout, block))
    return [batches[i] for i in range(count)]


def combine(metrics: Sequence[dict[str, float]], loss_config: LossConfig) -> dict[str, float]:
    """Per-batch metrics of ``loss_and_metrics`` → one set: modality means weighted by their
    weight sums, ``loss`` as ``loss_config`` combines modalities."""
    out: dict[str, float] = {}
    alphas = {"text": loss_config.text_share, "vision": loss_config.vision_share}
    num = den = 0.0
    for modality, alpha in alphas.items():
        weights = np.array([m.get(f"{modality}_weight", 0.0) for m in metrics])
        total = float(weights.sum())
        if total <= 0:
            continue
        for name in ("loss", "accuracy"):
            values = np.array([m[f"{modality}_{name}"] for m in metrics])
            out[f"{modality}_{name}"] = float(np.sum(values * weights) / total)
        out[f"{modality}_tokens"] = float(sum(m[f"{modality}_tokens"] for m in metrics))
        if loss_config.normalization == "modality_mean":
            num, den = num + alpha * out[f"{modality}_loss"], den + alpha
        else:
            num, den = num + out[f"{modality}_loss"] * total, den + total
    if den:
        out["loss"] = num / den
    return out


class Evaluator:
    """Held-out loss of parameters on fixed batches (module docstring) over ``mesh``."""

    def __init__(self, datasets: Sequence[DatasetConfig], *, model: LWM, mesh: Mesh, seq_len: int,
                 batch_size: int, batches: int, loss_config: LossConfig, layout: str = "zigzag"):
        block = model.config.attention_block_q
        if not datasets:
            raise ValueError("eval: no datasets given")
        self.mesh = mesh
        self.loss_config = loss_config
        self.sets = {}
        for d in datasets:
            name = dataset_name(d.path)
            if name in self.sets:
                raise ValueError(f"eval: two datasets are named {name!r}; evaluate them separately")
            self.sets[name] = fixed_batches(d.path, seq_len, batch_size, batches, mesh.shape["sp"], layout, block)
        self._step = jax.jit(lambda params, batch: loss_and_metrics(model, params, batch, loss_config)[1])

    def __call__(self, params: Any) -> dict[str, float]:
        sharding = batch_sharding(self.mesh)
        out: dict[str, float] = {}
        with activate(self.mesh):
            for name, batches in self.sets.items():
                metrics = []
                for batch in batches:
                    placed = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                              for k, v in batch.items()}
                    metrics.append(jax.device_get(self._step(params, placed)))
                out.update({f"eval/{name}/{k}": v for k, v in combine(metrics, self.loss_config).items()})
        return out

    @classmethod
    def for_run(cls, config: TrainConfig, mesh: Mesh, model: LWM) -> "Evaluator | None":
        """The evaluator of a training run's ``eval:`` section (None when it is off)."""
        if not config.eval.every:
            return None
        batch_size = config.eval.batch_size or config.data.batch_size // config.optimizer.grad_accum_steps
        return cls(config.eval.datasets, model=model, mesh=mesh, seq_len=config.data.seq_len,
                   batch_size=batch_size, batches=config.eval.batches, loss_config=config.loss,
                   layout=config.data.layout)


def due(config: EvalConfig, step: int, total: int) -> bool:
    """Whether a run evaluates after ``step``: every ``config.every`` steps and at its last step."""
    return bool(config.every) and (step % config.every == 0 or step == total)


def log_metrics(log, step: int, metrics: dict[str, float]) -> None:
    """Eval metrics through the trainer's ``MetricsLog``: ``metrics.jsonl``, TensorBoard, a progress line."""
    log.record(step, metrics)
    log.message(f"step {step} | {format_metrics(metrics)}")


def format_metrics(metrics: dict[str, float]) -> str:
    """``eval books: loss 2.31 (text 2.31, vision -) | …``"""
    names = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/")})
    parts = []
    for name in names:
        def get(key):
            value = metrics.get(f"eval/{name}/{key}")
            return "-" if value is None else f"{value:.4f}"
        parts.append(f"eval {name}: loss {get('loss')} (text {get('text_loss')}, vision {get('vision_loss')})")
    return " | ".join(parts)


def evaluate_checkpoint(ckpt_dir: str, datasets: Sequence[str], *, batches: int = 8, batch_size: int = 1,
                        sp: int = 1, step: int | None = None, layout: str = "zigzag") -> dict[str, float]:
    """Held-out loss of a checkpoint (``lwm eval loss``) on ``sp`` devices; the sequence length is the
    datasets' (their manifests must agree). The loss normalisation is the training run's when the
    checkpoint holds its config, else ``LossConfig()``."""
    if not datasets:
        raise ValueError("give at least one dataset directory")
    seq_lens = {manifest_lib.read(d).seq_len for d in datasets}
    if len(seq_lens) != 1:
        raise ValueError(f"the datasets have different seq_len {sorted(seq_lens)}; evaluate them separately")
    config = checkpoint.restore_model_config(ckpt_dir, step)
    if sp < 1 or sp > jax.device_count():
        raise ValueError(f"sp must lie in [1, {jax.device_count()}], got {sp}")
    mesh = make_mesh(MeshConfig(dp=1, fsdp=1, sp=sp, tp=1), jax.devices()[:sp])
    seq_len = seq_lens.pop()
    validate(config, mesh, batch_size, seq_len)
    params, _ = checkpoint.restore_params(ckpt_dir, step, sharding=param_shardings(mesh, abstract_params(config)))
    evaluator = Evaluator([DatasetConfig(d) for d in datasets], model=LWM(config, attention_fn(mesh, config)),
                          mesh=mesh, seq_len=seq_len, batch_size=batch_size, batches=batches,
                          loss_config=_run_loss_config(ckpt_dir, step), layout=layout)
    return evaluator(params)


def _run_loss_config(ckpt_dir: str, step: int | None) -> LossConfig:
    step = checkpoint.latest_step(ckpt_dir) if step is None else step
    if not os.path.isdir(os.path.join(ckpt_dir, str(step), checkpoint.TRAIN_CONFIG)):
        return LossConfig()  # a converted or params-only checkpoint
    saved = checkpoint.restore_train_config(ckpt_dir, step).get("loss")
    return LossConfig(**saved) if saved else LossConfig()


@dataclasses.dataclass(frozen=True)
class LossTaskConfig:
    """``lwm eval loss``: a checkpoint's loss on the first batches of packed datasets."""

    data: tuple[str, ...] = flags.field(repeat=True, metavar="DIR")
    """Packed dataset directory holding manifest.json (repeatable)."""
    batches: int = 8
    """Batches per dataset."""
    batch_size: int = 1
    """Sequences per batch."""
    sp: int = 1
    """Devices of the ring each sequence is split over."""


def _run_task(config: LossTaskConfig, target: Target, out: str | None) -> str:
    metrics = evaluate_checkpoint(checkpoint.resolve_dir(target.ckpt), config.data, batches=config.batches,
                                  batch_size=config.batch_size, sp=config.sp, step=target.step)
    if out:
        storage.write_atomically(out, json.dumps(metrics, indent=2, sort_keys=True).encode())
    return format_metrics(metrics) + (f"\nwrote {out}" if out else "")


def _task_metrics(config: LossTaskConfig, out: str) -> dict[str, float]:
    return json.loads(storage.read_bytes(out))


def _metric_names(config: LossTaskConfig) -> tuple[str, ...]:
    return tuple(f"eval/{dataset_name(d)}/{k}" for d in config.data for k in ("loss", "text_loss", "vision_loss"))


TASK = Task(
    "loss", LossTaskConfig, _run_task, _task_metrics, _metric_names,
    help="held-out loss of a checkpoint on packed datasets (text and vision separately)",
    description="Loss of a checkpoint on the first --batches batches of each packed dataset, in manifest order "
    "(the same batches every time; the same numbers as a training run's eval: section). --out names a JSON file "
    "the metrics are also written to.",
    examples=("lwm eval loss --ckpt runs/tiny --data heldout/seq1024  # 8 batches of 1 sequence",
              "lwm eval loss --ckpt runs/tiny --step 400 --data books/seq1024 --data video/seq1024 --batches 16 "
              "--sp 4 --out loss.json"),
    needs_tokenizer=False, out_required=False)
