"""Files on any filesystem by path: local paths, ``gs://`` and any other fsspec protocol.

The one filesystem layer for code that must not import Beam: manifests
(:mod:`schemas.manifest`), the trainer's run directory (config, metrics, logs,
TensorBoard events), the VQGAN's weights. It is a handful of functions over
`fsspec <https://filesystem-spec.readthedocs.io>`_, so ``gs://`` works wherever
``gcsfs`` is installed (the ``gcp`` extra) and tests use fsspec's ``memory://``
or the fake object store of ``tests/fake_remote_fs.py``. Beam jobs keep Beam's
own ``FileSystems`` for reading their inputs; what they write that readers
outside Beam check (manifests) goes through here.

Object stores have no folders and no atomic rename of a folder; every function
here is written so that its local and object-store behaviour agree for files.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator

import fsspec


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def is_local(path: str) -> bool:
    """True for a plain path or ``file://`` URL."""
    return "://" not in path or path.startswith("file://")


def absolute(path: str) -> str:
    """``path`` made independent of the working directory (URLs are already)."""
    return os.path.abspath(path.removeprefix("file://")) if is_local(path) else path


def join(base: str, *parts: str) -> str:
    """``base/part/...`` with exactly one ``/`` between parts, for paths and URLs alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
    fs, stripped = _fs(path)
    return fs.exists(stripped)


def isfile(path: str) -> bool:
    fs, stripped = _fs(path)
    return fs.isfile(stripped)


def size(path: str) -> int:
    fs, stripped = _fs(path)
    return int(fs.size(stripped))


def sizes(directory: str) -> dict[str, int]:
    """Sizes of the files directly under ``directory``, by name, from one listing ({} when it does not exist).

    One request per ~1000 files on an object store, where ``exists`` and ``size`` per file cost two each.
    """
    fs, stripped = _fs(directory)
    if not fs.exists(stripped):
        return {}
    entries = fs.ls(stripped, detail=True)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e.get("type") == "file"}


def open(path: str, mode: str = "rb") -> IO:  # noqa: A001 - the filesystem's open
    """A file object; parent folders are created for writes where folders exist."""
    fs, stripped = _fs(path)
    if "w" in mode or "a" in mode:
        parent = stripped.rsplit("/", 1)[0]
        if parent and parent != stripped:
            fs.makedirs(parent, exist_ok=True)
    return fs.open(stripped, mode)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    Locally a temporary name then ``os.replace``; an object store's single upload
    is already all-or-nothing.
    """
    if is_local(path):
        local = absolute(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        temporary = f"{local}.tmp-{os.getpid()}"
        with builtins.open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, local)
        return
    with open(path, "wb") as f:
        f.write(data)


def makedirs(path: str) -> None:
    fs, stripped = _fs(path)
    fs.makedirs(stripped, exist_ok=True)


def probe_writable(directory: str) -> None:
    """Create ``directory`` and write, then remove, a small file in it; OSError when that fails."""
    probe = join(directory, f".lwm-write-probe-{os.getpid()}")
    makedirs(directory)
    write_atomically(probe, b"")
    remove(probe)


def glob(pattern: str) -> list[str]:
    """Sorted paths (with their protocol) matching ``pattern``."""
    fs, stripped = _fs(pattern)
    matches = fs.glob(stripped)
    return sorted(m if is_local(pattern) else fs.unstrip_protocol(m) for m in matches)


def listdir(path: str) -> list[str]:
    """Sorted full paths of the entries directly under ``path`` (empty when it does not exist)."""
    fs, stripped = _fs(path)
    if not fs.exists(stripped):
        return []
    entries = fs.ls(stripped, detail=False)
    return sorted(e if is_local(path) else fs.unstrip_protocol(e) for e in entries)


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file (or, with ``recursive``, everything under a prefix); missing is fine."""
    fs, stripped = _fs(path)
    if fs.exists(stripped):
        fs.rm(stripped, recursive=recursive)


def rename(source: str, destination: str) -> None:
    """Move a file (a copy and delete on object stores)."""
    fs, stripped = _fs(source)
    fs.mv(stripped, _fs(destination)[1])


def upload(local_path: str, destination: str) -> None:
    """Copy a local file to ``destination`` (any filesystem)."""
    if is_local(destination):
        os.makedirs(os.path.dirname(absolute(destination)), exist_ok=True)
        shutil.copyfile(local_path, absolute(destination))
        return
    fs, stripped = _fs(destination)
    fs.put_file(local_path, stripped)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding ``path``'s bytes: itself when local, else a temporary copy removed on exit."""
    if is_local(path):
        yield absolute(path)
        return
    fs, stripped = _fs(path)
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, os.path.basename(stripped))
        fs.get_file(stripped, local)
        yield local

