"""The run directory, checked before any work: writable, and a resume that can honour its config.

``RUN_DIR`` holds ``config.yaml`` (the resolved config of the run, written once a
fresh start or a restore has succeeded), ``checkpoints/``, ``metrics.jsonl`` and
``tensorboard/``. Running ``lwm train`` again on the same ``run_dir`` resumes it.

On resume the new config is compared with ``config.yaml``. Settings that only
steer what comes next (learning rate, steps, logging, checkpoint interval, RoPE
theta, ...) may change: each change is reported. Settings that the saved state
cannot follow are refused (``ValueError``) before anything is restored:

- the parameters' shapes and dtype (``model.vocab_size``, ``d_model``, ...): the
  checkpoint does not fit the new model;
- the data order (``data.datasets``, ``seq_len``, ``batch_size``, ``seed``,
  ``optimizer.grad_accum_steps``): the saved loader position would point into
  another stream. The mesh and the number of processes may change: the position is
  global (``trainer.training.data_position``).

A new run is a new ``run_dir``; ``checkpoint.init_from`` starts it from the old
run's weights.
"""

from __future__ import annotations

import shutil
from typing import Any, Callable, Mapping

import yaml

from schemas import storage
from trainer.config import CONFIG_NAME, TrainConfig

SHAPE_KEYS = tuple(f"model.{k}" for k in ("vocab_size", "vision_vocab_size", "d_model", "num_layers", "num_heads",
                                          "num_kv_heads", "mlp_dim", "param_dtype"))
DATA_ORDER_KEYS = ("data.datasets", "data.seq_len", "data.batch_size", "data.seed", "optimizer.grad_accum_steps")


def check_writable(run_dir: str, needed_bytes: int = 0) -> None:
    """ValueError unless ``run_dir`` can be created and written, with ``needed_bytes`` free (local paths)."""
    if "://" in run_dir:
        return
    try:
        storage.probe_writable(run_dir)
    except OSError as error:
        raise ValueError(f"run_dir {run_dir} is not writable ({error.strerror}): choose another with "
                         f"--set run_dir=DIR or fix its permissions") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ValueError(f"run_dir {run_dir} has {free / 2**30:.1f} GiB free, but one checkpoint needs "
                         f"{needed_bytes / 2**30:.1f} GiB: free space or choose another run_dir")


def saved_config(run_dir: str) -> dict[str, Any] | None:
    """The mapping in ``RUN_DIR/config.yaml`` (any filesystem), or None when the run has none."""
    path = storage.join(run_dir, CONFIG_NAME)
    if not storage.exists(path):
        return None
    return yaml.safe_load(storage.read_bytes(path))


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Mapping[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` for every setting that differs."""
    old, new = _flatten(saved), _flatten(config.to_dict())
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def refused_changes(changes: Mapping[str, Any]) -> list[str]:
    """The keys of ``changes`` that a resume cannot honour (module docstring)."""
    return [k for k in changes if k.startswith(SHAPE_KEYS + DATA_ORDER_KEYS)]


def check_resume(config: TrainConfig, report: Callable[[str], None]) -> None:
    """Reports the settings changed since ``config.yaml``; ValueError for those a resume cannot honour."""
    saved = saved_config(config.run_dir)
    if saved is None:
        return
    changes = config_changes(saved, config)
    refused = refused_changes(changes)

    def listed(keys):
        return ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)

    if refused:
        raise ValueError(
            f"cannot resume {config.run_dir} with changed {listed(refused)}: its checkpoints hold another model "
            f"shape or data order. Restore those settings, or start a new run with --set run_dir=NEW_DIR "
            f"(and --set checkpoint.init_from={config.run_dir} to start from this run's weights)")
    if changes:
        report(f"resuming with changed settings: {listed(changes)}")
