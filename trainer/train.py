"""One training stage: the train step, the loop, checkpoints, resume, preemption, logs.

``train(config)`` runs a ``trainer.config.TrainConfig`` to its last step:

- the mesh comes from ``config.mesh`` (axes dp, fsdp, sp, tp); attention is ring
  attention over ``sp`` and the loader (``trainer.data``) puts batches on the mesh
  already in the ring layout;
- ``train_step`` = a small loss function (``trainer.loss.loss_and_metrics``) plus an
  optax update, jitted once with the state's shardings and the state donated;
- checkpoints (``trainer.checkpoint``) hold params, optimizer state, step, the
  loader's position and the config, every ``checkpoint.save_every`` updates, the
  last ``checkpoint.keep`` kept; a run restarts from its newest complete
  checkpoint, otherwise from ``checkpoint.init_from`` params (fresh optimizer),
  otherwise from a seeded initialisation. Resumed runs see the same batches and
  compute the same losses as uninterrupted ones (bitwise on CPU);
- SIGTERM (preemption) saves at the current step and returns ``preempted=True``;
- a non-finite loss or gradient norm raises ``NonFiniteLossError`` naming the step,
  without saving, so the newest checkpoint stays the last good one;
- process 0 writes a progress line, ``RUN_DIR/metrics.jsonl`` and TensorBoard events
  (``RUN_DIR/tensorboard``) every ``log.every`` updates;
- on several hosts (``trainer.distributed``: cluster detection or ``LWM_*`` variables)
  the process joins the job first; every process reads its block of each batch and
  saves its own loader position; all of them stop together on SIGTERM and on a
  non-finite loss (both are decided from global values). ``run_dir`` may be shared
  storage (``gs://``): files go through ``trainer.run_files``, checkpoints through orbax.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from schemas import storage
from trainer import checkpoint, distributed, optimizer
from trainer.config import TrainConfig, write_resolved
from trainer.data import Loader
from trainer.loss import LossConfig, loss_and_metrics
from trainer.model import LWM, ModelConfig, abstract_params, init_params, param_shapes
from trainer.run_files import SyncedDir, SyncedFile
from trainer.sharding import activate, attention_fn, batch_sharding, make_mesh, param_shardings, validate

# Dense bf16 peak per chip, for the MFU estimate (vendor data sheets).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the run stopped without saving."""


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a run ended: the step reached, whether SIGTERM stopped it, its last logged metrics."""

    step: int
    preempted: bool
    metrics: dict[str, float]


def make_train_step(model: LWM, tx: optax.GradientTransformation, loss_config: LossConfig) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``: loss, gradients, one optax update."""

    def loss_fn(params, batch):
        return loss_and_metrics(model, params, batch, loss_config)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {**metrics, "grad_norm": optax.global_norm(grads)}

    return train_step


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight plus causal attention (6 L D S)."""
    embeddings = (config.vocab_size + config.vision_vocab_size) * config.d_model
    return 6.0 * (config.num_params() - embeddings) + 6.0 * config.num_layers * config.d_model * seq_len


def peak_flops(device: jax.Device, peak_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``peak_tflops`` if set, else from its kind; None if unknown."""
    if peak_tflops:
        return peak_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), None)


class MetricsLog:
    """Progress lines, ``metrics.jsonl`` and TensorBoard scalars; silent on processes other than 0."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.file = SyncedFile(storage.join(run_dir, "metrics.jsonl"))
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.events = SyncedDir(storage.join(run_dir, "tensorboard"))
                self.writer = SummaryWriter(self.events.local)

    def write(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.sync()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.flush()
            self.events.sync()
        vision = f"{metrics['vision_loss']:.4f}" if metrics.get("vision_weight") else "-"
        mfu = f"{100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "n/a"
        print(f"step {step}/{total} | loss {metrics['loss']:.4f} (text {metrics['text_loss']:.4f}, "
              f"vision {vision}) | lr {metrics['learning_rate']:.2e} | grad norm {metrics['grad_norm']:.3f} | "
              f"{metrics['tokens_per_s']:,.0f} tokens/s | MFU {mfu}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
                self.events.close()


class _Preemption:
    """Records SIGTERM while installed; ``requested()`` agrees across processes."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(np.any(multihost_utils.process_allgather(np.array(self.flag))))

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def init_from_params(config: TrainConfig, shardings: Any) -> Any:
    """The newest params of ``checkpoint.init_from``, checked to fit this run's model."""
    source = config.checkpoint.init_from
    nested = storage.join(source, "checkpoints")
    ckpt_dir = nested if storage.listdir(nested) else source
    saved = checkpoint.restore_model_config(ckpt_dir)
    if param_shapes(saved) != param_shapes(config.model):
        differ = {k: (v, getattr(config.model, k)) for k, v in saved.to_dict().items()
                  if v != getattr(config.model, k)}
        raise ValueError(f"checkpoint.init_from {source}: its model does not fit this run's; "
                         f"differing fields (saved, this run): {differ}")
    params, _ = checkpoint.restore_params(ckpt_dir, sharding=shardings)
    return params


def _host_metrics(micro: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Mean over a step's micro-batches of each metric, as Python floats."""
    fetched = jax.device_get(micro)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _state_shardings(model_config: ModelConfig, mesh, tx: optax.GradientTransformation) -> TrainState:
    """Parameter shardings from the logical axes; optimizer-state shardings as XLA propagates them."""
    param_sh = param_shardings(mesh, abstract_params(model_config))
    opt_sh = jax.jit(tx.init).lower(_abstract(param_shapes(model_config), param_sh)).compile().output_shardings
    return TrainState(param_sh, opt_sh)


def _check_finite(micro: list[dict[str, jax.Array]], step: int, last_saved: int | None, ckpt_dir: str) -> None:
    values = _host_metrics([{k: m[k] for k in ("loss", "grad_norm")} for m in micro])
    if not all(np.isfinite(v) for v in values.values()):
        kept = f"the last good checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None else \
            "no checkpoint was saved before"
        raise NonFiniteLossError(f"non-finite training at step {step}: loss {values['loss']}, "
                                 f"grad norm {values['grad_norm']}; nothing saved, {kept}")


class _Throughput:
    """Tokens/s (and MFU where the device's peak is known) since the previous call."""

    def __init__(self, config: TrainConfig, step: int):
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.flops_per_token = flops_per_token(config.model, config.data.seq_len)
        self.peak = peak_flops(jax.devices()[0], config.log.peak_tflops)
        self.time, self.step = time.perf_counter(), step

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = self.tokens_per_step * (step - self.step) / (now - self.time)
        self.time, self.step = now, step
        if not self.peak:
            return {"tokens_per_s": rate}
        return {"tokens_per_s": rate, "mfu": rate * self.flops_per_token / (self.peak * jax.device_count())}


def train(config: TrainConfig) -> TrainResult:
    """Runs ``config`` from its newest checkpoint (or from scratch) to ``config.steps``."""
    distributed.join()
    accum = config.optimizer.grad_accum_steps
    micro_batch = config.data.batch_size // accum
    mesh = make_mesh(config.mesh)
    validate(config.model, mesh, micro_batch, config.data.seq_len)
    is_main = jax.process_index() == 0
    if is_main:
        write_resolved(config)
    ckpt_dir = storage.join(config.run_dir, "checkpoints")
    model = LWM(config.model, attention_fn(mesh, config.model))
    tx = optimizer.make(config.optimizer, config.steps)
    lr = optimizer.schedule(config.optimizer, config.steps)
    loader = Loader(config.data, mesh, micro_batch)
    log = MetricsLog(config.run_dir, is_main, config.log.tensorboard)
    options = dict(max_to_keep=config.checkpoint.keep, save_interval_steps=config.checkpoint.save_every,
                   enable_async_checkpointing=config.checkpoint.async_save)
    try:
        with activate(mesh), checkpoint.train_manager(ckpt_dir, **options) as mngr, _Preemption() as preemption:
            state_sh = _state_shardings(config.model, mesh, tx)
            step_fn = jax.jit(make_train_step(model, tx, config.loss), in_shardings=(state_sh, batch_sharding(mesh)),
                              out_shardings=(state_sh, None), donate_argnums=0)
            state, step = _initial_state(config, mngr, loader, tx, state_sh, log)

            def save(at: int, force: bool = False) -> None:
                checkpoint.save_train_state(
                    mngr, at, params=state.params, opt_state=state.opt_state, model_config=config.model,
                    data_iter=loader.iterator, train_config=config.to_dict(), force=force)

            batches = iter(loader)
            if jax.process_count() > 1 and step < config.steps:
                step_fn, batches = distributed.compile_together(step_fn, state, batches)
            throughput = _Throughput(config, step)
            last: dict[str, float] = {}
            while step < config.steps:
                micro = []
                for _ in range(accum):
                    state, metrics = step_fn(state, next(batches))
                    micro.append(metrics)
                step += 1
                _check_finite(micro, step, mngr.latest_step(), ckpt_dir)
                if step % config.log.every == 0 or step == config.steps:
                    last = {**_host_metrics(micro), "learning_rate": float(lr(step - 1)), **throughput(step)}
                    log.write(step, config.steps, last)
                if preemption.requested():
                    save(step, force=True)
                    mngr.wait_until_finished()
                    log.message(f"SIGTERM: saved checkpoint {step} in {ckpt_dir}; exiting")
                    return TrainResult(step, True, last)
                save(step, force=step == config.steps)
            mngr.wait_until_finished()
            log.message(f"finished {config.steps} steps; checkpoint {mngr.latest_step()} in {ckpt_dir}")
            return TrainResult(step, False, last)
    finally:
        log.close()
        loader.close()


def _initial_state(config: TrainConfig, mngr, loader: Loader, tx, state_sh: TrainState,
                   log: MetricsLog) -> tuple[TrainState, int]:
    """Resume from the newest checkpoint, else init_from params, else a fresh init; returns (state, step)."""
    latest = mngr.latest_step()
    if latest is not None:
        params, opt_state = checkpoint.restore_train_state(
            mngr, latest, params=_abstract(param_shapes(config.model), state_sh.params),
            opt_state=_abstract(jax.eval_shape(tx.init, param_shapes(config.model)), state_sh.opt_state),
            data_iter=loader.iterator, data_position=latest * config.optimizer.grad_accum_steps)
        log.message(f"resumed from checkpoint {latest} in {mngr.directory}")
        return TrainState(params, opt_state), latest
    if config.checkpoint.init_from:
        params = init_from_params(config, state_sh.params)
        log.message(f"initialised params from {config.checkpoint.init_from}; fresh optimizer")
    else:
        params = init_params(config.model, jax.random.key(config.seed), state_sh.params)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    return TrainState(params, opt_state), 0
