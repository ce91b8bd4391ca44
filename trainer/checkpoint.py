"""On-disk checkpoints: one orbax ``CheckpointManager`` directory shared by every writer.

Layout: ``CKPT/<step>/<item>/`` for each saved step. Items every checkpoint has:
- ``params``: the model parameters (a pytree of arrays, ``StandardSave``);
- ``model_config``: ``trainer.model.ModelConfig`` as JSON, so a checkpoint alone
  says how to build its model.

Training adds its own items to the same steps (e.g. ``opt_state``, ``data_iter``,
``train_config``): build the manager with ``manager(ckpt_dir, item_names=
item_names("opt_state", ...))`` and save them in the same ``ocp.args.Composite``.
Readers of the model (``restore_params``, ``trainer.inference.predictor``, HF export) restore
only the two base items, whatever else a step holds.

Training checkpoints (``save_train_state`` / ``restore_train_state``) add
``opt_state`` (optax state, ``StandardSave``), ``data_iter`` (the Grain iterator's
position; every process writes its own ``process_<i>-of-<n>.json``, restorable on
another number of processes: ``trainer.training.data_position``) and
``train_config`` (the resolved ``trainer.config.TrainConfig`` as JSON). Steps are
written to a temporary name and renamed when complete (on object stores: a commit
marker written last), so a run killed mid-save resumes from the newest complete step
(``committed_steps`` lists them without starting JAX). A step that is complete by name but damaged
(a truncated array file, missing metadata) is reported in one line, moved aside to
``RUN_DIR/damaged_checkpoints/<step>`` (nothing is deleted, and the resumed run can
save that step number again) and the previous step restored instead
(``restore_newest_train_state``); the tracebacks orbax's abandoned reads of the
damaged step would print after that line are silenced.

With several processes every one of them calls these functions (orbax saves each
array's shards from the process that holds them; process 0 writes the metadata and
JSON items). ``ckpt_dir`` may be a ``gs://`` path: orbax reads and writes it itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from schemas import storage
from trainer.training.data_position import DataPositionError, DataPositionRestore, DataPositionSave
from trainer.model import ModelConfig, param_shapes

PARAMS = "params"
MODEL_CONFIG = "model_config"
OPT_STATE = "opt_state"
DATA_ITER = "data_iter"
TRAIN_CONFIG = "train_config"


def resolve_dir(path: str) -> str:
    """A checkpoint directory: ``path`` itself, or ``path/checkpoints`` when ``path`` is a run directory."""
    nested = storage.join(path, "checkpoints")
    return nested if storage.listdir(nested) else path


def item_names(*extra: str) -> tuple[str, ...]:
    """The base item names plus ``extra`` ones (training state), without duplicates."""
    names = (PARAMS, MODEL_CONFIG)
    return names + tuple(n for n in extra if n not in names)


def manager(ckpt_dir: str | os.PathLike, *, item_names: tuple[str, ...] = item_names(),
            **options: Any) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` on ``ckpt_dir`` with ``item_names`` registered.

    ``options`` go to ``ocp.CheckpointManagerOptions`` (``max_to_keep``,
    ``save_interval_steps``, ``enable_async_checkpointing``, ...). Close it (or use
    it as a context manager) so asynchronous saves finish.
    """
    opts = ocp.CheckpointManagerOptions(**{"create": True, **options})
    return ocp.CheckpointManager(storage.absolute(os.fspath(ckpt_dir)), item_names=item_names, options=opts)


def save_params(ckpt_dir: str | os.PathLike, params: Any, model_config: ModelConfig, step: int = 0) -> None:
    """Writes ``params`` and ``model_config`` as checkpoint ``step`` (blocking)."""
    with manager(ckpt_dir, enable_async_checkpointing=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
        }))
        mngr.wait_until_finished()


def _resolve_step(mngr: ocp.CheckpointManager, ckpt_dir, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise ValueError(f"no checkpoint found in {os.fspath(ckpt_dir)!r}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ValueError(f"step {step} not in checkpoint {os.fspath(ckpt_dir)!r}; steps: {sorted(steps)}")
    return step


def committed_steps(ckpt_dir: str) -> list[int]:
    """The steps of ``ckpt_dir`` that orbax committed, ascending; no manager, so no JAX backend starts.

    On a local disk orbax saves a step under a temporary name and renames it when
    complete; ``ocp.utils.checkpoint_steps`` lists the finalized ones. An object store
    cannot rename a folder, so there orbax writes the step under its final name and, last,
    the commit marker ``ocp.path.atomicity.COMMIT_SUCCESS_FILE``: a step folder without
    it is a save that was cut off, whatever its name says.
    """
    if storage.is_local(ckpt_dir):
        path = storage.absolute(ckpt_dir)
        return sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []
    marker = ocp.path.atomicity.COMMIT_SUCCESS_FILE
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(ckpt_dir))
    return sorted(int(n) for n in names if n.isdigit() and storage.exists(storage.join(ckpt_dir, n, marker)))


def _check_exists(ckpt_dir: str | os.PathLike) -> None:
    # Object stores have no folders: a checkpoint directory there exists when it lists something.
    if not storage.listdir(os.fspath(ckpt_dir)):
        raise ValueError(f"checkpoint directory {os.fspath(ckpt_dir)!r} does not exist or is empty")


def latest_step(ckpt_dir: str | os.PathLike) -> int:
    """The newest step saved in ``ckpt_dir`` (ValueError if none)."""
    _check_exists(ckpt_dir)
    with manager(ckpt_dir, create=False, read_only=True) as mngr:
        return _resolve_step(mngr, ckpt_dir, None)


def restore_model_config(ckpt_dir: str | os.PathLike, step: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` saved with ``step`` (default: the latest)."""
    _check_exists(ckpt_dir)
    with manager(ckpt_dir, create=False, read_only=True) as mngr:
        step = _resolve_step(mngr, ckpt_dir, step)
        restored = mngr.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
    return ModelConfig.from_dict(dict(restored[MODEL_CONFIG]))


def restore_params(ckpt_dir: str | os.PathLike, step: int | None = None,
                   sharding: Any = None) -> tuple[Any, ModelConfig]:
    """Parameters and model config of ``step`` (default: the latest).

    ``sharding`` places the arrays: a pytree of ``jax.sharding.Sharding`` matching
    the parameters (e.g. ``trainer.sharding.param_shardings``), or None for the
    default device.
    """
    model_config = restore_model_config(ckpt_dir, step)
    shapes = param_shapes(model_config)
    if sharding is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding = jax.tree.map(lambda _: device, shapes)
    targets = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)
    with manager(ckpt_dir, create=False, read_only=True) as mngr:
        step = _resolve_step(mngr, ckpt_dir, step)
        restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(targets)}))
    return restored[PARAMS], model_config


def train_manager(ckpt_dir: str | os.PathLike, **options: Any) -> ocp.CheckpointManager:
    """A ``manager`` with the training items registered; ``options`` as for ``manager``."""
    return manager(ckpt_dir, item_names=item_names(OPT_STATE, DATA_ITER, TRAIN_CONFIG), **options)


def save_train_state(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
                     model_config: ModelConfig, data_iter: grain.DatasetIterator,
                     train_config: dict[str, Any], force: bool = False) -> bool:
    """Saves everything a run needs to continue as checkpoint ``step``; False if the interval skipped it.

    ``data_iter`` must stand exactly after the last batch that step consumed.
    """
    return mngr.save(step, force=force, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
        DATA_ITER: DataPositionSave(data_iter),
        TRAIN_CONFIG: ocp.args.JsonSave(train_config),
    }))


def restore_train_state(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
                        data_iter: grain.DatasetIterator, data_position: int) -> tuple[Any, Any]:
    """Restores ``step``: returns ``(params, opt_state)`` and moves ``data_iter`` to its saved position.

    ``params`` and ``opt_state`` are targets: pytrees of ``jax.ShapeDtypeStruct``
    carrying the shardings to restore onto (any mesh: orbax reshards).
    ``data_position``: micro-batches consumed by ``step``, used where the saved
    position was written by another topology (``trainer.training.data_position``).
    """
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(params),
        OPT_STATE: ocp.args.StandardRestore(opt_state),
        DATA_ITER: DataPositionRestore(data_iter, data_position),
    }))
    return restored[PARAMS], restored[OPT_STATE]


def restore_newest_train_state(mngr: ocp.CheckpointManager, *, params: Any, opt_state: Any,
                               data_iter: grain.DatasetIterator, micro_batches: int, damaged_dir: str,
                               report: Callable[[str], None]) -> tuple[int, Any, Any] | None:
    """Restores the newest step that restores: ``(step, params, opt_state)``, or None without checkpoints.

    A step that fails (any error of the storage layer) is reported through ``report``
    in one line naming its step and path and the next older one tried; once one
    restores, the failed ones are moved into ``damaged_dir``. ValueError when every
    step fails (nothing moved). ``micro_batches`` per step gives each step's data
    position; the other arguments as for ``restore_train_state``. A data position that
    cannot be moved to this topology (``DataPositionError``) is no damage: it is raised.
    """
    _quiet_leftovers_of_failed_restores()
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = os.path.join(os.fspath(mngr.directory), str(step), "")
        _FAILED_RESTORES.add(step_dir)  # before trying: leftovers can print before ``except`` runs
        try:
            restored = restore_train_state(mngr, step, params=params, opt_state=opt_state, data_iter=data_iter,
                                           data_position=step * micro_batches)
        except DataPositionError:
            raise
        except Exception as error:  # tensorstore, orbax and JSON raise many types; any failure means damaged
            reason = " ".join(str(error).split()).split(". See full")[0][:160] or type(error).__name__
            report(f"checkpoint {step} in {mngr.directory} cannot be restored: {reason}")
            damaged.append(step)
            continue
        _FAILED_RESTORES.discard(step_dir)
        if damaged:
            _move_aside(mngr, damaged, damaged_dir)
            report(f"fell back to checkpoint {step}, the newest that restores; moved the damaged "
                   f"step(s) {damaged} to {damaged_dir}")
        return (step, *restored)
    if damaged:
        raise ValueError(f"no checkpoint in {mngr.directory} restores (steps {sorted(damaged)} failed, see above): "
                         f"move them away to start afresh, or start a new run_dir from other weights with "
                         f"checkpoint.init_from")
    return None


def _quiet_leftovers_of_failed_restores() -> None:
    """Silences what a failed restore leaves behind; every other error still prints.

    Orbax runs a restore on an event loop that it closes as soon as the first array
    read fails, abandoning the reads still in flight. Python then prints a traceback
    for each of them after our one-line report of the damaged step, in several ways:
    tensorstore waking the closed loop when a read finishes (``RuntimeError: Event
    loop is closed`` from ``call_soon_threadsafe``), the garbage collector closing an
    abandoned read, and asyncio logging reads that failed after nobody was listening
    ("... exception was never retrieved"). Once a restore has been tried and failed
    (``_FAILED_RESTORES``), such an error is dropped when it wakes a closed loop or
    names a failed step's directory; their results are discarded anyway. Installed
    once per process.
    """
    previous = sys.unraisablehook
    if getattr(previous, "quiets_failed_restores", False):
        return

    def hook(unraisable) -> None:
        if not _left_by_failed_restore(unraisable.exc_value):
            previous(unraisable)

    hook.quiets_failed_restores = True
    sys.unraisablehook = hook
    if _keep_log_record not in logging.getLogger("asyncio").filters:
        logging.getLogger("asyncio").addFilter(_keep_log_record)


def _keep_log_record(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _left_by_failed_restore(record.exc_info[1]))


_FAILED_RESTORES: set[str] = set()  # step directories (ending in a separator) whose restore failed


def _left_by_failed_restore(error: BaseException | None) -> bool:
    if not _FAILED_RESTORES:  # no restore has failed (or is being tried): nothing to silence
        return False
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return "call_soon_threadsafe" in {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return any(step_dir in str(e) for e in chain for step_dir in _FAILED_RESTORES)


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int], damaged_dir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(damaged_dir, exist_ok=True)
        for step in steps:
            target = os.path.join(damaged_dir, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(os.fspath(mngr.directory), str(step)), target)
    mngr.reload()


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True when every array of ``tree`` holds only finite values (one fused pass)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def restore_train_config(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The resolved training config saved with ``step`` (default: the latest), as a mapping."""
    with train_manager(ckpt_dir, create=False, read_only=True) as mngr:
        step = _resolve_step(mngr, ckpt_dir, step)
        restored = mngr.restore(step, args=ocp.args.Composite(**{TRAIN_CONFIG: ocp.args.JsonRestore()}))
    return dict(restored[TRAIN_CONFIG])
