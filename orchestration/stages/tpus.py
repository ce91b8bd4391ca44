"""TPU slices as GKE schedules them: accelerator label values, topologies, hosts and chips per host.

A GKE TPU node pool is chosen by two node labels: ``cloud.google.com/gke-tpu-accelerator``
(the generation, ``GENERATIONS``) and ``cloud.google.com/gke-tpu-topology`` (``AxBxC`` for
v4 and v5p, ``AxB`` for v5e and v6e). A slice of one chip is one host with that chip;
every other slice is made of hosts of 4 chips each (the ``*-4t`` machine types), as xpk
lays out its workloads. A Cloud TPU type name such as ``v4-32`` is not a label value
(it counts TensorCores, two per v4 or v5p chip): it is refused with the label and the
chip count to use instead.
"""

from __future__ import annotations

import dataclasses
import math
import re

CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation on GKE: its accelerator label value, topology rank, and TPU-type prefix."""

    label: str
    dims: int  # 3: AxBxC (v4, v5p); 2: AxB (v5e, v6e)
    type_prefix: str  # the Cloud TPU type's prefix, as in v5litepod-16
    cores_per_chip: int  # Cloud TPU type names count TensorCores


GENERATIONS = {g.label: g for g in (
    Generation("tpu-v4-podslice", 3, "v4", 2),
    Generation("tpu-v5p-slice", 3, "v5p", 2),
    Generation("tpu-v5-lite-podslice", 2, "v5litepod", 1),
    Generation("tpu-v6e-slice", 2, "v6e", 1),
)}
_TPU_TYPE = re.compile(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)")


def generation(accelerator: str) -> Generation:
    """The generation of a GKE accelerator label value; ValueError naming the valid values."""
    if accelerator in GENERATIONS:
        return GENERATIONS[accelerator]
    valid = ", ".join(GENERATIONS)
    match = _TPU_TYPE.fullmatch(accelerator)
    if match:
        prefix = "v5litepod" if match[1] == "v5e" else match[1]
        gen = next(g for g in GENERATIONS.values() if g.type_prefix == prefix)
        chips = int(match[2]) // gen.cores_per_chip
        raise ValueError(f"--accelerator {accelerator} is a Cloud TPU type, not a GKE node label: use "
                         f"--accelerator {gen.label} and a --topology of {chips} chips")
    raise ValueError(f"--accelerator {accelerator!r} is not a GKE TPU accelerator label; use one of {valid}")


def chips(gen: Generation, topology: str) -> int:
    """Chips of a ``topology`` of ``gen``; ValueError when it is not ``gen``'s form."""
    form = "x".join("ABC"[:gen.dims])
    parts = topology.split("x")
    if len(parts) != gen.dims or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--topology {topology!r} is not a {gen.label} topology: give {form} (positive integers)")
    return math.prod(int(p) for p in parts)


def hosts(gen: Generation, topology: str) -> int:
    """Hosts (GKE nodes, one pod each) of one slice: 1 for one chip, else a host per 4 chips."""
    count = chips(gen, topology)
    if count == 1:
        return 1
    if count % CHIPS_PER_HOST:
        raise ValueError(f"--topology {topology} has {count} chips, which do not fill hosts of "
                         f"{CHIPS_PER_HOST} chips on {gen.label}")
    return count // CHIPS_PER_HOST


def chips_per_host(gen: Generation, topology: str) -> int:
    return chips(gen, topology) // hosts(gen, topology)
