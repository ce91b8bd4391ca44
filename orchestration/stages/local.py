"""The ``local`` backend: a stage is `lwm train RUN_DIR/stage.yaml` in a child process on this machine.

The child, not this process, owns the accelerator (a TPU host's chips can be held
by one process only), so this process never starts a JAX backend: the device count
is probed in a short child too (``devices_for``). SIGTERM or SIGINT to this process
is forwarded to the child as SIGTERM, which saves a checkpoint and exits 143
(``PREEMPTED``); a non-finite loss makes the child exit 4 (``NON_FINITE``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
from typing import Sequence

from orchestration.stages.plan import Stage

PREEMPTED = 128 + signal.SIGTERM
NON_FINITE = 4  # `lwm train`'s status when the loss, gradient norm or parameters became NaN or infinite
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # XLA's simulated CPU devices, as `lwm train` sets it


def train_argv(config_path: str, processes: int) -> list[str]:
    """The child's command line for one stage."""
    argv = [sys.executable, "-m", "orchestration.cli", "train", config_path]
    if processes > 1:
        argv += ["--processes", str(processes)]
    return argv


@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices each stage's training process gets (``counts``, by stage name). ``simulated``: on
    CPU with no device count in ``XLA_FLAGS``, each stage's process simulates its own count."""

    counts: dict[str, int]
    simulated: bool = False

    def env(self, stage: str) -> dict[str, str] | None:
        """The environment of ``stage``'s process: this one's, with its simulated device count (None: as is)."""
        if not self.simulated:
            return None
        flags = os.environ.get("XLA_FLAGS", "")
        return {**os.environ, "XLA_FLAGS": f"{flags} {DEVICE_COUNT_FLAG}={self.counts[stage]}".strip()}


def devices_for(stages: Sequence[Stage]) -> Devices:
    """Devices the stages' training processes get on this machine.

    Counted in a short child process. On CPU without a simulated device count in
    ``XLA_FLAGS`` (where `lwm train` alone would simulate its mesh's), each stage
    simulates the devices of its own mesh, as `lwm train` would: a one-device stage
    is not slowed by seven idle peers. A mesh with a ``-1`` axis gets the largest
    fixed mesh of ``stages``. Otherwise every stage gets the devices counted.
    """
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise ValueError(f"could not count this machine's JAX devices: {out.stderr.strip().splitlines()[-1:]}")
    platform, count = out.stdout.split()[-2:]
    if platform != "cpu" or DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return Devices({s.name: int(count) for s in stages})
    fixed = {s.name: math.prod(n for n in s.config.mesh.as_tuple() if n != -1) for s in stages}
    largest = max(fixed.values())
    return Devices({s.name: largest if -1 in s.config.mesh.as_tuple() else fixed[s.name] for s in stages},
                   simulated=True)


class Signals:
    """While active, SIGTERM/SIGINT are recorded and forwarded (as SIGTERM) to the running child."""

    def __init__(self):
        self.received = False
        self.child: subprocess.Popen | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True
        print(f"lwm stages: {signal.Signals(signum).name}: stopping the running stage (it saves first)", flush=True)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Runs ``argv`` (in ``env``, default this process's) to its end, in its own session so terminal
        signals reach it only through us.

        Returns its exit status, ``128 + N`` when signal N killed it (as a shell reports it).
        """
        self.child = subprocess.Popen(argv, start_new_session=True, env=env)
        if self.received:
            self.child.send_signal(signal.SIGTERM)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        return 128 - code if code < 0 else code

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
