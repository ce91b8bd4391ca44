"""One training job as N local processes: ``lwm train CONFIG --processes N``.

Each process is ``lwm train CONFIG`` joined to the others through the ``LWM_*``
variables of ``trainer.distributed`` (coordinator on a free local port, ids 0..N-1),
with ``D/N`` simulated CPU devices, where D is the number of devices the config's mesh
needs: N hosts of a pod, simulated on one machine. The launcher

- streams process 0's output and writes every process's to ``RUN_DIR/logs/process-{i}.log``;
- forwards SIGTERM and SIGINT to every process (a second one kills them);
- when a process fails (an exit code other than 0, 130 or 143, or a signal), stops the others
  at once, instead of letting them wait out the distributed runtime's heartbeat
  timeout, and names the process, how it ended and its last log lines;
- leaves no process of the job running when it returns.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from schemas import storage
from trainer import config as config_lib
from trainer import distributed
from trainer.run_files import SyncedFile
from trainer.sharding import dcn_shape

ORDERLY_EXITS = (0, 130, 143)  # finished, or stopped after SIGINT / SIGTERM (all processes agree on it)
GRACE_S = 2.0  # how long the others may take to end by themselves after one fails
TAIL_LINES = 20
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def devices_needed(mesh: config_lib.MeshConfig, env: Mapping[str, str]) -> int:
    """The devices the mesh needs: its size, or for a ``-1`` axis the devices ``XLA_FLAGS`` simulates."""
    sizes = mesh.as_tuple()
    if -1 not in sizes:
        return math.prod(sizes)
    simulated = _DEVICE_COUNT.search(env.get("XLA_FLAGS", ""))
    if not simulated:
        raise ValueError(f"mesh {dict(zip(('dp', 'fsdp', 'sp', 'tp'), sizes))} has a -1 axis: give every axis a "
                         "size (or set XLA_FLAGS=--xla_force_host_platform_device_count=D) so that the launcher "
                         "knows how many devices to simulate")
    return int(simulated[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(env: Mapping[str, str], devices: int, coordinator: str, count: int, index: int) -> dict[str, str]:
    """The environment of process ``index``: ``devices`` CPU devices and the ``LWM_*`` join variables."""
    flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).strip()
    return {**env, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", distributed.COORDINATOR: coordinator,
            distributed.NUM_PROCESSES: str(count), distributed.PROCESS_ID: str(index)}


def how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """A child's return code as a shell exit status (128 + signal for a signal)."""
    return 128 - code if code < 0 else code


@dataclasses.dataclass
class _Process:
    index: int
    popen: subprocess.Popen
    log: SyncedFile
    tail: collections.deque
    readers: list[threading.Thread]


def _pump(stream: IO[str], process: _Process, lock: threading.Lock, echo: IO[str] | None) -> None:
    """Copies ``stream`` line by line to the process's log, its tail and (process 0) ``echo``."""
    for line in stream:
        with lock:
            process.log.write(line)
            process.tail.append(line.rstrip("\n"))
        if echo is not None:
            echo.write(line)
            echo.flush()


def _start(index: int, command: list[str], env: dict[str, str], log_path: str,
           stdout: IO[str], stderr: IO[str]) -> _Process:
    first = index == 0
    log = SyncedFile(log_path)  # before the process starts: a log that cannot be written leaves nothing running
    popen = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, bufsize=1,
                             stderr=subprocess.PIPE if first else subprocess.STDOUT, start_new_session=True)
    process = _Process(index, popen, log, collections.deque(maxlen=TAIL_LINES), [])
    lock = threading.Lock()
    streams = [(popen.stdout, stdout if first else None)] + ([(popen.stderr, stderr)] if first else [])
    for stream, echo in streams:
        reader = threading.Thread(target=_pump, args=(stream, process, lock, echo), daemon=True)
        reader.start()
        process.readers.append(reader)
    return process


def _kill_group(process: _Process) -> None:
    """SIGKILL to the process and everything it started (Grain workers); fine if already gone."""
    try:
        os.killpg(process.popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _watch(processes: list[_Process], ended: queue.Queue) -> None:
    for process in processes:
        threading.Thread(target=lambda p=process: ended.put((p.index, p.popen.wait())), daemon=True).start()


def launch(config_path: str | None, overrides: Sequence[str] = (), processes: int = 2, *,
           env: Mapping[str, str] | None = None, stdout: IO[str] | None = None,
           stderr: IO[str] | None = None) -> int:
    """Runs ``lwm train config_path --set overrides...`` as ``processes`` local processes; returns the exit status.

    0 when every process finished, 143 (130) when they stopped after SIGTERM (SIGINT),
    else the failed process's status (128 + signal when killed), with a
    message on ``stderr``. ValueError (before anything starts) when the mesh's
    devices do not split over ``processes`` or its hosts do not fit ``mesh.dcn``.
    """
    env = dict(os.environ if env is None else env)
    config = config_lib.load(config_path, overrides)
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, got {processes}")
    devices = devices_needed(config.mesh, env)
    if devices % processes:
        raise ValueError(f"the mesh needs {devices} devices, which do not split over {processes} processes")
    dcn_shape(config.mesh, config.mesh.resolve(devices), processes)
    command = [sys.executable, "-m", "orchestration.cli", "train"] + ([config_path] if config_path else [])
    for override in overrides:
        command += ["--set", override]
    return run_processes(command, processes, devices // processes, storage.join(config.run_dir, "logs"),
                         env=env, stdout=stdout, stderr=stderr)


def run_processes(command: Sequence[str], processes: int, devices: int, logs: str, *,
                  env: Mapping[str, str] | None = None, stdout: IO[str] | None = None,
                  stderr: IO[str] | None = None) -> int:
    """Runs ``command`` as ``processes`` joined processes of ``devices`` CPU devices each; as ``launch``.

    ``logs``: the folder (any filesystem) for ``process-{i}.log``.
    """
    env = dict(os.environ if env is None else env)
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    coordinator = f"127.0.0.1:{free_port()}"
    stdout.write(f"lwm train: {processes} processes x {devices} CPU devices, coordinator {coordinator}, "
                 f"logs in {logs}\n")
    stdout.flush()
    started: list[_Process] = []
    try:
        with _Forwarder(started):
            for i in range(processes):
                started.append(_start(i, list(command), process_env(env, devices, coordinator, processes, i),
                                      storage.join(logs, f"process-{i}.log"), stdout, stderr))
            return _supervise(started, stderr, logs)
    finally:
        for process in started:
            _kill_group(process)
            process.popen.wait()
            for reader in process.readers:
                reader.join(timeout=5)
            process.log.close()


def _supervise(processes: list[_Process], stderr: IO[str], logs: str) -> int:
    """Waits for every process; on the first failure stops the rest and reports it."""
    ended: queue.Queue = queue.Queue()
    _watch(processes, ended)
    codes: dict[int, int] = {}
    while len(codes) < len(processes):
        try:
            index, code = ended.get(timeout=0.5)
        except queue.Empty:
            continue
        codes[index] = code
        if exit_status(code) not in ORDERLY_EXITS:
            _stop_others(processes, index)
            failed = processes[index]
            for reader in failed.readers:
                reader.join(timeout=5)
            tail = "\n".join(f"    {line}" for line in failed.tail)
            stderr.write(f"lwm train: process {index} of {len(processes)} {how_it_ended(code)}; stopped the "
                         f"other processes. Its last log lines ({storage.join(logs, f'process-{index}.log')}):\n"
                         f"{tail}\n")
            stderr.flush()
            return exit_status(code)
    statuses = {exit_status(c) for c in codes.values()}
    return max(statuses)


def _stop_others(processes: list[_Process], failed: int) -> None:
    """Lets the others end by themselves for ``GRACE_S`` (a shared failure, e.g. NaN), then kills them."""
    deadline = time.monotonic() + GRACE_S
    for process in processes:
        if process.index == failed:
            continue
        try:
            process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill_group(process)


class _Forwarder:
    """While active, SIGTERM and SIGINT go to every process; a second signal kills them."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, processes: list[_Process]):
        self.processes = processes
        self.received = False
        self.previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        for process in self.processes:
            if self.received:
                _kill_group(process)
            elif process.popen.poll() is None:
                process.popen.send_signal(signum)
        self.received = True

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
