"""LWM's streaming checkpoint format (tux / EasyLM ``StreamingCheckpointer``), read and written a tensor at a time.

A file is a sequence of msgpack objects, each a pair ``(key path, tensor bytes)``:
the key path is a list of strings (``["transformer", "wte", "embedding"]``) and the
tensor bytes are ``flax.serialization.to_bytes(array)``. The checkpointer writes a
``params`` file (``params::PATH``: keys with no prefix) or a whole train state
(``trainstate::PATH``: the parameters under ``params/params``, beside ``step`` and
``opt_state``).

:func:`read_records` yields one ``(key, array)`` at a time, so reading never holds
more than the record being decoded (a 7B file is 13-27 GB); :func:`write_records`
appends records the same way. Paths may be local or on any ``schemas.storage``
filesystem (``gs://``). Damage is a ``ValueError`` in one line naming the record:
a truncated file, a record that is not a pair, a value that is not a tensor.
"""

from __future__ import annotations

import hashlib
from typing import IO, Iterable, Iterator

import msgpack
import numpy as np
from flax import serialization

from schemas import storage

Key = tuple[str, ...]
_READ_SIZE = 16 << 20  # bytes the unpacker asks for at a time


class _HashingReader:
    """A binary stream that hashes (sha256) and counts what is read through it."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        self.bytes_read += len(data)
        return data


def _tensor(key: Key, value, path: str) -> np.ndarray:
    if not isinstance(value, bytes):
        raise ValueError(f"{path}: record {'/'.join(key)!r}: value is a {type(value).__name__}, not tensor bytes")
    try:
        array = serialization.msgpack_restore(value)
    except Exception as error:  # msgpack and numpy raise many types on damaged bytes
        raise ValueError(f"{path}: record {'/'.join(key)!r}: not a serialized tensor "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:120]})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: record {'/'.join(key)!r}: holds a {type(array).__name__}, not an array")
    return array


def _key(record, index: int, path: str) -> Key:
    if not (isinstance(record, (list, tuple)) and len(record) == 2):
        kind = f"a {len(record)}-item list" if isinstance(record, (list, tuple)) else f"a {type(record).__name__}"
        raise ValueError(f"{path}: record {index} is {kind}, not a (key path, tensor bytes) pair")
    key = record[0]
    if not (isinstance(key, (list, tuple)) and key and all(isinstance(k, str) for k in key)):
        raise ValueError(f"{path}: record {index}: key {key!r} is not a list of strings")
    return tuple(key)


class StreamReader:
    """Iterates ``(key, array)`` records of one file; afterwards ``sha256`` and ``size`` describe the bytes read."""

    def __init__(self, path: str):
        self.path = path
        self.sha256 = ""
        self.size = 0

    def __iter__(self) -> Iterator[tuple[Key, np.ndarray]]:
        with storage.open(self.path, "rb") as stream:
            reader = _HashingReader(stream)
            # max_buffer_size=0: no limit but the record's own size (an embedding is hundreds of MB).
            unpacker = msgpack.Unpacker(reader, read_size=_READ_SIZE, max_buffer_size=0, raw=False)
            index, last = 0, "the start"
            try:
                for record in unpacker:
                    key = _key(record, index, self.path)
                    yield key, _tensor(key, record[1], self.path)
                    index, last = index + 1, "/".join(key)
            except (msgpack.UnpackException, ValueError) as error:
                if isinstance(error, ValueError) and str(error).startswith(self.path):
                    raise
                raise ValueError(f"{self.path}: not a streaming checkpoint after {last!r} "
                                 f"({type(error).__name__}: {error})") from None
            if unpacker.tell() != reader.bytes_read:
                raise ValueError(f"{self.path}: truncated: {reader.bytes_read - unpacker.tell()} bytes of an "
                                 f"incomplete record after {last!r}")
            if index == 0:
                raise ValueError(f"{self.path}: empty: no records")
            self.sha256, self.size = reader.sha256.hexdigest(), reader.bytes_read


def read_records(path: str) -> Iterator[tuple[Key, np.ndarray]]:
    """``(key path, array)`` of every record of a streaming checkpoint, in file order."""
    return iter(StreamReader(path))


def encode_record(key: Key, array: np.ndarray) -> bytes:
    """One record's bytes, as the checkpointer writes it."""
    return msgpack.packb((list(key), serialization.to_bytes(np.asarray(array))), use_bin_type=True)


def write_records(path: str, records: Iterable[tuple[Key, np.ndarray]]) -> str:
    """Writes ``records`` to ``path`` one at a time; returns the file's sha256."""
    digest = hashlib.sha256()
    with storage.open(path, "wb") as out:
        for key, array in records:
            data = encode_record(key, array)
            digest.update(data)
            out.write(data)
    return digest.hexdigest()
