"""Joining a job of several processes (one per host) through ``jax.distributed``.

A process learns that it is one of several, and how to reach the others, from:

- explicit variables, all three or none: ``LWM_COORDINATOR`` (``host:port`` of process
  0's coordinator service), ``LWM_NUM_PROCESSES`` and ``LWM_PROCESS_ID`` (0-based).
  ``lwm train --processes N`` (``orchestration.launch``) sets them; any other launcher can;
- otherwise JAX's own cluster detection, as ``jax.distributed.initialize()`` does without
  arguments: Cloud TPU VMs and pods (metadata server), GKE TPU JobSets, SLURM, Open MPI,
  Kubernetes (with the ``jax[k8s]`` extra).

On CPU the collectives between processes run over gloo (``jax_cpu_collectives_implementation``),
which is how several processes are tested on one machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import orbax.checkpoint as ocp

COORDINATOR = "LWM_COORDINATOR"
NUM_PROCESSES = "LWM_NUM_PROCESSES"
PROCESS_ID = "LWM_PROCESS_ID"
COMPILE_BARRIER_S = 1800  # how long processes wait for each other to finish compiling the train step


@dataclasses.dataclass(frozen=True)
class Join:
    """How this process joins the job: ``cluster`` names the environment ("explicit" for ``LWM_*``).

    Unset fields are left to JAX's detection of ``cluster``.
    """

    cluster: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def explicit_join(env: Mapping[str, str]) -> Join | None:
    """The ``LWM_*`` variables of ``env`` as a ``Join``; None when unset; ValueError when partial or bad."""
    values = {name: env.get(name, "") for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)}
    given = [name for name, value in values.items() if value]
    if not given:
        return None
    if len(given) < 3:
        missing = sorted(set(values) - set(given))
        raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} not: set all three to join a job")
    host, _, port = values[COORDINATOR].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{COORDINATOR}={values[COORDINATOR]!r} is not HOST:PORT")
    if not values[NUM_PROCESSES].isdigit() or int(values[NUM_PROCESSES]) < 1:
        raise ValueError(f"{NUM_PROCESSES}={values[NUM_PROCESSES]!r} is not a positive integer")
    count = int(values[NUM_PROCESSES])
    if not values[PROCESS_ID].isdigit() or int(values[PROCESS_ID]) >= count:
        raise ValueError(f"{PROCESS_ID}={values[PROCESS_ID]!r} is not an integer in [0, {count})")
    return Join("explicit", values[COORDINATOR], count, int(values[PROCESS_ID]))


def detected_cluster() -> str | None:
    """The cluster environment JAX's ``initialize()`` would detect here (its class name), or None."""
    # JAX exposes its detection only inside initialize(); its registry of environments is
    # the one source of truth for which clusters exist, so it is read here.
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def multihost_environment(env: Mapping[str, str] = os.environ) -> Join | None:
    """How this process joins a job of several processes, or None when it runs alone."""
    explicit = explicit_join(env)
    if explicit is not None:
        return explicit
    cluster = detected_cluster()
    return Join(cluster) if cluster else None


def join(env: Mapping[str, str] = os.environ) -> Join | None:
    """Joins the job ``multihost_environment`` describes (once per process); returns how, or None."""
    how = multihost_environment(env)
    if how is not None and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(how.coordinator, how.num_processes, how.process_id)
    return how


def compile_together(step_fn: Any, state: Any, batches: Iterator[Any]) -> tuple[Callable, Iterator[Any]]:
    """``step_fn`` (jitted) compiled for ``state`` and the next batch, then a wait for every process.

    The first run of a program opens its gloo contexts, which fail when a peer arrives
    more than 30 s later (a slower compile, a compilation-cache miss on one host); the
    coordination service's barrier here has a long timeout instead. Returns the compiled
    step and the batches, the one peeked at first.
    """
    first = next(batches)
    compiled = step_fn.lower(state, first).compile()
    ocp.multihost.sync_global_processes("lwm_train_step_compiled", timeout=COMPILE_BARRIER_S)
    return compiled, itertools.chain([first], batches)
