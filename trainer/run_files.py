"""Files a run appends to (metrics, logs, TensorBoard events) in a run directory that may be remote.

On a pod the run directory is shared storage (``gs://``). Object stores cannot append,
so a file there is kept as a local copy that grows and is uploaded (through
``schemas.storage``) by ``sync()`` at most once every ``every_s`` seconds (default
``SYNC_EVERY_S``), and always by ``close()``: a log line every step does not re-upload
the whole file every step. A folder uploads only the files that changed since their
last upload. A local run directory is written in place. A file that already exists (a
resumed run) is continued, not replaced.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
import time

from schemas import storage

SYNC_EVERY_S = 60.0


def _local_place(path: str) -> tuple[str, str | None]:
    """(local path to write, scratch folder to remove later or None) for ``path``."""
    if storage.is_local(path):
        return storage.absolute(path), None
    storage.makedirs(path.rstrip("/").rsplit("/", 1)[0])  # a no-op on object stores
    scratch = tempfile.mkdtemp(prefix="lwm-run-")
    return os.path.join(scratch, path.rstrip("/").rsplit("/", 1)[-1]), scratch


class _Throttle:
    """True at most once every ``every_s`` seconds (and on the first call)."""

    def __init__(self, every_s: float, clock=time.monotonic):
        self.every_s, self.clock, self.last = every_s, clock, None

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return False
        self.last = now
        return True


class SyncedFile:
    """A text file appended to locally and copied to ``path`` by ``sync()`` (``path`` itself when local)."""

    def __init__(self, path: str, every_s: float = SYNC_EVERY_S, clock=time.monotonic):
        self.path = path
        self.throttle = _Throttle(every_s, clock)
        self.local, self.scratch = _local_place(path)
        os.makedirs(os.path.dirname(self.local), exist_ok=True)
        if self.scratch and storage.exists(path):
            with storage.open(path, "rb") as source, builtins.open(self.local, "wb") as target:
                shutil.copyfileobj(source, target)
        self.file = builtins.open(self.local, "a")

    def write(self, text: str) -> None:
        self.file.write(text)

    def sync(self, force: bool = False) -> None:
        """Flushes; on an object store uploads the file if ``every_s`` passed since the last upload (or ``force``)."""
        self.file.flush()
        if self.scratch and (self.throttle.due() or force):
            storage.upload(self.local, self.path)

    def close(self) -> None:
        self.sync(force=True)
        self.file.close()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class SyncedDir:
    """A folder written locally (e.g. by TensorBoard's writer) and copied to ``path`` by ``sync()``: the files
    changed since their last upload, at most once every ``every_s`` seconds."""

    def __init__(self, path: str, every_s: float = SYNC_EVERY_S, clock=time.monotonic):
        self.path = path
        self.throttle = _Throttle(every_s, clock)
        self.uploaded: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when last uploaded
        self.local, self.scratch = _local_place(path)
        os.makedirs(self.local, exist_ok=True)
        if self.scratch:
            storage.makedirs(path)

    def sync(self, force: bool = False) -> None:
        if not self.scratch or not (self.throttle.due() or force):
            return
        for name in sorted(os.listdir(self.local)):
            local = os.path.join(self.local, name)
            stat = os.stat(local)
            if self.uploaded.get(name) != (stat.st_size, stat.st_mtime_ns):
                storage.upload(local, storage.join(self.path, name))
                self.uploaded[name] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.sync(force=True)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
