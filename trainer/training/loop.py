"""One training stage: the train step, the loop, checkpoints, resume, preemption, logs.

``train(config)`` runs a ``trainer.config.TrainConfig`` to its last step:

- before any work: ``run_dir`` must be writable (``trainer.run_dir``); a resume
  must be able to honour the config (changes are reported, a changed model shape
  or data order refused); the datasets must fit the model's vocabularies
  (``check_vocabulary``) and hold records; a finished run (its final checkpoint
  restores) has nothing to do, and one whose final checkpoint is damaged resumes
  from the newest that restores, like any other;
- the mesh comes from ``config.mesh`` (axes dp, fsdp, sp, tp); attention is ring
  attention over ``sp`` and the loader (``trainer.training.loader``) puts batches on the mesh
  already in the ring layout;
- ``train_step`` = a small loss function (``trainer.loss.loss_and_metrics``) plus an
  optax update, jitted once with the state's shardings and the state donated;
- checkpoints (``trainer.checkpoint``) hold params, optimizer state, step, the
  loader's position and the config, at every multiple of ``checkpoint.save_every``
  and at the last step, the last ``checkpoint.keep`` kept; only finite parameters
  are saved. A run restarts from its newest checkpoint that restores (a damaged one
  is reported and moved aside), otherwise from ``checkpoint.init_from`` params
  (fresh optimizer), otherwise from a seeded initialisation. Resumed runs see the
  same batches and compute the same losses as uninterrupted ones (bitwise on CPU);
  ``RUN_DIR/config.yaml`` is written once the start or restore succeeded;
- SIGTERM (preemption) and SIGINT (Ctrl-C) save at the current step and return
  ``preempted=True`` with the signal; one arriving at the last step just finishes;
- a non-finite loss or gradient norm raises ``NonFiniteLossError`` naming the step
  and the newest checkpoint, whose parameters are finite;
- process 0 prints a start-up summary, a progress line (elapsed time, ETA),
  ``RUN_DIR/metrics.jsonl`` and TensorBoard events (``RUN_DIR/tensorboard``) every
  ``log.every`` updates;
- on several hosts (``trainer.distributed``: cluster detection or ``LWM_*`` variables)
  the process joins the job first; every process reads its block of each batch and
  saves its own loader position (restorable on another process count); all of them
  stop together on a signal and on a non-finite loss (both decided from global
  values). ``run_dir`` may be shared storage (``gs://``): files go through
  ``trainer.run_files``, checkpoints through orbax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from schemas import storage
from trainer import checkpoint, distributed, run_dir
from trainer.evaluation import heldout_loss as evaluate
from trainer.training import optimizer
from trainer.config import TrainConfig, write_resolved
from trainer.training.loader import Loader
from trainer.loss import LossConfig, loss_and_metrics
from trainer.model import LWM, ModelConfig, abstract_params, init_params, param_shapes
from trainer.run_files import SyncedDir, SyncedFile
from trainer.sharding import activate, attention_fn, batch_sharding, make_mesh, param_shardings, validate

# Dense bf16 peak per chip, for the MFU estimate (vendor data sheets).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


class NonFiniteLossError(RuntimeError):
    """The loss, gradient norm or parameters became NaN or infinite; the run stopped without saving."""


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a run ended: the step reached, whether a signal stopped it (and which), its last logged metrics."""

    step: int
    preempted: bool
    metrics: dict[str, float]
    signum: int = 0


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
        self.run_dir, self.enabled, self.tensorboard = run_dir, enabled, tensorboard
        self.file = self.writer = None

    def open(self) -> None:
        """Opens the metrics file and TensorBoard writer (before the loop: importing TensorBoard takes seconds)."""
        if not self.enabled or self.file is not None:
            return
        self.file = SyncedFile(storage.join(self.run_dir, "metrics.jsonl"))
        if self.tensorboard:
            from tensorboardX import SummaryWriter

            self.events = SyncedDir(storage.join(self.run_dir, "tensorboard"))
            self.writer = SummaryWriter(self.events.local)

    def record(self, step: int, metrics: dict[str, float], tag_prefix: str = "") -> None:
        """One ``metrics.jsonl`` line and TensorBoard scalars (tags ``tag_prefix + name``)."""
        if not self.enabled:
            return
        self.open()
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.sync()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{tag_prefix}{name}", value, step)
            self.writer.flush()
            self.events.sync()

    def write(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """A training step's metrics: recorded under ``train/`` and printed as the progress line."""
        if not self.enabled:
            return
        self.record(step, metrics, "train/")
        vision = f"{metrics['vision_loss']:.4f}" if metrics.get("vision_weight") else "-"
        mfu = f"{100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "n/a"
        print(f"step {step}/{total} | loss {metrics['loss']:.4f} (text {metrics['text_loss']:.4f}, "
              f"vision {vision}) | lr {metrics['learning_rate']:.2e} | grad norm {metrics['grad_norm']:.3f} | "
              f"{metrics['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | elapsed {_duration(metrics['elapsed_s'])} "
              f"| ETA {_duration(metrics.get('eta_s'))}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
            self.events.close()


class _StopSignals:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C) while installed; ``requested()`` agrees across processes.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once, for a user who will not wait
    for the current step and the checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> int:
        """The signal number received (0: none); on several processes, the largest any received."""
        if jax.process_count() == 1:
            return self.signum
        return int(np.max(multihost_utils.process_allgather(np.array(self.signum))))

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def init_from_params(config: TrainConfig, shardings: Any) -> Any:
    """The newest params of ``checkpoint.init_from``, checked to fit this run's model."""
    source = config.checkpoint.init_from
    ckpt_dir = checkpoint.resolve_dir(source)
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


def _check_finite(micro: list[dict[str, jax.Array]], step: int, mngr) -> None:
    values = _host_metrics([{k: m[k] for k in ("loss", "grad_norm")} for m in micro])
    if not all(np.isfinite(v) for v in values.values()):
        raise NonFiniteLossError(f"non-finite training at step {step}: loss {values['loss']}, "
                                 f"grad norm {values['grad_norm']}; nothing saved, {_last_good(mngr)}")


def _last_good(mngr) -> str:
    # Only finite parameters are ever saved (``_save``), so the newest checkpoint is a good one.
    latest = mngr.latest_step()
    if latest is None:
        return "no checkpoint was saved before"
    return f"the last good checkpoint is step {latest} in {mngr.directory}"


def check_vocabulary(manifests: Sequence[Any], paths: Sequence[str], model: ModelConfig) -> None:
    """ValueError when a dataset may hold ids outside the model's vocabularies, naming both sizes.

    Reads the manifests (the tokenizer's size, the largest id per modality), so it
    costs nothing per step; the embedding lookup would otherwise clip such ids silently.
    """
    fields = {"text": "vocab_size", "vision": "vision_vocab_size"}
    for path, manifest in zip(paths, manifests):
        pieces = manifest.tokenizer.get("vocab_size")
        if pieces is not None and pieces > model.vocab_size:
            raise ValueError(f"{path}: its tokenizer has {pieces} pieces but model.vocab_size is {model.vocab_size}: "
                             f"set model.vocab_size to at least {pieces}, or make the data with a tokenizer "
                             f"of at most {model.vocab_size} pieces")
        for modality, largest in manifest.max_ids.items():
            size = getattr(model, fields[modality])
            if largest >= size:
                raise ValueError(f"{path}: holds {modality} id {largest}, outside model.{fields[modality]} "
                                 f"{size}: set it to at least {largest + 1} or use data made for this model")


class _Throughput:
    """Tokens/s (and MFU where the device's peak is known) since the previous call; elapsed time and ETA."""

    def __init__(self, config: TrainConfig, step: int):
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.flops_per_token = flops_per_token(config.model, config.data.seq_len)
        self.peak = peak_flops(jax.devices()[0], config.log.peak_tflops)
        self.total = config.steps
        self.start = self.time = time.perf_counter()
        self.step, self.first_done = step, None

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = self.tokens_per_step * (step - self.step) / (now - self.time)
        self.time, self.step = now, step
        # The first step of a process includes compilation: the ETA uses the pace of the steps since.
        if self.first_done is None:
            self.first_done = (step, now)
        done, since = self.first_done
        timing = {"tokens_per_s": rate, "elapsed_s": now - self.start}
        if step > done:
            timing["eta_s"] = (now - since) / (step - done) * (self.total - step)
        if self.peak:
            timing["mfu"] = rate * self.flops_per_token / (self.peak * jax.device_count())
        return timing


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def startup_summary(config: TrainConfig, mesh, manifests: Sequence[Any], origin: str) -> str:
    """A few lines saying what this run does: model, mesh, data, where it starts, where it writes."""
    m, d = config.model, config.data
    data = "; ".join(f"{ds.path} (proportion {ds.proportion:g}): {mf.records:,} records, {mf.tokens:,} tokens"
                     for ds, mf in zip(d.datasets, manifests))
    return "\n".join([
        f"model: {m.num_params() / 1e6:,.1f}M parameters (d_model {m.d_model}, {m.num_layers} layers, "
        f"vocab {m.vocab_size} text + {m.vision_vocab_size} vision)",
        f"mesh: {' x '.join(f'{k} {v}' for k, v in mesh.shape.items())} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)",
        f"data: {data}",
        f"run: {origin}; {config.steps} steps of {d.batch_size} x {d.seq_len} tokens; checkpoints every "
        f"{config.checkpoint.save_every} steps",
        f"run dir: {config.run_dir}" + (f"; tensorboard --logdir {os.path.join(config.run_dir, 'tensorboard')}"
                                        if config.log.tensorboard else ""),
    ])


def train(config: TrainConfig) -> TrainResult:
    """Runs ``config`` from its newest checkpoint (or from scratch) to ``config.steps``."""
    distributed.join()
    run_dir.check_writable(config.run_dir, checkpoint_bytes(config.model))
    log = MetricsLog(config.run_dir, jax.process_index() == 0, config.log.tensorboard)
    options = dict(max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.async_save)
    with checkpoint.train_manager(storage.join(config.run_dir, "checkpoints"), **options) as mngr:
        if mngr.latest_step() is not None:
            run_dir.check_resume(config, log.message)
        accum = config.optimizer.grad_accum_steps
        mesh = _mesh(config)
        validate(config.model, mesh, config.data.batch_size // accum, config.data.seq_len)
        loader = Loader(config.data, mesh, config.data.batch_size // accum, block=config.model.attention_block_q)
        try:
            check_vocabulary(loader.manifests, [d.path for d in config.data.datasets], config.model)
            with activate(mesh), _StopSignals() as stop:
                tx = optimizer.make(config.optimizer, config.steps)
                state_sh = _state_shardings(config.model, mesh, tx)
                step_fn = jax.jit(make_train_step(LWM(config.model, attention_fn(mesh, config.model)), tx, config.loss),
                                  in_shardings=(state_sh, batch_sharding(mesh)), out_shardings=(state_sh, None),
                                  donate_argnums=0)
                state, step, origin = _initial_state(config, mngr, loader, tx, state_sh, log)
                if step >= config.steps:  # finished: its final checkpoint restored (a damaged one was set aside)
                    log.message(f"{config.run_dir} is complete: checkpoint {step} of {config.steps} steps, nothing to "
                                f"do (to train further raise steps, e.g. --set steps={2 * config.steps})")
                    return TrainResult(step, False, {})
                if jax.process_index() == 0:
                    write_resolved(config)
                log.message(startup_summary(config, mesh, loader.manifests, origin))
                evaluator = evaluate.Evaluator.for_run(config, mesh, LWM(config.model, attention_fn(mesh, config.model)))
                log.open()
                return _loop(config, _Session(state, step_fn, loader, mngr, log, stop, evaluator), step)
        finally:
            log.close()
            loader.close()


def _mesh(config: TrainConfig):
    """``config.mesh`` over the devices; on CPU a device shortfall says how to simulate more."""
    try:
        return make_mesh(config.mesh)
    except ValueError as error:
        if jax.devices()[0].platform != "cpu":
            raise
        raise ValueError(f"{error}: on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         f"set before JAX starts (lwm train sets it from the mesh unless XLA_FLAGS has a count)"
                         ) from None


@dataclasses.dataclass
class _Session:
    """What the loop works with: the train state and the objects that move it, feed it, save it, report it."""

    state: TrainState
    step_fn: Callable
    loader: Loader
    mngr: Any
    log: MetricsLog
    stop: _StopSignals
    evaluator: Any = None  # trainer.evaluation.heldout_loss.Evaluator of the eval: section, if on


def _loop(config: TrainConfig, run: _Session, step: int) -> TrainResult:
    """Steps from ``step`` to ``config.steps``: update, check, log, stop on a signal, save on schedule."""
    lr = optimizer.schedule(config.optimizer, config.steps)
    batches = run.loader
    if jax.process_count() > 1 and step < config.steps:
        run.step_fn, batches = distributed.compile_together(run.step_fn, run.state, run.loader)
    throughput, last = _Throughput(config, step), {}
    while step < config.steps:
        micro = []
        for _ in range(config.optimizer.grad_accum_steps):
            run.state, metrics = run.step_fn(run.state, next(batches))
            micro.append(metrics)
        step += 1
        _check_finite(micro, step, run.mngr)
        if step % config.log.every == 0 or step == config.steps:
            last = {**_host_metrics(micro), "learning_rate": float(lr(step - 1)), **throughput(step)}
            run.log.write(step, config.steps, last)
        if run.evaluator is not None and evaluate.due(config.eval, step, config.steps):
            evaluate.log_metrics(run.log, step, run.evaluator(run.state.params))
        signum = run.stop.requested()
        if signum and step < config.steps:
            _save(config, run, step)
            run.mngr.wait_until_finished()
            run.log.message(f"{signal.Signals(signum).name}: saved checkpoint {step} in {run.mngr.directory}; "
                            f"exiting (run again to resume)")
            return TrainResult(step, True, last, signum)
        if step % config.checkpoint.save_every == 0 or step == config.steps:
            _save(config, run, step)
    run.mngr.wait_until_finished()
    run.log.message(f"finished {config.steps} steps; checkpoint {run.mngr.latest_step()} in {run.mngr.directory}")
    return TrainResult(step, False, last)


def _save(config: TrainConfig, run: _Session, step: int) -> None:
    """Saves checkpoint ``step``, refusing parameters that are not finite (so every checkpoint is a good one)."""
    if not bool(checkpoint.all_finite(run.state.params)):
        raise NonFiniteLossError(f"non-finite parameters after step {step}; nothing saved, {_last_good(run.mngr)}")
    checkpoint.save_train_state(
        run.mngr, step, params=run.state.params, opt_state=run.state.opt_state, model_config=config.model,
        data_iter=run.loader.iterator, train_config=config.to_dict(), force=True)


def checkpoint_bytes(model: ModelConfig) -> int:
    """Bytes of one checkpoint: parameters plus AdamW's two float32 moments."""
    return model.num_params() * (jnp.dtype(model.param_dtype).itemsize + 8)


def _initial_state(config: TrainConfig, mngr, loader: Loader, tx, state_sh: TrainState,
                   log: MetricsLog) -> tuple[TrainState, int, str]:
    """Resume from the newest checkpoint that restores, else init_from params, else a fresh init.

    Returns ``(state, step, origin)``, ``origin`` saying which in words.
    """
    restored = checkpoint.restore_newest_train_state(
        mngr, params=_abstract(param_shapes(config.model), state_sh.params),
        opt_state=_abstract(jax.eval_shape(tx.init, param_shapes(config.model)), state_sh.opt_state),
        data_iter=loader.iterator, micro_batches=config.optimizer.grad_accum_steps,
        damaged_dir=os.path.join(config.run_dir, "damaged_checkpoints"), report=log.message)
    if restored is not None:
        step, params, opt_state = restored
        log.message(f"resumed from checkpoint {step} in {mngr.directory}")
        return TrainState(params, opt_state), step, f"resumed from checkpoint {step}"
    if config.checkpoint.init_from:
        params = init_from_params(config, state_sh.params)
        origin = f"initialised params from {config.checkpoint.init_from} (fresh optimizer)"
    else:
        params = init_params(config.model, jax.random.key(config.seed), state_sh.params)
        origin = f"fresh start (seed {config.seed})"
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    return TrainState(params, opt_state), 0, origin
