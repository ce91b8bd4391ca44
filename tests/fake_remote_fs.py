"""A Beam filesystem (and its fsspec twin) for ``fakegcs://`` paths, backed by a local folder, with object-store semantics.

Like GCS it has no directories (``mkdirs`` does nothing, ``exists`` is false for a
prefix), so jobs that write ``gs://`` outputs can be tested offline, including the
local-write-then-upload path of ArrayRecord shards.
"""

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem as LocalFileSystem_fsspec
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "fakegcs"
PREFIX = f"{SCHEME}://"


class FakeRemoteFileSystem(LocalFileSystem):
    root = "/nonexistent"  # set by the test fixture

    @classmethod
    def scheme(cls):
        return SCHEME

    def _local(self, path):
        return os.path.join(self.root, path[len(PREFIX):])

    def _remote(self, local):
        return PREFIX + os.path.relpath(local, self.root)

    def has_dirs(self):
        return False

    def mkdirs(self, path):
        pass

    def _list(self, prefix):
        for folder, _, files in os.walk(self.root):
            for name in files:
                local = os.path.join(folder, name)
                if self._remote(local).startswith(prefix):
                    yield FileMetadata(self._remote(local), os.path.getsize(local), os.path.getmtime(local))

    def create(self, path, *args, **kwargs):
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def copy(self, sources, destinations):
        super().copy([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def exists(self, path):
        return os.path.isfile(self._local(path))

    def size(self, path):
        return super().size(self._local(path))

    def last_updated(self, path):
        return super().last_updated(self._local(path))

    def checksum(self, path):
        return super().checksum(self._local(path))

    def metadata(self, path):
        local = self._local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):
        for path in paths:
            os.remove(self._local(path))


class FakeRemoteFsspec(LocalFileSystem_fsspec):
    """The same ``fakegcs://`` store for :mod:`schemas.storage` (fsspec), sharing the Beam fake's root."""

    protocol = (SCHEME,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(PREFIX):
            return os.path.join(FakeRemoteFileSystem.root, path[len(PREFIX):])
        return path

    def unstrip_protocol(self, name):
        return PREFIX + os.path.relpath(name, FakeRemoteFileSystem.root)


fsspec.register_implementation(SCHEME, FakeRemoteFsspec, clobber=True)
