"""Files a run appends to (metrics, logs, TensorBoard events) in a run directory that may be remote.

On a pod the run directory is shared storage (``gs://``). Object stores cannot append,
so a file there is kept as a local copy that grows and is uploaded whole on ``sync()``
(through ``schemas.storage``); a local run directory is written in place. A file that
already exists (a resumed run) is continued, not replaced.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile

from schemas import storage


def _local_place(path: str) -> tuple[str, str | None]:
    """(local path to write, scratch folder to remove later or None) for ``path``."""
    if storage.is_local(path):
        return storage.absolute(path), None
    storage.makedirs(path.rstrip("/").rsplit("/", 1)[0])  # a no-op on object stores
    scratch = tempfile.mkdtemp(prefix="lwm-run-")
    return os.path.join(scratch, path.rstrip("/").rsplit("/", 1)[-1]), scratch


class SyncedFile:
    """A text file appended to locally and copied to ``path`` on ``sync()`` (``path`` itself when local)."""

    def __init__(self, path: str):
        self.path = path
        self.local, self.scratch = _local_place(path)
        os.makedirs(os.path.dirname(self.local), exist_ok=True)
        if self.scratch and storage.exists(path):
            with storage.open(path, "rb") as source, builtins.open(self.local, "wb") as target:
                shutil.copyfileobj(source, target)
        self.file = builtins.open(self.local, "a")

    def write(self, text: str) -> None:
        self.file.write(text)

    def sync(self) -> None:
        self.file.flush()
        if self.scratch:
            storage.upload(self.local, self.path)

    def close(self) -> None:
        self.sync()
        self.file.close()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class SyncedDir:
    """A folder written locally (e.g. by TensorBoard's writer) and copied file by file to ``path`` on ``sync()``."""

    def __init__(self, path: str):
        self.path = path
        self.local, self.scratch = _local_place(path)
        os.makedirs(self.local, exist_ok=True)
        if self.scratch:
            storage.makedirs(path)

    def sync(self) -> None:
        if not self.scratch:
            return
        for name in sorted(os.listdir(self.local)):
            storage.upload(os.path.join(self.local, name), storage.join(self.path, name))

    def close(self) -> None:
        self.sync()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
